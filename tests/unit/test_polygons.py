"""mask_format "polygon": biprompt.polygons (OpenCV, server side) -> biprompt_client.results
(PIL, client side) round trips, the wire schema, and the Selector's path."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from biprompt_client.results import decode_mask
from biprompt_client.schema import RLE, Polygons, SegmentResponse, encode_body

from biprompt.config import POLYGON_TOLERANCE_PX
from biprompt.polygons import mask_to_polygons


def disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 < r**2


def rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def round_trip(mask: np.ndarray, tolerance: float = POLYGON_TOLERANCE_PX) -> np.ndarray:
    out = decode_mask(json.loads(encode_body(mask_to_polygons(mask, tolerance))))
    assert out.shape == mask.shape and out.dtype == bool
    return out


def test_disk_round_trip_at_the_default_tolerance():
    # a disk 100 px across: 280 boundary pixels, 24 vertices at 1 px
    m = disk(160, 160, 80, 80, 50)
    poly = mask_to_polygons(m)
    assert poly["size"] == [160, 160] and poly["tolerance"] == POLYGON_TOLERANCE_PX == 1.0
    (region,) = poly["polygons"]
    assert region["holes"] == [] and 3 <= len(region["exterior"]) <= 40
    assert iou(round_trip(m), m) >= 0.99
    assert np.array_equal(round_trip(m, tolerance=0), m)  # no simplification: lossless here


@pytest.mark.parametrize("box", [(10, 5, 40, 20), (0, 0, 64, 48), (0, 7, 2, 30), (62, 46, 64, 48),
                                 (3, 3, 5, 5), (20, 0, 22, 48)])
def test_axis_aligned_rectangles_are_exact(box):
    """Vertices are pixel centres, so a rectangle of pixels is the 4 centres at its corners."""
    m = rect(48, 64, *box)
    (region,) = mask_to_polygons(m)["polygons"]
    x0, y0, x1, y1 = box
    assert sorted(map(tuple, region["exterior"])) == sorted(
        [(x0, y0), (x1 - 1, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)])
    assert np.array_equal(round_trip(m), m)


def test_rectangular_holes_are_exact_and_islands_in_holes_come_back():
    m = rect(60, 80, 5, 5, 70, 55)
    m &= ~rect(60, 80, 15, 12, 45, 40)  # a hole ...
    m |= rect(60, 80, 25, 20, 35, 30)  # ... with an island in it
    m |= rect(60, 80, 74, 2, 79, 58)  # and a second component
    poly = mask_to_polygons(m)
    assert [len(r["holes"]) for r in poly["polygons"]] == [1, 0, 0]  # largest first
    hole = poly["polygons"][0]["holes"][0]  # through the hole's own outermost pixels
    assert sorted(map(tuple, hole)) == [(15, 12), (15, 39), (44, 12), (44, 39)]
    assert np.array_equal(round_trip(m), m)
    reordered = {**poly, "polygons": poly["polygons"][::-1]}  # no order is needed to decode
    assert np.array_equal(decode_mask(reordered), m)


def test_round_holes_stay_holes_and_components_survive():
    m = disk(120, 200, 60, 60, 45) & ~disk(120, 200, 60, 60, 20)  # an annulus
    m |= disk(120, 200, 150, 50, 30) & ~disk(120, 200, 140, 45, 8) & ~disk(120, 200, 160, 62, 6)
    m |= rect(120, 200, 120, 95, 190, 115)
    poly = mask_to_polygons(m)
    assert len(poly["polygons"]) == 3
    assert sorted(len(r["holes"]) for r in poly["polygons"]) == [0, 1, 2]
    back = round_trip(m)
    assert iou(back, m) >= 0.97
    # every hole pixel more than tolerance + 1 px inside its hole is still False
    assert not back[disk(120, 200, 60, 60, 20 - 2)].any()
    assert not back[disk(120, 200, 140, 45, 8 - 2)].any()
    assert not back[disk(120, 200, 160, 62, 6 - 2)].any()


def test_empty_full_and_tiny_masks():
    empty = np.zeros((30, 40), dtype=bool)
    assert mask_to_polygons(empty) == {"size": [30, 40], "polygons": [], "tolerance": 1.0}
    assert np.array_equal(round_trip(empty), empty)
    full = np.ones((30, 40), dtype=bool)
    assert np.array_equal(round_trip(full), full)
    # fewer than 3 traced vertices: a lone pixel, a straight one-pixel-wide run; left out
    specks = np.zeros((30, 40), dtype=bool)
    specks[3, 3] = specks[10, 5:30] = specks[12:25, 35] = True
    assert mask_to_polygons(specks)["polygons"] == []
    # a 2x2 block keeps its 4 vertices; a pinhole of one pixel is filled
    block = rect(30, 40, 8, 8, 10, 10)
    assert np.array_equal(round_trip(block), block)
    pinhole = rect(30, 40, 5, 5, 20, 20)
    pinhole[12, 12] = False
    assert mask_to_polygons(pinhole)["polygons"][0]["holes"] == []
    # integer masks: nonzero is foreground
    assert mask_to_polygons(block.astype(np.uint8) * 7) == mask_to_polygons(block)


def test_simplification_never_leaves_fewer_than_3_vertices():
    thin = np.zeros((20, 60), dtype=bool)
    thin[9:11, 2:58] = True  # 2 px thick: approxPolyDP at 5 px would keep 2 vertices
    (region,) = mask_to_polygons(thin, tolerance=5.0)["polygons"]
    assert len(region["exterior"]) >= 3
    assert np.array_equal(round_trip(thin, tolerance=5.0), thin)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_polygons(np.zeros((2, 3, 4), dtype=bool))
    with pytest.raises(ValueError, match="tolerance"):
        mask_to_polygons(np.zeros((4, 4), dtype=bool), tolerance=-1)
    with pytest.raises(ValueError, match="size"):
        decode_mask({"polygons": []})
    with pytest.raises(ValueError, match="exterior"):
        decode_mask({"size": [4, 4], "polygons": [{"holes": []}]})


def test_wire_schema_validates_polygon_masks():
    m = disk(40, 60, 20, 20, 12) & ~disk(40, 60, 20, 20, 4)
    poly = mask_to_polygons(m)
    parsed = Polygons.model_validate(poly)
    assert parsed.size == (40, 60) and len(parsed.polygons[0].holes) == 1
    body = json.loads(encode_body({
        "request_id": "r", "image_id": "a" * 64, "width": 60, "height": 40, "mode": "point",
        "mask_format": "polygon", "mask": poly, "selected": 0, "strategy": "point",
        "candidates": [{"index": 0, "predicted_iou": 0.9, "mask": poly}], "text_mask": poly,
        "cache": "miss", "model": {"sam": "s"}}))
    resp = SegmentResponse.model_validate(body)
    assert isinstance(resp.mask, Polygons) and isinstance(resp.candidates[0].mask, Polygons)
    assert isinstance(SegmentResponse.model_validate({**body, "mask": {"size": [40, 60],
                                                      "counts": "0"}}).mask, RLE)
    with pytest.raises(ValueError):
        Polygons.model_validate({**poly, "polygons": [{"exterior": [[0, 0], [1, 1]]}]})


def test_selector_answers_polygons_for_every_mask():
    from deployments.common import pack_bits
    from deployments.selector import Selector
    from deployments.settings import AppArgs

    args = AppArgs(model_profile="configs/models/tiny.yaml", agreement_threshold=0.1,
                   api_key=None, cache_url=None)
    cands = np.stack([rect(40, 60, 30 - r, 20 - r, 30 + r, 20 + r) for r in (2, 6, 12)])
    points = {"masks": pack_bits(cands), "scores": np.array([0.9, 0.5, 0.3]), "decoder_ms": 1.0}
    text = {"mask": pack_bits(cands[1]), "text_ms": 2.0}
    spec = {"mode": "biprompt", "mask_format": "polygon", "return_candidates": True,
            "return_text_mask": True}
    out = asyncio.run(Selector(args)(points, spec, text=text))
    out.pop("timings_ms")
    resp = SegmentResponse.model_validate(json.loads(encode_body({
        "request_id": "r", "image_id": "a" * 64, "width": 60, "height": 40, "mode": "biprompt",
        "mask_format": "polygon", **out, "cache": "miss", "model": {"sam": "s"}})))
    assert resp.selected == 1 and isinstance(resp.mask, Polygons)
    assert np.array_equal(decode_mask(out["mask"]), cands[1])
    assert np.array_equal(decode_mask(out["text_mask"]), cands[1])
    for c in out["candidates"]:
        assert np.array_equal(decode_mask(c["mask"]), cands[c["index"]])
