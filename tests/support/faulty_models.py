"""Model deployments that fail on purpose, for the fault tests (tests/integration/test_faults.py).

- `PoisonedImageEncoder`: the real ImageEncoder, but a batch that holds a *poisoned* image (top-left
  pixel POISON) makes the batched engine call raise, as PIL did for a 4000x3 image: the
  batch-mates must still be answered. `stats()["poisoned_batches"]` lists the sizes of the batched
  calls that held one.
- `SlowImageEncoder`, `SlowTextMask`: the real ones, each call held SLOW_S first, so that requests
  are in flight on the replica when a test kills it.
"""

from __future__ import annotations

import asyncio

import numpy as np

from deployments.encoder import ImageEncoder
from deployments.text_mask import TextMask

POISON = (1, 2, 3)
SLOW_S = 0.3


def poisoned(rgb: np.ndarray) -> np.ndarray:
    """A copy of `rgb` that PoisonedImageEncoder refuses."""
    out = np.array(rgb)
    out[0, 0] = POISON
    return out


def is_poisoned(rgb: np.ndarray) -> bool:
    return tuple(int(v) for v in rgb[0, 0]) == POISON


class PoisonedImageEncoder(ImageEncoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned_batches: list[int] = []
        embed = self.engine.embed_rgb

        def embed_unless_poisoned(rgbs):
            if any(is_poisoned(rgb) for rgb in rgbs):
                self.poisoned_batches.append(len(rgbs))
                raise ValueError("height and width must be > 0 (a poisoned test image)")
            return embed(rgbs)

        self.engine.embed_rgb = embed_unless_poisoned

    def stats(self) -> dict:
        return {**super().stats(), "poisoned_batches": list(self.poisoned_batches)}


class SlowImageEncoder(PoisonedImageEncoder):
    async def __call__(self, *args, **kwargs):
        await asyncio.sleep(SLOW_S)
        return await super().__call__(*args, **kwargs)


class SlowTextMask(TextMask):
    async def __call__(self, *args, **kwargs):
        await asyncio.sleep(SLOW_S)
        return await super().__call__(*args, **kwargs)
