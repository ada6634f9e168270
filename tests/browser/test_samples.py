"""The page's bundled samples are what tests/browser/samples.py draws (no browser needed)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tests.browser.samples import BUNDLED, MANIFEST, SAMPLES_DIR, manifest


def test_bundled_samples_are_fresh():
    hint = "stale: run `.venv/bin/python -m tests.browser.samples`"
    assert json.loads(MANIFEST.read_text()) == manifest(), hint
    for b in BUNDLED:
        png = np.asarray(Image.open(SAMPLES_DIR / b.file).convert("RGB"))
        assert np.array_equal(png, b.scene().image), f"{b.file} {hint}"
        assert (SAMPLES_DIR / b.file).stat().st_size < 16_000  # noise-free: a few KB each
