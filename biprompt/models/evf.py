"""EVF-SAM's text-to-mask model: BEiT-3 fuses image and text, its vision-CLS token is projected to
one SAM prompt token, and EVF's (fine-tuned) SAM prompt encoder and mask decoder draw the mask.

Module and key layout is the Hugging Face checkpoint's: `visual_model.*` (a full SAM),
`mm_extractor.beit3.*` (torchscale BEiT3), `text_hidden_fcs.0.{0,2}.*`. At serving time the image
encoder is left out (`with_image_encoder=False`): the pipeline's one SAM embedding feeds this model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from biprompt.errors import CheckpointError, ModelConfigError
from biprompt.models.beit3 import BEIT3_SCALES, Beit3Spec, build_beit3, get_beit3_spec
from biprompt.models.decoding import decode_pairs
from biprompt.models.sam import SAM_SCALES, SamSpec, build_sam, get_sam_spec

# Our extension of config.json for non-official (small) shapes; absent in the official files.
CUSTOM_KEY = "biprompt"


@dataclass(frozen=True)
class EvfConfig:
    hidden_size: int = 1024
    out_dim: int = 256
    mm_extractor_scale: str = "large"
    sam_scale: str = "huge"
    torch_dtype: str | None = "float16"
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    sam_spec: SamSpec = field(default_factory=lambda: get_sam_spec("huge"))
    beit3_spec: Beit3Spec = field(default_factory=lambda: get_beit3_spec("large"))

    @classmethod
    def from_dict(cls, d: dict) -> EvfConfig:
        if d.get("model_type", "evf") != "evf":
            raise ModelConfigError(f"config.json model_type is {d.get('model_type')!r}, not 'evf'")
        custom = d.get(CUSTOM_KEY) or {}
        sam_scale = d.get("sam_scale", "huge")
        if "sam_spec" in custom:
            sam_spec = SamSpec.from_dict(custom["sam_spec"])
        else:
            if sam_scale not in SAM_SCALES:
                raise ModelConfigError(
                    f"unknown sam_scale {sam_scale!r}; known: {sorted(SAM_SCALES)}"
                )
            sam_spec = get_sam_spec(sam_scale)
        scale = d.get("mm_extractor_scale", "large")
        beit3_spec = (
            Beit3Spec.from_dict(custom["beit3_spec"]) if "beit3_spec" in custom
            else get_beit3_spec(scale)
        )
        cfg = cls(
            hidden_size=int(d.get("hidden_size", beit3_spec.embed_dim)),
            out_dim=int(d.get("out_dim", sam_spec.prompt_dim)),
            mm_extractor_scale=scale,
            sam_scale=sam_scale,
            torch_dtype=d.get("torch_dtype"),
            pad_token_id=int(d.get("pad_token_id", 1)),
            bos_token_id=int(d.get("bos_token_id", 0)),
            eos_token_id=int(d.get("eos_token_id", 2)),
            sam_spec=sam_spec,
            beit3_spec=beit3_spec,
        )
        if cfg.hidden_size != beit3_spec.embed_dim:
            raise ModelConfigError(
                f"hidden_size {cfg.hidden_size} != BEiT-3 width {beit3_spec.embed_dim}"
            )
        if cfg.out_dim != sam_spec.prompt_dim:
            raise ModelConfigError(f"out_dim {cfg.out_dim} != SAM prompt dim {sam_spec.prompt_dim}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> EvfConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"could not read EVF config {path}: {exc}") from None

    def to_dict(self) -> dict:
        d = {
            "architectures": ["EvfSamModel"],
            "model_type": "evf",
            "hidden_size": self.hidden_size,
            "out_dim": self.out_dim,
            "mm_extractor_scale": self.mm_extractor_scale,
            "sam_scale": self.sam_scale,
            "torch_dtype": self.torch_dtype,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        custom = {}
        if self.sam_spec != get_sam_spec(SAM_SCALES.get(self.sam_scale, "vit_h")):
            custom["sam_spec"] = self.sam_spec.to_dict()
        if self.beit3_spec != BEIT3_SCALES.get(self.mm_extractor_scale):
            custom["beit3_spec"] = self.beit3_spec.to_dict()
        if custom:
            d[CUSTOM_KEY] = custom
        return d


class _MmExtractor(nn.Module):
    def __init__(self, beit3: nn.Module):
        super().__init__()
        self.beit3 = beit3


class EvfSam(nn.Module):
    """EVF-SAM, in the checkpoint's module layout."""

    def __init__(self, config: EvfConfig, with_image_encoder: bool = True):
        super().__init__()
        self.config = config
        self.visual_model = build_sam(config.sam_spec)
        if not with_image_encoder:
            self.visual_model.image_encoder = None
        self.mm_extractor = _MmExtractor(build_beit3(config.beit3_spec))
        d = config.hidden_size
        self.text_hidden_fcs = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, config.out_dim))]
        )

    def text_prompt(
        self, beit_images: torch.Tensor, input_ids: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """BEiT-3 over (image, text) pairs -> one SAM prompt token per pair.

        beit_images: Bx3xSxS (normalised, mean = std = 0.5); input_ids: BxT; padding: BxT bool,
        True at pad positions. Returns Bx1xC.
        """
        return self.prompt_from(self.fuse(beit_images, input_ids, padding))

    def fuse(
        self, beit_images: torch.Tensor, input_ids: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """BEiT-3's output tokens for (image, text) pairs: Bx(1+P+T)xD, the CLS token first, then
        the P image patches (row-major on BEiT-3's grid), then the T text tokens."""
        out = self.mm_extractor.beit3(
            visual_tokens=beit_images, textual_tokens=input_ids, text_padding_position=padding
        )
        return out["encoder_out"]

    def prompt_from(self, fused: torch.Tensor) -> torch.Tensor:
        """`fuse`'s tokens -> the SAM prompt token (Bx1xC), from the CLS token, as EVF-SAM."""
        return self.text_hidden_fcs[0](fused[:, :1, :])

    def decode(self, image_embeddings: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """EVF's decoder: embedding i with prompt token i -> Bx1x4hx4w low-res logits."""
        pe = self.visual_model.prompt_encoder
        b = prompt.shape[0]
        h, w = pe.image_embedding_size
        dtype = image_embeddings.dtype
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w).to(dtype)
        logits, _ = decode_pairs(
            self.visual_model.mask_decoder, image_embeddings, pe.get_dense_pe().to(dtype),
            prompt.to(dtype), dense, multimask_output=False,
        )
        return logits
