"""Images too thin for SAM's resize-longest-side get a 422 with the limit, before any batch: one
4000x3 PNG used to fail every image in its encoder batch with PIL's 'height and width must be
> 0'."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from biprompt.errors import InvalidImageError
from biprompt.preprocess import check_model_input, max_aspect_ratio, sam_input_size


def png(h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("img_size", [128, 256, 1024])
def test_the_limit_is_exactly_where_sams_resize_reaches_zero(img_size):
    r = max_aspect_ratio(img_size)
    for short in (2, 3, 7):
        check_model_input((short, short * r), img_size)  # the most elongated accepted
        check_model_input((short * r, short), img_size)
        assert min(sam_input_size((short, short * r), img_size)) == 1
        with pytest.raises(InvalidImageError):
            check_model_input((short, short * r + 1), img_size)
        with pytest.raises(InvalidImageError):
            check_model_input((short * r + 1, short), img_size)


@pytest.mark.parametrize("hw", [(3, 4000), (2, 60000), (60000, 2)])
def test_message_names_the_size_and_the_limit(hw):
    with pytest.raises(InvalidImageError) as err:
        check_model_input(hw, 1024 if hw != (3, 4000) else 128)
    msg = str(err.value)
    assert f"{hw[1]}x{hw[0]}" in msg and "aspect ratio" in msg and ":1" in msg
    assert err.value.status_code == 422


def test_min_side_is_checked_too():
    with pytest.raises(InvalidImageError, match="at least 2"):
        check_model_input((1, 10), 1024)


@pytest.fixture(scope="module")
def engine(tiny_pipeline):
    return tiny_pipeline.encoder


@pytest.mark.parametrize("hw", [(3, 4000), (2, 600), (600, 2)])
def test_encoder_engine_refuses_before_encoding(engine, hw):
    thin = np.zeros((*hw, 3), dtype=np.uint8)
    ok = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        engine.embed_rgb([ok, thin])
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        engine.embed_batch([png(*hw)])
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        engine.check_input(hw)
    engine.check_input((64, 64))
