"""ShapesRef v1: a synthetic referring-segmentation domain (spec: shapes-ref.md).

Coordinates. Pixel (row i, column j) covers the unit square [j, j+1) x [i, i+1) of a continuous
image plane whose origin is the top-left corner of the image; x runs right, y runs down. Shapes are
defined in that plane and rasterised by pixel-centre sampling: a pixel belongs to a shape when its
centre (j + 0.5, i + 0.5) lies inside the closed shape. Bounding boxes are integer XYXY in the same
plane, half-open in pixel terms: an object with bbox (x0, y0, x1, y1) covers pixel columns
x0..x1-1 and rows y0..y1-1, and its side is x1 - x0 == y1 - y0.

Choices the spec leaves open (all scenes still satisfy every rule of the spec):
- object count (2-5) and the nesting coin (p = 0.5) are drawn once per image and kept when a layout
  is redrawn, so they keep exactly their nominal distributions; free objects are small or large
  with p = 0.5 each, side uniform over the integer range, shape and colour uniform;
- outside the nested pair, bounding boxes keep at least `MIN_GAP` px of background between them
  (touching same-colour objects would otherwise be one blob on the image);
- the nested small object never has its host's colour (it would be invisible on it) and its side
  is drawn uniformly among the sides that fit in the host (triangle hosts take at most L / 2);
- rule 3 tries "leftmost" before "rightmost"; "leftmost" means a strictly smaller bbox centre x
  than every other object of the same colour and shape (any size);
- noise is N(0, 8^2) rounded to the nearest integer (the image is integer anyway, so
  round(clip(v + n)) == clip(v + round(n)) for integer v), drawn by an inverse-CDF table on a
  2^16 grid (tails cut at |n| = 35 = 4.4 sigma, mass ~1e-5), several times faster than normals;
- a layout that cannot be placed (or leaves an object without an expression) is redrawn whole,
  so crowded scenes (5 objects, several large) come out with somewhat smaller objects.

Points: the target pixel is drawn uniformly over the target's full silhouette; `Sample.point` is
that pixel's centre (j + 0.5, i + 0.5), not jittered, so ``int(x), int(y)`` recovers the pixel.
segment-anything adds 0.5 to prompt points itself: give it `Sample.point_index` (j, i) instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (225, 205, 50),
}
SIZES: dict[str, tuple[int, int]] = {"small": (24, 40), "large": (64, 110)}  # inclusive, px
VOCABULARY: list[str] = [
    "the", "small", "large", "red", "green", "blue", "yellow",
    "circle", "square", "triangle", "leftmost", "rightmost",
]  # fmt: skip
COLOUR_JITTER = 15
BACKGROUND_RANGE = (90, 160)  # inclusive, per channel
NOISE_SIGMA = 8.0
MIN_OBJECTS, MAX_OBJECTS = 2, 5
NEST_PROBABILITY = 0.5
MIN_GAP = 2  # px of background between bounding boxes outside the nested pair
MIN_CANVAS = 128  # px, both sides
_PLACEMENT_TRIES = 64
_MAX_REDRAWS = 1000


@dataclass(frozen=True)
class Variation:
    """A wider distribution than the spec's, for training models that must hold on scenes drawn
    by other generators (`generate_scene(..., variation=WIDE)`). Every field widens one choice:
    colour jitter and sizes a little past the spec's limits, background range, a noise sigma drawn
    per image, the gap between free bounding boxes drawn per image (0 lets boxes touch, which the
    spec allows), shapes rasterised a little smaller than their box at a sub-pixel offset (other
    rasterisers put edges elsewhere), a Gaussian blur before the noise on some images (soft,
    anti-aliased edges), and a nested object of its host's colour now and then (the spec does not
    forbid it; only the two objects' own colour jitter tells them apart). Ground truth is always
    the silhouette actually drawn."""

    colour_jitter: int = 24
    sizes: tuple[tuple[str, tuple[int, int]], ...] = (("small", (20, 44)), ("large", (58, 118)))
    background_range: tuple[int, int] = (78, 172)
    noise_sigma: tuple[float, float] = (2.0, 13.0)
    gaps: tuple[int, ...] = (0, 1, 2, 3, 5)
    min_scale: float = 0.93
    blur_p: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 0.9)
    nest_same_colour_p: float = 0.25

    def size_range(self, size: str) -> tuple[int, int]:
        return dict(self.sizes)[size]


WIDE = Variation()


@dataclass(eq=False)
class ShapeObject:
    """One drawn object. `mask` is its full HxW bool silhouette (also where covered)."""

    shape: str
    colour: str
    size: str  # "small" | "large"
    rgb: tuple[int, int, int]  # jittered colour actually drawn, before noise
    bbox: tuple[int, int, int, int]  # XYXY px, x1 - x0 == y1 - y0 == side
    mask: np.ndarray  # (H, W) bool, read-only

    @property
    def side(self) -> int:
        return self.bbox[2] - self.bbox[0]

    @property
    def center_x(self) -> float:
        return (self.bbox[0] + self.bbox[2]) / 2


@dataclass(eq=False)
class Scene:
    """An image and its objects, in drawing order (a nested object comes after its host)."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: list[ShapeObject]
    size: tuple[int, int]  # (height, width) px
    background: tuple[int, int, int]
    nested: tuple[int, int] | None  # (host index, nested small index), or None
    expressions: list[str]  # expressions[i] = expression_for(scene, i)


