"""Bad input raises a clear, typed error; convertible input is converted and says so."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from biprompt.errors import InvalidImageError, InvalidPromptError, PayloadTooLargeError
from biprompt.images import to_rgb_array


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_grayscale_is_replicated_to_rgb():
    gray = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    for value in (gray, gray[..., None], Image.fromarray(gray), png_bytes(Image.fromarray(gray))):
        rgb, info = to_rgb_array(value)
        assert rgb.shape == (12, 10, 3) and info.converted is not None
        np.testing.assert_array_equal(rgb[..., 1], gray)


def test_rgba_drops_alpha():
    rgba = np.random.default_rng(0).integers(0, 256, (8, 9, 4), dtype=np.uint8)
    rgb, info = to_rgb_array(rgba)
    assert info.converted == "rgba->rgb"
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    rgb2, info2 = to_rgb_array(png_bytes(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(rgb2, rgba[..., :3])
    assert info2.converted == "rgba->rgb"


def test_16_bit_and_float_are_rejected_with_advice():
    with pytest.raises(InvalidImageError, match="uint16.*convert to uint8"):
        to_rgb_array(np.zeros((8, 8, 3), dtype=np.uint16))
    with pytest.raises(InvalidImageError, match="float32"):
        to_rgb_array(np.zeros((8, 8, 3), dtype=np.float32))
    img16 = Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16))
    with pytest.raises(InvalidImageError, match="16/32-bit"):
        to_rgb_array(png_bytes(img16))


def test_undecodable_empty_tiny_and_huge_images():
    with pytest.raises(InvalidImageError, match="could not decode"):
        to_rgb_array(b"not an image at all")
    with pytest.raises(InvalidImageError, match="empty"):
        to_rgb_array(b"")
    with pytest.raises(InvalidImageError, match="at least"):
        to_rgb_array(np.zeros((1, 5, 3), dtype=np.uint8))
    with pytest.raises(PayloadTooLargeError, match="limit is 100"):
        to_rgb_array(np.zeros((20, 20, 3), dtype=np.uint8), max_pixels=100)
    png = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(png, format="PNG")
    with pytest.raises(PayloadTooLargeError, match="limit is 100"):  # encoded bytes too
        to_rgb_array(png.getvalue(), max_pixels=100)
    with pytest.raises(InvalidImageError, match="HxWx3"):
        to_rgb_array(np.zeros((5, 5, 2), dtype=np.uint8))
    with pytest.raises(InvalidImageError, match="not found"):
        to_rgb_array("/no/such/image.png")
    with pytest.raises(InvalidImageError, match="unsupported image type"):
        to_rgb_array(object())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(points=[[320, 10]]), r"outside the 320x240 image"),
        (dict(points=[[-1, 10]]), r"outside"),
        (dict(points=[[10, float("nan")]]), "NaN"),
        (dict(points=[[1, 2, 3]]), "Nx2"),
        (dict(points=[[1, 2]], labels=[1, 0]), "2 labels for 1 points"),
        (dict(points=[[1, 2]], labels=[2]), "1 \\(foreground\\) or 0"),
        (dict(points=[["a", 2]]), "numbers"),
        (dict(points=None), "needs at least one point"),
        (dict(points=[[1, 2]], mode="magic"), "unknown mode"),
        (dict(points=[[1, 2]], box=[10, 10, 5, 20]), "x0 <= x1"),
        (dict(points=[[1, 2]], text=""), "empty"),
        (dict(points=[[1, 2]], text="   "), "empty"),
        (dict(points=[[1, 2]], text="the red circle " * 60), "limit is"),
        (dict(points=[[1, 2]], text=3), "must be a string"),
        (dict(mode="text"), "needs a text"),
    ],
)
def test_bad_prompts(tiny_pipeline, rgb_image, kwargs, match):
    emb = tiny_pipeline.embed(rgb_image)
    points = kwargs.pop("points", None)
    with pytest.raises(InvalidPromptError, match=match):
        tiny_pipeline.segment(emb, points, **kwargs)


def test_overlong_text_in_tokens(tiny_pipeline):
    tok = tiny_pipeline.text.tokenizer
    text = " ".join(["the"] * (tok.max_tokens + 1))
    assert len(text) < tok.max_chars
    with pytest.raises(InvalidPromptError, match="tokens long"):
        tok.validate(text)


def test_errors_carry_status_codes():
    assert InvalidPromptError("x").status_code == 422
    assert PayloadTooLargeError("x").status_code == 413
