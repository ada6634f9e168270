"""A grounding loss for training the text expert: BEiT-3's image patches say where the object is.

EVF-SAM's only output is its CLS token, turned into one SAM prompt token, so the mask loss reaches
BEiT-3 through SAM's decoder and one vector: a weak signal for learning which patches an
expression names, and the slowest thing the demo text expert learns. This loss adds a direct one.
A linear head reads each of BEiT-3's output patch tokens and predicts how much of that patch the
named object covers (batches.patch_target); BCE + Dice against that. The head exists only while
training: it is not part of EVF-SAM's checkpoint layout, which stays as it was, and serving never
computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroundingHead(nn.Module):
    """Patch tokens (BxPxD, the P = gxg image patches of `EvfSam.fuse`) -> Bxgxg logits."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(dim, 1)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        patches = fused[:, 1:1 + self.grid * self.grid, :]  # after the CLS token
        return self.proj(patches).squeeze(-1).unflatten(1, (self.grid, self.grid))


def grounding_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bxgxg logits against Bxgxg soft targets (each patch's covered share): mean BCE + Dice.
    Dice keeps a one-patch object from drowning in the background cells' BCE."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()