@dataclass(eq=False)
class Sample:
    """(image, target, point, expression, ground truth) - see the module docstring for units."""

    image: np.ndarray  # (H, W, 3) uint8, shared with `scene`
    target: int  # index into scene.objects
    point: tuple[float, float]  # (x, y) px, centre of the drawn pixel
    label: int  # always 1 (foreground)
    expression: str
    gt_mask: np.ndarray  # (H, W) bool, the target's full silhouette (read-only)
    ambiguous: bool  # the point's pixel belongs to two objects
    scene: Scene

    @property
    def point_index(self) -> tuple[int, int]:
        """(column, row) of the point's pixel: the convention of segment-anything prompts."""
        return int(self.point[0]), int(self.point[1])

    @property
    def target_object(self) -> ShapeObject:
        return self.scene.objects[self.target]


class _Describable(Protocol):
    shape: str
    colour: str
    size: str

    @property
    def center_x(self) -> float: ...


@dataclass
class _Spec:
    shape: str
    colour: str
    size: str
    side: int
    x0: int = 0
    y0: int = 0

    @property
    def center_x(self) -> float:
        return self.x0 + self.side / 2


# --- geometry ---------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool raster of `shape` with bounding box [0, side)^2, by pixel-centre sampling.

    Triangle: apex at (side / 2, 0), base from (0, side) to (side, side). The result is cached and
    read-only.
    """
    c = np.arange(side, dtype=np.float64) + 0.5
    h = side / 2
    if shape == "square":
        m = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        m = (c[:, None] - h) ** 2 + (c[None, :] - h) ** 2 <= h * h
    elif shape == "triangle":
        m = np.abs(c[None, :] - h) <= c[:, None] / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    m.setflags(write=False)
    return m


def _inside(shape: str, side: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y), relative to the shape's bbox top-left, lie in the closed shape."""
    h = side / 2
    box = (x >= 0) & (x <= side) & (y >= 0) & (y <= side)
    if shape == "square":
        return box
    if shape == "circle":
        return (x - h) ** 2 + (y - h) ** 2 <= h * h
    return box & (np.abs(x - h) <= y / 2)


def _max_nested_side(shape: str, side: int) -> int:
    """Largest square side that fits inside the closed shape of bbox side `side`."""
    if shape == "square":
        return side
    if shape == "circle":
        return int(math.floor(side / math.sqrt(2)))
    return side // 2  # triangle: top corners at depth d need d >= s, and d + s <= side


# --- expressions ------------------------------------------------------------------------------


