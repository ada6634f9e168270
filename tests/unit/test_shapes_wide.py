"""The wide training distribution (shapes_ref.WIDE): past the spec where it is meant to be, still
a valid ShapesRef scene everywhere else, and the spec's own generator untouched by it."""

from __future__ import annotations

import numpy as np
import pytest

from biprompt.data.shapes_ref import (
    COLOURS,
    WIDE,
    Variation,
    expression_for,
    generate_scene,
    resolve,
    shape_mask,
    varied_shape_mask,
)
from biprompt.train.batches import FREE_SIDES, draw_canvas


@pytest.fixture(scope="module")
def wide_scenes():
    rng = np.random.default_rng(4242)
    out = []
    for _ in range(300):
        h, w = draw_canvas(rng, WIDE)
        out.append(generate_scene(rng, h, w, variation=WIDE))
    return out


def test_every_object_is_inside_its_box_and_the_canvas(wide_scenes):
    for s in wide_scenes:
        h, w = s.size
        assert s.image.shape == (h, w, 3)
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert o.mask.any()
            outside = o.mask.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any()


def test_sizes_colours_and_background_go_past_the_spec(wide_scenes):
    objs = [o for s in wide_scenes for o in s.objects]
    small = [o.side for o in objs if o.size == "small"]
    large = [o.side for o in objs if o.size == "large"]
    assert min(small) < 24 and max(small) <= WIDE.size_range("small")[1]
    assert max(large) > 110 and min(large) >= WIDE.size_range("large")[0]
    dev = np.array([np.subtract(o.rgb, COLOURS[o.colour]) for o in objs])
    assert np.abs(dev).max() > 15 and np.abs(dev).max() <= WIDE.colour_jitter
    bg = np.array([s.background for s in wide_scenes])
    assert bg.min() < 90 and bg.max() > 160


def test_canvases_vary_in_size_and_aspect(wide_scenes):
    sizes = {s.size for s in wide_scenes}
    assert len(sizes) > 50
    lo, hi = FREE_SIDES
    assert all(min(h, w) >= min(lo, 224) and max(h, w) <= max(hi, 320) for h, w in sizes)


def test_boxes_may_touch_but_never_overlap_outside_the_nested_pair(wide_scenes):
    touching = 0
    for s in wide_scenes:
        nested = set(s.nested or ())
        free = [o.bbox for i, o in enumerate(s.objects) if i not in nested or i == s.nested[0]]
        for i, a in enumerate(free):
            for b in free[i + 1:]:
                gap_x = max(b[0] - a[2], a[0] - b[2])
                gap_y = max(b[1] - a[3], a[1] - b[3])
                assert max(gap_x, gap_y) >= 0, (a, b)
                touching += max(gap_x, gap_y) == 0
    assert touching > 0


def test_expressions_still_pick_out_exactly_their_object(wide_scenes):
    for s in wide_scenes:
        for i, e in enumerate(s.expressions):
            assert e == expression_for(s, i)
            assert resolve(s, e) == [i]


def test_noise_levels_differ_between_images():
    """Noise-free and noisy renderings of the same draw differ by the image's own sigma."""
    sigmas = []
    for seed in range(12):
        clean = generate_scene(np.random.default_rng(seed), variation=Variation(blur_p=0.0),
                               noise=False)
        noisy = generate_scene(np.random.default_rng(seed), variation=Variation(blur_p=0.0))
        sigmas.append(float(np.std(noisy.image.astype(float) - clean.image.astype(float))))
    assert min(sigmas) < 6 and max(sigmas) > 10, sigmas


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_varied_masks_stay_close_to_the_spec_raster(shape):
    rng = np.random.default_rng(0)
    for side in (20, 40, 64, 118):
        ref = shape_mask(shape, side)
        for _ in range(20):
            m = varied_shape_mask(shape, side, rng, WIDE.min_scale)
            inter = (m & ref).sum() / (m | ref).sum()
            assert m.shape == ref.shape and inter > 0.8, (side, inter)
        assert np.array_equal(varied_shape_mask(shape, side, rng, 1.0), ref)


def test_the_spec_generator_is_untouched_without_a_variation():
    a = generate_scene(np.random.default_rng(7))
    b = generate_scene(np.random.default_rng(7), variation=None)
    assert np.array_equal(a.image, b.image)
    assert [o.bbox for o in a.objects] == [o.bbox for o in b.objects]


def test_some_nested_objects_wear_their_hosts_colour(wide_scenes):
    pairs = [(s.objects[h], s.objects[g]) for s in wide_scenes if s.nested for h, g in [s.nested]]
    same = sum(h.colour == g.colour for h, g in pairs)
    assert 0.1 < same / len(pairs) < 0.45, (same, len(pairs))
    assert all(g.size == "small" and h.size == "large" for h, g in pairs)
