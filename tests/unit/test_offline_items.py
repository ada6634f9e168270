"""serving.offline_items.prepare: an offline item is checked as the Ingress checks a request."""

from __future__ import annotations

import pytest

from biprompt.errors import InvalidInputError, InvalidPromptError
from serving.offline_items import prepare


def test_a_reference_item_is_refused_with_a_way_out():
    ref = {"image": "ref.png", "box": [0, 0, 10, 10]}
    for item in ({"id": "r", "points": [[5, 5]], "reference": ref},
                 {"id": "m", "mode": "reference"}):
        with pytest.raises(InvalidInputError, match="biprompt batch"):
            prepare(item, (64, 64))


def test_a_plain_item_becomes_its_prompt():
    prompt, req = prepare({"id": "a", "points": [[5, 6]], "text": "the red circle"}, (64, 64))
    assert prompt.points.tolist() == [[5.0, 6.0]] and req.text == "the red circle"
    with pytest.raises(InvalidPromptError, match="outside"):
        prepare({"id": "b", "points": [[70, 6]]}, (64, 64))