def expression_for(scene: Scene | Sequence[_Describable], index: int) -> str | None:
    """The first of spec rules 1-3 that picks out exactly object `index`, or None."""
    objs = scene.objects if isinstance(scene, Scene) else scene
    t = objs[index]
    same = [o for o in objs if o.colour == t.colour and o.shape == t.shape]
    if len(same) == 1:
        return f"the {t.colour} {t.shape}"
    if sum(o.size == t.size for o in same) == 1:
        return f"the {t.size} {t.colour} {t.shape}"
    others = [o.center_x for o in same if o is not t]
    if t.center_x < min(others):
        return f"the leftmost {t.colour} {t.shape}"
    if t.center_x > max(others):
        return f"the rightmost {t.colour} {t.shape}"
    return None


def resolve(scene: Scene | Sequence[_Describable], expression: str) -> list[int]:
    """Indices of the objects an expression of the ShapesRef grammar refers to (ties kept)."""
    objs = scene.objects if isinstance(scene, Scene) else scene
    words = expression.split()
    if len(words) not in (3, 4) or words[0] != "the":
        raise ValueError(f"not a ShapesRef expression: {expression!r}")
    colour, shape = words[-2], words[-1]
    hits = [i for i, o in enumerate(objs) if o.colour == colour and o.shape == shape]
    if len(words) == 3 or not hits:
        return hits
    mod = words[1]
    if mod in SIZES:
        return [i for i in hits if objs[i].size == mod]
    xs = [objs[i].center_x for i in hits]
    if mod == "leftmost":
        return [i for i, x in zip(hits, xs, strict=True) if x == min(xs)]
    if mod == "rightmost":
        return [i for i, x in zip(hits, xs, strict=True) if x == max(xs)]
    raise ValueError(f"not a ShapesRef expression: {expression!r}")


# --- layout -----------------------------------------------------------------------------------


def _place_free(rng: np.random.Generator, specs: list[_Spec], height: int, width: int,
                gap: int = MIN_GAP) -> bool:
    """Place specs (in place) with bboxes `gap` px apart, largest first; False on failure."""
    boxes = np.empty((0, 4), dtype=np.int64)
    for spec in sorted(specs, key=lambda s: -s.side):
        s = spec.side
        xs = rng.integers(0, width - s + 1, _PLACEMENT_TRIES)
        ys = rng.integers(0, height - s + 1, _PLACEMENT_TRIES)
        if len(boxes):
            g = gap
            clash = (
                (xs[:, None] < boxes[None, :, 2] + g)
                & (xs[:, None] + s + g > boxes[None, :, 0])
                & (ys[:, None] < boxes[None, :, 3] + g)
                & (ys[:, None] + s + g > boxes[None, :, 1])
            ).any(axis=1)
            free = np.flatnonzero(~clash)
            if free.size == 0:
                return False
            k = int(free[0])
        else:
            k = 0
        spec.x0, spec.y0 = int(xs[k]), int(ys[k])
        boxes = np.vstack([boxes, [spec.x0, spec.y0, spec.x0 + s, spec.y0 + s]])
    return True


def _place_nested(rng: np.random.Generator, host: _Spec, guest: _Spec) -> bool:
    """Place `guest` so that its whole bbox lies in `host`'s closed silhouette."""
    span = host.side - guest.side
    xs = rng.integers(0, span + 1, _PLACEMENT_TRIES)
    ys = rng.integers(0, span + 1, _PLACEMENT_TRIES)
    ok = np.ones(_PLACEMENT_TRIES, dtype=bool)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # the shapes are convex: corners suffice
        ok &= _inside(host.shape, host.side, xs + dx * guest.side, ys + dy * guest.side)
    good = np.flatnonzero(ok)
    if good.size == 0:
        return False
    k = int(good[0])
    guest.x0, guest.y0 = host.x0 + int(xs[k]), host.y0 + int(ys[k])
    return True


def _random_spec(rng: np.random.Generator, size: str, sizes=SIZES) -> _Spec:
    lo, hi = sizes[size]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return _Spec(shape, colour, size, int(rng.integers(lo, hi + 1)))


