"""A second ShapesRef generator, written from `shapes-ref.md` alone (not from shapes_ref.py's
drawing code), to check that scores hold on scenes drawn another way.

    python -m biprompt.evaluate shapes --generator b --n 500 --seed 12345

Where the spec leaves room, this one chooses differently from the first generator, as another
team's would: shapes are rasterised by PIL's ImageDraw (its own circle and triangle edges);
objects are placed by rejection sampling over the whole canvas, large ones first; the nested
small object is put at a uniformly drawn position among all those where its bounding box lies
inside the host's silhouette; noise comes from numpy's normal sampler per pixel and channel.
It shares only the data model (`Sample`, `Scene`, `ShapeObject`), so evaluation code runs
unchanged on either.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from biprompt.data.shapes_ref import Sample, Scene, ShapeObject

BASE_RGB = {"red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220),
            "yellow": (225, 205, 50)}
SHAPE_NAMES = ("circle", "square", "triangle")
SIDES = {"small": (24, 40), "large": (64, 110)}
JITTER, NOISE_SIGMA, BG_RANGE = 15, 8.0, (90, 160)
MIN_SIDE_PX = 128
_TRIES = 200


def silhouette(shape: str, x0: int, y0: int, side: int, height: int, width: int) -> np.ndarray:
    """The shape's filled HxW bool mask, drawn by PIL inside the box (x0, y0, side, side)."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + side - 1, y0 + side - 1  # PIL boxes include their last pixel
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=1)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=1)
    elif shape == "triangle":  # upright isosceles: base at the bottom, apex at the top centre
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.array(canvas, dtype=bool)


def _boxes_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax < bx + bside and bx < ax + aside and ay < by + bside and by < ay + aside


def _describe(objs: list[ShapeObject], i: int) -> str | None:
    """The spec's expression for object i: the first form that picks out exactly it."""
    o = objs[i]
    same = [j for j, p in enumerate(objs) if p.colour == o.colour and p.shape == o.shape]
    if same == [i]:
        return f"the {o.colour} {o.shape}"
    if [j for j in same if objs[j].size == o.size] == [i]:
        return f"the {o.size} {o.colour} {o.shape}"
    xs = sorted((objs[j].center_x, j) for j in same)
    if xs[0][1] == i and xs[0][0] < xs[1][0]:
        return f"the leftmost {o.colour} {o.shape}"
    if xs[-1][1] == i and xs[-1][0] > xs[-2][0]:
        return f"the rightmost {o.colour} {o.shape}"
    return None


def _try_scene(rng: np.random.Generator, height: int, width: int, nest: bool) -> Scene | None:
    count = int(rng.integers(2, 6))
    sizes = [str(rng.choice(["small", "large"])) for _ in range(count)]
    if nest:  # the pair: one large host and one small guest among the objects
        sizes[0], sizes[1] = "large", "small"
    kinds = [(str(rng.choice(SHAPE_NAMES)), str(rng.choice(list(BASE_RGB)))) for _ in sizes]
    sides = [int(rng.integers(SIDES[s][0], SIDES[s][1] + 1)) for s in sizes]
    guest = 1 if nest else None
    order = sorted((i for i in range(count) if i != guest), key=lambda i: -sides[i])
    boxes: dict[int, tuple[int, int, int]] = {}
    for i in order:  # free objects: bounding boxes pairwise apart, inside the canvas
        for _ in range(_TRIES):
            box = (int(rng.integers(0, width - sides[i] + 1)),
                   int(rng.integers(0, height - sides[i] + 1)), sides[i])
            if not any(_boxes_overlap(box, b) for b in boxes.values()):
                boxes[i] = box
                break
        else:
            return None
    masks = {i: silhouette(kinds[i][0], *boxes[i], height, width) for i in boxes}
    if guest is not None:
        host_mask, side = masks[0], sides[guest]
        # every top-left corner whose side x side box lies inside the host's silhouette
        integral = np.pad(host_mask.astype(np.int32), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        full = (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side]
                + integral[:-side, :-side]) == side * side
        ys, xs = np.nonzero(full)
        if len(ys) == 0:
            return None
        k = int(rng.integers(len(ys)))
        boxes[guest] = (int(xs[k]), int(ys[k]), side)
        masks[guest] = silhouette(kinds[guest][0], *boxes[guest], height, width)
    draw_order = [i for i in range(count) if i != guest] + ([guest] if guest is not None else [])
    bg = tuple(int(v) for v in rng.integers(BG_RANGE[0], BG_RANGE[1] + 1, size=3))
    image = np.empty((height, width, 3), dtype=np.float64)
    image[:] = bg
    objects = []
    for i in draw_order:
        shape, colour = kinds[i]
        rgb = tuple(int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255))
                    for c in BASE_RGB[colour])
        image[masks[i]] = rgb
        x, y, side = boxes[i]
        m = masks[i]
        m.setflags(write=False)
        objects.append(ShapeObject(shape, colour, sizes[i], rgb, (x, y, x + side, y + side), m))
    expressions = [_describe(objects, i) for i in range(len(objects))]
    if any(e is None for e in expressions):
        return None
    image += rng.normal(0.0, NOISE_SIGMA, size=image.shape)
    out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    nested = (0, len(objects) - 1) if guest is not None else None
    return Scene(out, objects, (height, width), bg, nested, expressions)  # type: ignore[arg-type]


def generate_scene(rng: np.random.Generator, height: int = 256, width: int = 256) -> Scene:
    if height < MIN_SIDE_PX or width < MIN_SIDE_PX:
        raise ValueError(f"canvas {width}x{height} is smaller than {MIN_SIDE_PX} px")
    nest = bool(rng.random() < 0.5)  # decided once, so redraws keep the spec's 0.5
    while True:  # a scene that can't be placed or described is drawn again
        scene = _try_scene(rng, height, width, nest)
        if scene is not None:
            return scene


def sample_from_scene(scene: Scene, rng: np.random.Generator) -> Sample:
    """A target uniform over the objects, a point uniform over its full silhouette."""
    t = int(rng.integers(len(scene.objects)))
    mask = scene.objects[t].mask
    ys, xs = np.nonzero(mask)
    k = int(rng.integers(len(ys)))
    row, col = int(ys[k]), int(xs[k])
    covering = sum(bool(o.mask[row, col]) for o in scene.objects)
    return Sample(scene.image, t, (col + 0.5, row + 0.5), 1, scene.expressions[t], mask,
                  covering >= 2, scene)


def iter_samples(seed, height: int = 256, width: int = 256) -> Iterator[Sample]:
    rng = np.random.default_rng(seed)
    while True:
        yield sample_from_scene(generate_scene(rng, height, width), rng)


def make_samples(n: int, seed, height: int = 256, width: int = 256) -> list[Sample]:
    """The first `n` samples of `seed`, one scene each."""
    return list(itertools.islice(iter_samples(seed, height, width), n))
