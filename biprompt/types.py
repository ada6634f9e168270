"""Results the pipeline hands back: an image embedding, point candidates, a segmentation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ImageEmbedding:
    """One SAM encoder pass over one image, plus what decoding needs later.

    embedding: 1xCxhxw (C=256, h=w=64 for the official models); beit_image: 1x3xSxS, the
    text model's view of the same image (None for a point-only pipeline).
    """

    embedding: torch.Tensor
    original_size: tuple[int, int]  # (h, w) of the caller's image
    input_size: tuple[int, int]  # (h, w) after resize-longest-side, before padding
    model_id: str
    beit_image: torch.Tensor | None = None
    image_id: str | None = None  # set by serving: sha256 of the image bytes


@dataclass
class PointCandidates:
    """SAM's output for one prompt: KxHxW masks, (K,) predicted IoUs, Kx4hx4w low-res logits;
    K = 3 (multimask) or 1 (single-mask, refinement)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray


@dataclass
class SegmentResult:
    mask: np.ndarray  # HxW bool: the answer
    candidates: np.ndarray | None  # 3xHxW bool, SAM's part / object / whole (None: no points)
    candidate_scores: np.ndarray | None  # (3,) SAM's predicted IoUs
    text_mask: np.ndarray | None  # HxW bool, EVF-SAM's mask for the text (None: no text)
    text_ious: np.ndarray | None  # (3,) each candidate's IoU with the text mask
    selected: int | None  # index into candidates (None in text mode without points)
    strategy: str
    agreement: float | None
    mode: str
    expert_masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> HxW bool
    expert_ious: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (K,) per candidate
    # the selected candidate's LxL low-res logits: the next refinement click's mask_input
    low_res_logits: np.ndarray | None = None
    expert_agreement: float | None = None  # lowest IoU between two voting experts' masks