def _layout(
    rng: np.random.Generator, n: int, nested: bool, height: int, width: int,
    ranges: dict[str, tuple[int, int]] = SIZES, gap: int = MIN_GAP, same_colour_p: float = 0.0,
) -> list[_Spec] | None:
    """n placed specs (the nested guest last, its host first), or None if placement failed."""
    n_free = n - 1 if nested else n
    sizes = ["large" if rng.random() < 0.5 else "small" for _ in range(n_free)]
    if nested:
        sizes[0] = "large"
    specs = [_random_spec(rng, size, ranges) for size in sizes]
    if not _place_free(rng, specs, height, width, gap):
        return None
    if nested:
        host = specs[0]
        lo, hi = ranges["small"]
        hi = min(hi, _max_nested_side(host.shape, host.side))
        colours = [c for c in COLOURS if c != host.colour]
        if same_colour_p and rng.random() < same_colour_p:
            colours = [host.colour]
        guest = _Spec(
            SHAPES[int(rng.integers(len(SHAPES)))],
            colours[int(rng.integers(len(colours)))],
            "small",
            int(rng.integers(lo, hi + 1)),
        )
        if not _place_nested(rng, host, guest):
            return None
        specs.append(guest)
    return specs


# --- rendering --------------------------------------------------------------------------------


