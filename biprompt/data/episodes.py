"""Reference episodes on ShapesRef: (a target sample, a reference scene with one annotated object).

The reference object has the target's colour, shape and size class ("segment things like this
one"), drawn from a fresh scene of the same generator. The reference expert can't tell two such
objects in the target scene apart (the point does), so its own training target is the union of
them (`class_mask`); the episode's ground truth stays the sample's target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from biprompt.data.shapes_ref import Sample, Scene, ShapeObject

MAX_TRIES = 500


def object_class(obj: ShapeObject) -> tuple[str, str, str]:
    return obj.colour, obj.shape, obj.size


def class_mask(scene: Scene, key: tuple[str, str, str]) -> np.ndarray:
    """HxW bool union of the scene's objects of class `key`."""
    out = np.zeros(scene.size, dtype=bool)
    for o in scene.objects:
        if object_class(o) == key:
            out |= o.mask
    return out


@dataclass(eq=False)
class Episode:
    sample: Sample
    reference: Scene
    reference_object: int  # index into reference.objects

    @property
    def reference_mask(self) -> np.ndarray:
        return self.reference.objects[self.reference_object].mask

    @property
    def unique(self) -> bool:
        """The target is the only object of its class in its scene."""
        key = object_class(self.sample.target_object)
        return sum(object_class(o) == key for o in self.sample.scene.objects) == 1


def reference_for(sample: Sample, generate: Callable[..., Scene], rng: np.random.Generator,
                  height: int, width: int) -> Episode:
    """Draw scenes from `generate(rng, height, width)` until one holds an object of the target's
    class; the first such object is the reference."""
    key = object_class(sample.target_object)
    for _ in range(MAX_TRIES):
        scene = generate(rng, height, width)
        for i, o in enumerate(scene.objects):
            if object_class(o) == key:
                return Episode(sample, scene, i)
    raise RuntimeError(f"no reference scene with a {' '.join(key)} in {MAX_TRIES} draws")


def make_episodes(samples: list[Sample], generate: Callable[..., Scene], seed: int,
                  height: int, width: int) -> list[Episode]:
    """One episode per sample, references from their own seeded stream."""
    rng = np.random.default_rng([seed, 0x5EF])
    return [reference_for(s, generate, rng, height, width) for s in samples]
