"""EXIF orientation: the library, the SDK and the encoder see an image as it is displayed, not as
the sensor stored it (a phone's portrait JPEG is a landscape array plus orientation 6)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from biprompt_client.images import image_size, load_image_array, load_image_bytes
from PIL import Image

from biprompt.cache import image_id
from biprompt.images import decode_image_bytes, exif_orientation, to_rgb_array
from tests.support.exif_images import (
    H,
    W,
    displayed_image,
    encode,
    rotated_jpeg,
    sensor_pixels,
    stored,
    unstore,
)

ORIENTATIONS = range(1, 9)


def test_the_test_images_carry_their_orientation():
    data = rotated_jpeg(6)
    with Image.open(io.BytesIO(data)) as img:
        assert img.size == (H, W)  # stored portrait: W x H swapped
        assert exif_orientation(img) == 6


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_png_decodes_exactly_as_displayed(orientation):
    """Lossless: the decoded array is the displayed image, pixel for pixel."""
    disp = displayed_image()
    data = encode(stored(disp, orientation), orientation, fmt="PNG")
    rgb, info = decode_image_bytes(data)
    np.testing.assert_array_equal(rgb, disp)
    assert (info.height, info.width) == (H, W)


@pytest.mark.parametrize("orientation", [3, 5, 6, 7, 8])
def test_jpeg_decodes_as_displayed(orientation):
    data = rotated_jpeg(orientation)
    rgb, info = decode_image_bytes(data)
    assert rgb.shape == (H, W, 3) and (info.height, info.width) == (H, W)
    # exactly the decoded sensor pixels, turned the way EXIF says
    np.testing.assert_array_equal(rgb, unstore(sensor_pixels(data), orientation))
    # and close to what was drawn (JPEG is lossy; a wrong turn would be far off)
    err = np.abs(rgb.astype(int) - displayed_image().astype(int)).mean()
    assert err < 3, err


def test_no_orientation_and_orientation_1_are_left_alone():
    disp = displayed_image()
    for data in (encode(disp, None), encode(disp, 1)):
        rgb, _ = decode_image_bytes(data)
        np.testing.assert_array_equal(rgb, sensor_pixels(data))


def test_an_orientation_out_of_range_is_ignored():
    data = encode(displayed_image(), 9)
    rgb, _ = decode_image_bytes(data)
    np.testing.assert_array_equal(rgb, sensor_pixels(data))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_paths_bytes_and_pil_images_agree(tmp_path, orientation):
    data = rotated_jpeg(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    want, _ = decode_image_bytes(data)
    for image in (data, bytearray(data), str(path), path, Image.open(io.BytesIO(data))):
        rgb, info = to_rgb_array(image)
        np.testing.assert_array_equal(rgb, want)
        assert (info.height, info.width) == (H, W)


def test_pixel_limit_still_read_from_the_header():
    from biprompt.errors import PayloadTooLargeError

    with pytest.raises(PayloadTooLargeError, match="limit"):
        decode_image_bytes(rotated_jpeg(6), max_pixels=H * W - 1)


# --- the SDK's local image handling ------------------------------------------------------------


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_sdk_sizes_and_arrays_agree_with_the_server(tmp_path, orientation):
    data = rotated_jpeg(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    server, _ = decode_image_bytes(data)
    assert image_size(data) == (H, W)
    for image in (data, path, Image.open(io.BytesIO(data))):
        np.testing.assert_array_equal(load_image_array(image), server)


def test_sdk_image_size_of_png_with_and_without_exif():
    disp = displayed_image()
    assert image_size(encode(stored(disp, 6), 6, fmt="PNG")) == (H, W)
    assert image_size(encode(stored(disp, 6), None, fmt="PNG")) == (W, H)  # no tag: as stored


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_sdk_sends_encoded_bytes_unchanged(tmp_path, orientation):
    """The image id is the sha256 of the bytes the caller holds: no re-encoding."""
    data = rotated_jpeg(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for image in (data, path):
        sent = load_image_bytes(image)
        assert sent == data
        assert hashlib.sha256(sent).hexdigest() == image_id(data)


def test_sdk_encodes_a_pil_image_as_displayed():
    """A PIL image opened from a rotated JPEG goes out as a PNG of what it displays: the server
    decodes the same pixels the caller sees."""
    data = rotated_jpeg(6)
    png = load_image_bytes(Image.open(io.BytesIO(data)))
    rgb, info = decode_image_bytes(png)
    assert (info.height, info.width) == (H, W)
    np.testing.assert_array_equal(rgb, decode_image_bytes(data)[0])


# --- the encoder and the pipeline -----------------------------------------------------------------


def test_embedding_has_the_displayed_size(tiny_pipeline):
    data = rotated_jpeg(6)
    assert tiny_pipeline.embed(data).original_size == (H, W)
    res = tiny_pipeline.segment(data, points=[[W - 10, 10]], mode="point")
    assert res.mask.shape == (H, W)


def test_demo_model_click_lands_on_the_displayed_object():
    """The defect as seen: a click on a portrait JPEG with orientation 6 segmented the wrong
    object (IoU 0.0). The demo model is trained, so its mask must cover the clicked shape."""
    from biprompt.data.shapes_ref import make_samples
    from biprompt.pipeline import BiPromptPipeline

    pipe = BiPromptPipeline.from_config("configs/models/demo.yaml")

    def iou(a, b):
        return (a & b).sum() / max(1, (a | b).sum())

    # landscape scenes; the first few whose target the model gets on the plain array
    checked = 0
    for s in make_samples(12, seed=606, height=192, width=256):
        plain = pipe.segment(s.image, points=[s.point], mode="point").mask
        if iou(plain, s.gt_mask) < 0.7:
            continue
        data = encode(stored(s.image, 6), 6)
        res = pipe.segment(data, points=[s.point], mode="point")
        assert res.mask.shape == s.gt_mask.shape
        col, row = s.point_index
        assert res.mask[row, col]
        assert iou(res.mask, s.gt_mask) > 0.5
        checked += 1
        if checked == 3:
            break
    assert checked == 3