def varied_shape_mask(shape: str, side: int, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """`shape_mask`, drawn at a random scale in [min_scale, 1] of its box and a random sub-pixel
    offset that keeps it inside the box: where another rasteriser would put the edges."""
    h = side / 2
    r = h * rng.uniform(min_scale, 1.0)
    cx, cy = h + rng.uniform(-1, 1, size=2) * (h - r)
    c = np.arange(side, dtype=np.float64) + 0.5
    x, y = c[None, :], c[:, None]
    if shape == "square":
        m = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif shape == "circle":
        m = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "triangle":
        top = cy - r
        m = (y >= top) & (y <= cy + r) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


@lru_cache(maxsize=128)
def _noise_table(sigma: float = NOISE_SIGMA, bits: int = 16) -> np.ndarray:
    """Inverse CDF of round(N(0, sigma^2)) at the 2^bits mid-quantiles, int8 (|n| <= 4.4 sigma)."""
    ks = np.arange(-int(12 * sigma), int(12 * sigma) + 1)
    cdf = np.array([0.5 * (1 + math.erf((k + 0.5) / (sigma * math.sqrt(2)))) for k in ks])
    u = (np.arange(2**bits) + 0.5) / 2**bits
    table = ks[np.minimum(np.searchsorted(cdf, u, side="left"), len(ks) - 1)].astype(np.int8)
    table.setflags(write=False)
    return table


def add_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> np.ndarray:
    """`image` (H, W, 3) uint8 plus rounded Gaussian noise of `sigma` (the spec's 8), clipped."""
    raw = rng.bit_generator.random_raw((image.size + 3) // 4)  # uint64: four 16-bit draws each
    u = raw.view(np.uint16)[: image.size].reshape(image.shape)
    noisy = image.astype(np.int16)
    noisy += np.take(_noise_table(sigma), u)
    np.clip(noisy, 0, 255, out=noisy)
    return noisy.astype(np.uint8)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def _check_canvas(height: int, width: int) -> None:
    if height < MIN_CANVAS or width < MIN_CANVAS:
        raise ValueError(f"canvas {width}x{height} is smaller than {MIN_CANVAS} px")


def generate_scene(
    rng: np.random.Generator, height: int = 256, width: int = 256, *, noise: bool = True,
    variation: Variation | None = None,
) -> Scene:
    """Draw one ShapesRef scene of `height` x `width` px; `noise=False` skips the final noise.

    `variation` (training only) widens the distribution past the spec; None draws to the spec."""
    _check_canvas(height, width)
    v = variation
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    nested = bool(rng.random() < NEST_PROBABILITY)
    lo, hi = BACKGROUND_RANGE if v is None else v.background_range
    background = tuple(int(c) for c in rng.integers(lo, hi + 1, size=3))
    ranges = SIZES if v is None else dict(v.sizes)
    gap = MIN_GAP if v is None else int(v.gaps[rng.integers(len(v.gaps))])
    jitter = COLOUR_JITTER if v is None else v.colour_jitter
    for _ in range(_MAX_REDRAWS):
        specs = _layout(rng, n, nested, height, width, ranges, gap,
                        0.0 if v is None else v.nest_same_colour_p)
        if specs is None:
            continue
        expressions = [expression_for(specs, i) for i in range(n)]
        if all(e is not None for e in expressions):
            break
    else:
        raise RuntimeError(f"no valid {n}-object layout on a {width}x{height} canvas")

    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = np.tile(np.array(background, dtype=np.uint8), (width, 1))  # row broadcast: fast
    objects = []
    for spec in specs:
        base = np.array(COLOURS[spec.colour])
        rgb = np.clip(base + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
        x0, y0, x1, y1 = spec.x0, spec.y0, spec.x0 + spec.side, spec.y0 + spec.side
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = (shape_mask(spec.shape, spec.side) if v is None else
                              varied_shape_mask(spec.shape, spec.side, rng, v.min_scale))
        mask.setflags(write=False)
        np.copyto(image[y0:y1, x0:x1], rgb.astype(np.uint8), where=mask[y0:y1, x0:x1, None])
        rgb_t = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
        objects.append(
            ShapeObject(spec.shape, spec.colour, spec.size, rgb_t, (x0, y0, x1, y1), mask)
        )
    if v is not None and rng.random() < v.blur_p:
        image = _blur(image, float(rng.uniform(*v.blur_sigma)))
    if noise:
        sigma = NOISE_SIGMA if v is None else float(np.round(rng.uniform(*v.noise_sigma), 1))
        image = add_noise(image, rng, sigma)
    return Scene(
        image=image,
        objects=objects,
        size=(height, width),
        background=background,  # type: ignore[arg-type]
        nested=(0, n - 1) if nested else None,
        expressions=expressions,  # type: ignore[arg-type]
    )


# --- samples ----------------------------------------------------------------------------------


def sample_from_scene(scene: Scene, rng: np.random.Generator, target: int | None = None) -> Sample:
    """A sample of `scene`: a uniformly random target (unless given) and a uniform point on it."""
    if target is None:
        target = int(rng.integers(len(scene.objects)))
    obj = scene.objects[target]
    x0, y0, x1, y1 = obj.bbox
    on = np.flatnonzero(obj.mask[y0:y1, x0:x1])
    row, col = divmod(int(on[rng.integers(on.size)]), x1 - x0)
    row, col = row + y0, col + x0
    covering = sum(bool(o.mask[row, col]) for o in scene.objects)
    return Sample(
        image=scene.image,
        target=target,
        point=(col + 0.5, row + 0.5),
        label=1,
        expression=scene.expressions[target],
        gt_mask=obj.mask,
        ambiguous=covering >= 2,
        scene=scene,
    )


def iter_samples(
    seed: int | np.random.SeedSequence | None,
    height: int = 256,
    width: int = 256,
    *,
    noise: bool = True,
    samples_per_scene: int = 1,
) -> Iterator[Sample]:
    """Endless, seed-deterministic stream of samples, `samples_per_scene` per fresh scene."""
    _check_canvas(height, width)
    rng = np.random.default_rng(seed)
    while True:
        scene = generate_scene(rng, height, width, noise=noise)
        for _ in range(samples_per_scene):
            yield sample_from_scene(scene, rng)


def make_samples(
    n: int,
    seed: int | np.random.SeedSequence | None,
    height: int = 256,
    width: int = 256,
    *,
    noise: bool = True,
) -> list[Sample]:
    """The first `n` samples of `iter_samples(seed, height, width)` (one scene per sample)."""
    return list(itertools.islice(iter_samples(seed, height, width, noise=noise), n))
