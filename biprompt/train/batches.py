"""Training scenes for the demo model: canvases, fresh batches (stage 1's points, stage 2's
expressions) and the text stages' pool of scenes encoded once by the frozen image encoder.

Scenes come from `biprompt.data.shapes_ref` at mixed canvas sizes, so the same checkpoint serves
256x256 and 320x240; every draw is from a seeded `np.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from biprompt.data.shapes_ref import WIDE, Scene, Variation, generate_scene
from biprompt.preprocess import beit3_input, sam_normalize_pad, sam_resize, transform_coords

# (height, width) of training canvases and how often each is drawn
CANVASES = (((256, 256), 0.6), ((240, 320), 0.2), ((320, 240), 0.1), ((224, 288), 0.1))
# With the wide distribution, this share of canvases has sides drawn uniformly in FREE_SIDES
FREE_CANVAS_P, FREE_SIDES = 0.3, (192, 336)


def draw_canvas(rng: np.random.Generator, variation: Variation | None,
                canvases: tuple = CANVASES) -> tuple[int, int]:
    """(height, width) of one training scene: the listed canvases (((h, w), weight) pairs), and
    with a variation also free ones, so the model meets other sizes and aspect ratios than those
    it is scored on."""
    if variation is not None and rng.random() < FREE_CANVAS_P:
        lo, hi = FREE_SIDES
        return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    canvases, weights = zip(*canvases, strict=True)
    return canvases[rng.choice(len(canvases), p=np.array(weights) / sum(weights))]


def scene_variation(wide: bool) -> Variation | None:
    return WIDE if wide else None


def reweighted_canvases(weights: str) -> tuple:
    """CANVASES with other weights, from "w1,w2,..." in CANVASES' order (a CLI's --canvas-weights)."""
    try:
        values = [float(v) for v in weights.split(",")]
    except ValueError:
        values = []
    if (len(values) != len(CANVASES) or not np.isfinite(values).all() or min(values) < 0
            or sum(values) <= 0):
        sizes = ", ".join(f"{w}x{h}" for (h, w), _ in CANVASES)
        raise ValueError(f"--canvas-weights needs {len(CANVASES)} non-negative weights, not all "
                         f"zero, one per canvas ({sizes}); got {weights!r}")
    return tuple((size, v) for (size, _), v in zip(CANVASES, values, strict=True))


@dataclass
class Batch:
    images: torch.Tensor  # Bx3xSxS, SAM-normalised and padded
    beit: torch.Tensor  # Bx3xsxs, BEiT-3's view
    coords: torch.Tensor  # BKx1x2, model frame
    gt: torch.Tensor  # BKx1xSxS float, the loss target in the padded model frame
    texts: list[str]  # BK expressions of the drawn targets (stage 2)


def _gt_frame(mask: np.ndarray, input_size: tuple[int, int], size: int) -> torch.Tensor:
    """A full-size bool mask -> SxS float in the padded model frame (as the image was resized)."""
    h, w = input_size
    if mask.shape != (h, w):
        img = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
        mask = np.asarray(img) >= 128
    out = torch.zeros(size, size)
    out[:h, :w] = torch.from_numpy(mask.astype(np.float32))
    return out


def make_batch(rng: np.random.Generator, n_images: int, prompts: int, size: int,
               beit_size: int, text_targets: bool = False,
               variation: Variation | None = None, canvases: tuple = CANVASES) -> Batch:
    """`prompts` per scene. Stage 1 (points): a point uniform on a random object; the loss target
    is sampled among the objects under it. Stage 2 (text): the target is the object itself.
    `variation` draws scenes (and canvases) from a wider distribution than the spec's;
    `canvases` reweights the canvas sizes (`draw_canvas`)."""
    images, beit, coords, gts, texts = [], [], [], [], []
    for _ in range(n_images):
        h, w = draw_canvas(rng, variation, canvases)
        scene: Scene = generate_scene(rng, h, w, variation=variation)
        x = sam_resize(scene.image, size)
        input_size = (x.shape[-2], x.shape[-1])
        images.append(sam_normalize_pad(x, size))
        beit.append(beit3_input(scene.image, beit_size))
        for _ in range(prompts):
            t = int(rng.integers(len(scene.objects)))
            obj = scene.objects[t]
            ys, xs = np.nonzero(obj.mask)
            j = int(rng.integers(len(ys)))
            row, col = int(ys[j]), int(xs[j])
            if not text_targets:
                under = [i for i, o in enumerate(scene.objects) if o.mask[row, col]]
                t = int(under[rng.integers(len(under))])
            coords.append(transform_coords(np.array([[col, row]], dtype=np.float64), (h, w), size))
            gts.append(_gt_frame(scene.objects[t].mask, input_size, size))
            texts.append(scene.expressions[t])
    return Batch(torch.cat(images), torch.cat(beit),
                 torch.as_tensor(np.stack(coords), dtype=torch.float32),
                 torch.stack(gts)[:, None], texts)


class TextBatch(NamedTuple):
    """A text step's batch from a TextPool, one row per (scene, expression)."""

    emb: torch.Tensor  # BxCxhxw, the frozen SAM embeddings
    beit: torch.Tensor  # Bx3xsxs, BEiT-3's view
    texts: list[str]  # B expressions
    target: torch.Tensor  # Bx1x(S/2)x(S/2), the mask loss's soft target
    patches: torch.Tensor | None  # Bxgxg, the target on BEiT-3's patch grid (a pool with grid)


