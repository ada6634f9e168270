"""BEiT-3 from torchscale, in the configurations EVF-SAM uses (and small custom ones)."""

from __future__ import annotations

from dataclasses import dataclass

from torchscale.architecture.config import EncoderConfig
from torchscale.model.BEiT3 import BEiT3

import biprompt._compat  # noqa: F401  (torchscale imports timm; see _compat)
from biprompt.errors import ModelConfigError
from biprompt.models.spec import SpecDict


@dataclass(frozen=True)
class Beit3Spec(SpecDict):
    embed_dim: int = 1024
    layers: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    img_size: int = 224
    patch_size: int = 16
    vocab_size: int = 64010
    max_source_positions: int = 1024


BEIT3_SCALES: dict[str, Beit3Spec] = {
    "large": Beit3Spec(),
    "base": Beit3Spec(embed_dim=768, layers=12, heads=12, ffn_dim=3072),
}


def get_beit3_spec(scale: str) -> Beit3Spec:
    if scale not in BEIT3_SCALES:
        raise ModelConfigError(
            f"unknown mm_extractor_scale {scale!r}; known: {sorted(BEIT3_SCALES)}"
        )
    return BEIT3_SCALES[scale]


def build_beit3(spec: Beit3Spec) -> BEiT3:
    config = EncoderConfig(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        vocab_size=spec.vocab_size,
        multiway=True,
        layernorm_embedding=False,
        normalize_output=True,
        no_output_layer=True,
        drop_path_rate=0.0,
        encoder_embed_dim=spec.embed_dim,
        encoder_attention_heads=spec.heads,
        encoder_ffn_embed_dim=spec.ffn_dim,
        encoder_layers=spec.layers,
        max_source_positions=spec.max_source_positions,
        checkpoint_activations=False,
    )
    return BEiT3(config).eval()
