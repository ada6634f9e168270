"""ShapesRef generator against every rule of /work/shared/spec/shapes-ref.md.

Checks are written independently of the generator's internals (own parser, own overlap tests),
so that a broken rule fails here.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from biprompt.data.shapes_ref import (
    COLOURS,
    MIN_GAP,
    VOCABULARY,
    ShapeObject,
    expression_for,
    generate_scene,
    iter_samples,
    make_samples,
    resolve,
    sample_from_scene,
    shape_mask,
)

SPEC_VOCAB = {
    "the", "small", "large", "red", "green", "blue", "yellow",
    "circle", "square", "triangle", "leftmost", "rightmost",
}  # fmt: skip
SPEC_RGB = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (225, 205, 50),
}
SPEC_SIDES = {"small": (24, 40), "large": (64, 110)}
GRAMMAR = re.compile(
    r"^the (?:(small|large|leftmost|rightmost) )?(red|green|blue|yellow) (circle|square|triangle)$"
)
N_SCENES = 400


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(20240601)
    return [generate_scene(rng, noise=False) for _ in range(N_SCENES)]


@pytest.fixture(scope="module")
def samples():
    return make_samples(300, seed=11)


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _referents(objects, expression: str) -> list[int]:
    """Independent reading of an expression: which objects it denotes."""
    m = GRAMMAR.match(expression)
    assert m, expression
    mod, colour, shape = m.groups()
    hits = [i for i, o in enumerate(objects) if o.colour == colour and o.shape == shape]
    if mod in ("small", "large"):
        return [i for i in hits if objects[i].size == mod]
    if mod in ("leftmost", "rightmost"):
        cx = {i: (objects[i].bbox[0] + objects[i].bbox[2]) / 2 for i in hits}
        best = min(cx.values()) if mod == "leftmost" else max(cx.values())
        return [i for i in hits if cx[i] == best]
    return hits


def _obj(shape: str, colour: str, size: str, x0: int, side: int = 30) -> ShapeObject:
    mask = np.zeros((4, 4), dtype=bool)  # masks are irrelevant to expressions
    return ShapeObject(shape, colour, size, SPEC_RGB[colour], (x0, 0, x0 + side, side), mask)


# --- canvas and objects -----------------------------------------------------------------------


def test_vocabulary_is_the_spec_vocabulary() -> None:
    assert set(VOCABULARY) == SPEC_VOCAB and len(VOCABULARY) == len(SPEC_VOCAB)
    assert {k: tuple(v) for k, v in COLOURS.items()} == SPEC_RGB


def test_object_counts(scenes) -> None:
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {2, 3, 4, 5}
    assert min(counts.values()) > N_SCENES // 4 * 0.6  # roughly uniform


def test_image_format_and_background(scenes) -> None:
    for s in scenes:
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        assert s.size == (256, 256)
        assert all(90 <= c <= 160 for c in s.background)
        covered = np.any([o.mask for o in s.objects], axis=0)
        assert (s.image[~covered] == np.array(s.background, dtype=np.uint8)).all()


def test_sizes_in_range_and_square_bboxes(scenes) -> None:
    seen = {"small": set(), "large": set()}
    for s in scenes:
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            lo, hi = SPEC_SIDES[o.size]
            assert x1 - x0 == y1 - y0 == o.side
            assert lo <= o.side <= hi, (o.size, o.side)
            seen[o.size].add(o.side)
    assert min(seen["small"]) == 24 and max(seen["small"]) == 40
    assert min(seen["large"]) <= 66 and max(seen["large"]) >= 108


def test_objects_inside_canvas_and_masks_inside_bbox(scenes) -> None:
    for s in scenes:
        h, w = s.size
        for o in s.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert o.mask.shape == (h, w) and o.mask.dtype == bool
            assert o.mask.sum() == o.mask[y0:y1, x0:x1].sum() > 0
            cols = np.flatnonzero(o.mask.any(axis=0))
            rows = np.flatnonzero(o.mask.any(axis=1))
            assert (cols[0], cols[-1] + 1) == (x0, x1)  # full bbox width is used
            assert rows[-1] + 1 == y1 and rows[0] in (y0, y0 + 1)  # triangle apex row may be empty


def test_colours_within_jitter_and_drawn_exactly(scenes) -> None:
    for s in scenes:
        for i, o in enumerate(s.objects):
            base = np.array(SPEC_RGB[o.colour])
            assert (np.abs(np.array(o.rgb) - base) <= 15).all(), (o.colour, o.rgb)
            visible = o.mask.copy()
            for later in s.objects[i + 1 :]:
                visible &= ~later.mask
            assert visible.any()
            assert (s.image[visible] == np.array(o.rgb, dtype=np.uint8)).all()


def test_colour_jitter_spans_range(scenes) -> None:
    deltas = np.array([np.array(o.rgb) - SPEC_RGB[o.colour] for s in scenes for o in s.objects])
    assert deltas.min() == -15 and deltas.max() == 15
    assert abs(deltas.mean()) < 1.0


def test_noise_added_after_objects_sigma_8() -> None:
    diffs_bg, diffs_obj = [], []
    for seed in range(6):
        clean = generate_scene(np.random.default_rng(seed), noise=False)
        noisy = generate_scene(np.random.default_rng(seed), noise=True)
        assert [o.bbox for o in clean.objects] == [o.bbox for o in noisy.objects]
        covered = np.any([o.mask for o in clean.objects], axis=0)
        d = noisy.image.astype(int) - clean.image.astype(int)
        diffs_bg.append(d[~covered].ravel())
        inner = covered & (clean.image.min(axis=2) >= 40) & (clean.image.max(axis=2) <= 215)
        diffs_obj.append(d[inner].ravel())
    bg, obj = np.concatenate(diffs_bg), np.concatenate(diffs_obj)
    assert abs(bg.mean()) < 0.1 and 7.8 < bg.std() < 8.2
    assert abs(obj.mean()) < 0.3 and 7.6 < obj.std() < 8.4  # objects are noisy too
    assert np.abs(bg).max() > 24  # Gaussian tails, not a uniform


def test_no_bbox_overlap_except_nested_pair(scenes) -> None:
    for s in scenes:
        overlapping = []
        for i, a in enumerate(s.objects):
            for j in range(i + 1, len(s.objects)):
                b = s.objects[j]
                if _boxes_overlap(a.bbox, b.bbox):
                    overlapping.append((i, j))
                else:
                    assert not (a.mask & b.mask).any()
                    gap = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2],
                              b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])  # fmt: skip
                    assert gap >= MIN_GAP
        if s.nested is None:
            assert overlapping == []
        else:
            assert overlapping == [tuple(sorted(s.nested))]


def test_nested_small_inside_large_silhouette_on_top(scenes) -> None:
    n_nested = 0
    for s in scenes:
        if s.nested is None:
            continue
        n_nested += 1
        host, guest = (s.objects[k] for k in s.nested)
        assert host.size == "large" and guest.size == "small"
        assert s.nested[0] < s.nested[1]  # drawn after its host
        x0, y0, x1, y1 = guest.bbox
        assert host.mask[y0:y1, x0:x1].all()  # the whole small bbox is inside the large shape
        assert (s.image[guest.mask] == np.array(guest.rgb, dtype=np.uint8)).all()
        assert guest.colour != host.colour
    assert n_nested > 0


def test_about_half_of_scenes_nested(scenes) -> None:
    rate = np.mean([s.nested is not None for s in scenes])
    assert 0.42 < rate < 0.58, rate  # +-3.2 sd for 400 scenes


def test_nested_hosts_of_every_shape(scenes) -> None:
    hosts = {s.objects[s.nested[0]].shape for s in scenes if s.nested is not None}
    guests = {s.objects[s.nested[1]].shape for s in scenes if s.nested is not None}
    assert hosts == guests == {"circle", "square", "triangle"}


# --- geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [24, 25, 31, 40, 64, 77, 110])
def test_triangle_geometry(side: int) -> None:
    m = shape_mask("triangle", side)
    assert m.shape == (side, side)
    widths = m.sum(axis=1)
    assert (np.diff(widths) >= 0).all()  # widens downwards: apex at the top
    assert widths[-1] == side  # base at the bottom, base width == side
    rows = np.flatnonzero(widths)
    assert side - len(rows) in (0, 1)  # height == side (pixel-centre sampling of the apex)
    assert 1 <= widths[rows[0]] <= 2
    assert (m == m[:, ::-1]).all()  # isosceles, apex at the top centre
    top_cols = np.flatnonzero(m[rows[0]])
    assert abs(top_cols.mean() + 0.5 - side / 2) < 1e-9
    for r in range(side):  # half-width at depth y is y / 2
        assert abs(widths[r] - (r + 0.5)) <= 2
    assert abs(m.sum() - side * side / 2) <= side


@pytest.mark.parametrize("side", [24, 33, 40, 64, 101, 110])
def test_circle_and_square_geometry(side: int) -> None:
    c = shape_mask("circle", side)
    assert (c == c[::-1]).all() and (c == c[:, ::-1]).all() and (c == c.T).all()
    assert c[side // 2].all() and c[:, side // 2].all()  # diameter == side
    assert abs(c.sum() / (np.pi * side * side / 4) - 1) < 0.05
    assert shape_mask("square", side).all()


def test_triangles_in_scenes_are_upright(scenes) -> None:
    n = 0
    for s in scenes:
        for o in s.objects:
            if o.shape == "triangle":
                x0, y0, x1, y1 = o.bbox
                assert o.mask[y1 - 1, x0:x1].all()
                assert not o.mask[y0 + 2, x0] and not o.mask[y0 + 2, x1 - 1]
                n += 1
    assert n > 50


# --- expressions ------------------------------------------------------------------------------


def test_expression_grammar_and_unique_referent(scenes) -> None:
    forms = Counter()
    for s in scenes:
        assert len(s.expressions) == len(s.objects)
        for i, expr in enumerate(s.expressions):
            assert expr == expression_for(s, i)
            assert set(expr.split()) <= SPEC_VOCAB
            assert _referents(s.objects, expr) == [i]
            assert resolve(s, expr) == [i]
            o = s.objects[i]
            rule1 = f"the {o.colour} {o.shape}"
            rule2 = f"the {o.size} {o.colour} {o.shape}"
            if _referents(s.objects, rule1) == [i]:
                assert expr == rule1
            elif _referents(s.objects, rule2) == [i]:
                assert expr == rule2
            else:
                assert expr.split()[1] in ("leftmost", "rightmost")
            forms[len(expr.split()) if len(expr.split()) == 3 else expr.split()[1]] += 1
    assert forms[3] > 0 and forms["leftmost"] > 0 and forms["rightmost"] > 0
    assert forms["small"] + forms["large"] > 0


def test_expression_rules_hand_built() -> None:
    objs = [_obj("circle", "red", "small", 10), _obj("square", "red", "small", 60)]
    assert expression_for(objs, 0) == "the red circle"
    objs = [_obj("circle", "red", "small", 10), _obj("circle", "red", "large", 60, 70)]
    assert [expression_for(objs, i) for i in range(2)] == [
        "the small red circle",
        "the large red circle",
    ]
    objs = [_obj("circle", "red", "small", 100), _obj("circle", "red", "small", 10)]
    assert [expression_for(objs, i) for i in range(2)] == [
        "the rightmost red circle",
        "the leftmost red circle",
    ]
    # three alike: the middle one has no expression (such a scene is redrawn)
    objs = [_obj("circle", "red", "small", x) for x in (10, 60, 110)]
    assert expression_for(objs, 1) is None
    # rule 3 ranges over every size: a large red circle further left blocks "leftmost"
    objs = [
        _obj("circle", "red", "large", 0, 70),
        _obj("circle", "red", "small", 80),
        _obj("circle", "red", "small", 150),
    ]
    assert expression_for(objs, 0) == "the large red circle"
    assert expression_for(objs, 1) is None
    assert expression_for(objs, 2) == "the rightmost red circle"
    # equal centre x: neither is strictly leftmost
    objs = [_obj("circle", "red", "small", 40), _obj("circle", "red", "small", 40)]
    assert expression_for(objs, 0) is None and expression_for(objs, 1) is None


# --- samples ----------------------------------------------------------------------------------


def test_sample_fields(samples) -> None:
    for smp in samples:
        scene = smp.scene
        assert smp.image is scene.image and smp.label == 1
        assert smp.expression == scene.expressions[smp.target]
        assert smp.gt_mask.shape == smp.image.shape[:2] and smp.gt_mask.dtype == bool
        assert (smp.gt_mask == scene.objects[smp.target].mask).all()


def test_points_at_pixel_centres_inside_gt(samples) -> None:
    for smp in samples:
        x, y = smp.point
        assert (x - 0.5).is_integer() and (y - 0.5).is_integer()
        col, row = smp.point_index
        assert (col, row) == (int(x), int(y))
        assert smp.gt_mask[row, col]


def test_gt_is_full_silhouette_including_nested_area(samples) -> None:
    seen = 0
    for smp in samples:
        nested = smp.scene.nested
        if nested is None or smp.target != nested[0]:
            continue
        host, guest = (smp.scene.objects[k] for k in nested)
        assert smp.gt_mask[guest.mask].all()
        assert smp.gt_mask.sum() == shape_mask(host.shape, host.side).sum()
        seen += 1
    assert seen > 5


def test_ambiguous_flag(samples) -> None:
    n_amb = n_host_amb = 0
    for smp in samples:
        col, row = smp.point_index
        under = sum(bool(o.mask[row, col]) for o in smp.scene.objects)
        assert smp.ambiguous == (under >= 2)
        nested = smp.scene.nested
        if nested is not None and smp.target == nested[1]:
            assert smp.ambiguous  # a nested small target always lies on its host
        if nested is None:
            assert not smp.ambiguous
        n_amb += smp.ambiguous
        n_host_amb += smp.ambiguous and nested is not None and smp.target == nested[0]
    assert n_amb > 10 and n_host_amb > 0


def test_point_uniform_over_full_silhouette(scenes) -> None:
    scene = next(
        s for s in scenes if s.nested is not None and s.objects[s.nested[0]].shape == "square"
    )
    host_i, guest_i = scene.nested
    host, guest = scene.objects[host_i], scene.objects[guest_i]
    rng = np.random.default_rng(5)
    n = 3000
    pts = [sample_from_scene(scene, rng, target=host_i).point_index for _ in range(n)]
    on_guest = np.mean([guest.mask[r, c] for c, r in pts])
    p = guest.mask.sum() / host.mask.sum()
    assert abs(on_guest - p) < 4 * np.sqrt(p * (1 - p) / n)
    cols = np.array([c for c, _ in pts])
    assert abs(cols.mean() + 0.5 - host.center_x) < 2  # no drift within the square


def test_targets_cover_all_objects(samples) -> None:
    assert {smp.target for smp in samples} == {0, 1, 2, 3, 4}


# --- determinism and canvas sizes -------------------------------------------------------------


def _key(smp) -> tuple:
    return smp.target, smp.point, smp.expression, smp.ambiguous


def test_deterministic_per_seed() -> None:
    a, b = make_samples(25, seed=3), make_samples(25, seed=3)
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert all((x.image == y.image).all() for x, y in zip(a, b, strict=True))
    stream = iter_samples(3)
    c = [next(stream) for _ in range(25)]
    assert [_key(s) for s in c] == [_key(s) for s in a]
    assert all((x.image == y.image).all() for x, y in zip(a, c, strict=True))


def test_different_seeds_differ() -> None:
    a, b = make_samples(10, seed=1), make_samples(10, seed=2)
    assert sum((x.image != y.image).any() for x, y in zip(a, b, strict=True)) == 10
    assert [_key(s) for s in a] != [_key(s) for s in b]


def test_non_square_canvas_320x240() -> None:
    smps = make_samples(60, seed=4, height=240, width=320)
    max_x1 = max_y1 = 0
    for smp in smps:
        assert smp.image.shape == (240, 320, 3) and smp.gt_mask.shape == (240, 320)
        assert smp.scene.size == (240, 320)
        for o in smp.scene.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 and x1 <= 320 and 0 <= y0 and y1 <= 240
            max_x1, max_y1 = max(max_x1, x1), max(max_y1, y1)
        col, row = smp.point_index
        assert smp.gt_mask[row, col]
    assert max_x1 > 250  # the extra width is used: width and height are not swapped


def test_samples_per_scene_and_small_canvas() -> None:
    stream = iter_samples(9, samples_per_scene=3)
    first = [next(stream) for _ in range(6)]
    assert first[0].scene is first[1].scene is first[2].scene
    assert first[3].scene is not first[0].scene
    with pytest.raises(ValueError):
        make_samples(1, seed=0, height=100, width=256)