def patch_target(mask: np.ndarray, grid: int) -> torch.Tensor:
    """A full-size bool mask -> gxg float: the share of each BEiT-3 patch it covers, in BEiT-3's
    view of the whole image (beit3_input resizes it to a square, whatever its aspect)."""
    full = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(full, grid)[0, 0]


class TextPool:
    """Scenes for the text stages, each drawn and encoded once (the image encoder is frozen
    there): its SAM embedding, BEiT-3's view, and per object its expression and its target at
    half the model's input size (the loss's, as `mask_losses` area-averages it), stored as
    quarters in uint8, so the values are exactly those of a fresh batch.

    Drawing and encoding a scene cost about 40% of a fresh text step; a pool pays that once per
    scene and every step draws new (scene, expression) pairs from it.

    grid: also keep each object's target on BEiT-3's gxg patch grid (`patch_target`), for the
    grounding loss (biprompt.train.grounding); 0: none. It draws nothing from `rng`."""

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], n: int,
                 rng: np.random.Generator, size: int, beit_size: int,
                 variation: Variation | None = None, batch: int = 16, quiet: bool = True,
                 grid: int = 0):
        if n < 1:
            raise ValueError(f"a text pool needs at least one scene, got {n}")
        embs, beits, self.quarters, self.texts = [], [], [], []
        self.patches: list[torch.Tensor] = []
        self.objects: list[range] = []  # per scene, the indices of its objects
        for start in tqdm(range(0, n, batch), desc="pool", unit="batch", disable=quiet):
            images = []
            for _ in range(start, min(n, start + batch)):
                h, w = draw_canvas(rng, variation)
                scene = generate_scene(rng, h, w, variation=variation)
                x = sam_resize(scene.image, size)
                input_size = (x.shape[-2], x.shape[-1])
                images.append(sam_normalize_pad(x, size))
                beits.append(beit3_input(scene.image, beit_size))
                first = len(self.texts)
                for obj, text in zip(scene.objects, scene.expressions, strict=True):
                    half = F.avg_pool2d(_gt_frame(obj.mask, input_size, size)[None, None], 2)
                    self.quarters.append((half[0, 0] * 4).round().to(torch.uint8))
                    self.texts.append(text)
                    if grid:
                        self.patches.append(patch_target(obj.mask, grid))
                self.objects.append(range(first, len(self.texts)))
            with torch.no_grad():
                embs.append(encoder(torch.cat(images)))
        self.emb, self.beit = torch.cat(embs), torch.cat(beits)

    def __len__(self) -> int:
        return len(self.objects)

    def batch(self, rng: np.random.Generator, images: int, prompts: int, distinct: bool = False
              ) -> TextBatch:
        """`images` scenes (with replacement), `prompts` expressions each, the object uniform
        among the scene's (TextBatch: patches is None unless the pool was built with a grid).

        distinct: a scene's first prompts name different objects (a random order of all of them,
        then uniform draws once every object is named), so one image is asked for several of
        its objects and only the words tell them apart; each object stays equally likely."""
        scenes, objects = [], []
        for s in rng.integers(len(self.objects), size=images):
            own = self.objects[int(s)]
            if distinct:
                picks = list(rng.permutation(len(own))[:prompts])
                picks += list(rng.integers(len(own), size=prompts - len(picks)))
            else:
                picks = [rng.integers(len(own)) for _ in range(prompts)]
            for j in picks:
                scenes.append(int(s))
                objects.append(own[int(j)])
        target = torch.stack([self.quarters[o] for o in objects])[:, None].float() / 4
        patches = torch.stack([self.patches[o] for o in objects]) if self.patches else None
        return TextBatch(self.emb[scenes], self.beit[scenes], [self.texts[o] for o in objects],
                         target, patches)
