"""The second ShapesRef generator keeps every rule of shapes-ref.md (checked here against the
spec, and its expressions against the first generator's resolver, an independent reading)."""

from __future__ import annotations

import numpy as np
import pytest

from biprompt.data import shapes_ref_b as b
from biprompt.data.shapes_ref import resolve


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(2024)
    return [b.generate_scene(rng, *size) for size in [(256, 256)] * 150 + [(240, 320)] * 50]


def test_objects_follow_the_spec(scenes):
    for sc in scenes:
        h, w = sc.size
        assert sc.image.shape == (h, w, 3) and sc.image.dtype == np.uint8
        assert 2 <= len(sc.objects) <= 5
        assert all(90 <= c <= 160 for c in sc.background)
        for o in sc.objects:
            x0, y0, x1, y1 = o.bbox
            lo, hi = b.SIDES[o.size]
            assert lo <= x1 - x0 == y1 - y0 <= hi and 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
            assert all(abs(c - base) <= 15 for c, base in zip(o.rgb, b.BASE_RGB[o.colour],
                                                             strict=True))
            ys, xs = np.nonzero(o.mask)  # the silhouette fills its box edge to edge
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.bbox
        pair = set(sc.nested or ())
        for i, p in enumerate(sc.objects):
            for j, q in enumerate(sc.objects[:i]):
                if {i, j} == pair:
                    continue
                px0, py0, px1, py1 = p.bbox
                qx0, qy0, qx1, qy1 = q.bbox
                assert px1 <= qx0 or qx1 <= px0 or py1 <= qy0 or qy1 <= py0


def test_the_nested_pair_sits_inside_its_host_about_half_the_time(scenes):
    nested = [sc for sc in scenes if sc.nested is not None]
    assert 0.4 <= len(nested) / len(scenes) <= 0.6  # p = 0.5; 200 scenes: 3.5 sigma either side
    for sc in nested:
        host, guest = (sc.objects[i] for i in sc.nested)
        assert host.size == "large" and guest.size == "small"
        x0, y0, x1, y1 = guest.bbox
        assert host.mask[y0:y1, x0:x1].all()  # its bounding box inside the host's silhouette
        # drawn on top: the guest's own colour where it is, noise aside
        inside = sc.image[guest.mask].astype(float).mean(0)
        assert np.abs(inside - guest.rgb).max() < 3


def test_every_expression_picks_out_its_object(scenes):
    for sc in scenes:
        for i, e in enumerate(sc.expressions):
            assert resolve(sc.objects, e) == [i], (e, i)


def test_samples_point_into_the_target_and_flag_overlaps():
    for s in b.make_samples(300, 7):
        col, row = s.point_index
        assert s.gt_mask[row, col] and s.gt_mask is s.target_object.mask
        covering = sum(bool(o.mask[row, col]) for o in s.scene.objects)
        assert s.ambiguous == (covering == 2)
    assert b.make_samples(5, 3)[4].expression == b.make_samples(5, 3)[4].expression  # seeded
