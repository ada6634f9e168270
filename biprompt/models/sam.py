"""SAM built from segment-anything's own classes: official variants and small custom shapes.

Every hyper-parameter lives in `SamSpec`; `SAM_VARIANTS` holds the three official ones. A spec can
also be read back from a checkpoint's shapes (`infer_sam_spec`), so a `.pth` of any size loads
without being told its variant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from biprompt.errors import CheckpointError, ModelConfigError
from biprompt.models.checkpoint import LazyState, shapes_of
from biprompt.models.spec import SpecDict
from biprompt.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD


@dataclass(frozen=True)
class SamSpec(SpecDict):
    """Shapes of a SAM model. Defaults are the official ones (vit_b encoder)."""

    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    name: str = field(default="custom", compare=False)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.img_size // self.patch_size


SAM_VARIANTS: dict[str, SamSpec] = {
    "vit_b": SamSpec(name="vit_b"),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23), name="vit_l"),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31), name="vit_h"),
    # Small shapes for tests: random weights, fast on CPU.
    "tiny": SamSpec(64, 2, 2, (1,), img_size=128, patch_size=8, window_size=4, prompt_dim=32,
                    mask_in_chans=4, decoder_mlp_dim=64, iou_head_hidden_dim=32,
                    name="tiny"),
    # The ShapesRef demo model (biprompt.train.demo): 16x16 tokens at 256 px, 1.2 M parameters.
    "demo": SamSpec(128, 4, 4, (1, 3), img_size=256, patch_size=16, window_size=0,
                    prompt_dim=64, mask_in_chans=8, decoder_mlp_dim=256, decoder_heads=4,
                    iou_head_hidden_dim=64, name="demo"),
}
# EVF-SAM's config names its SAM by scale.
SAM_SCALES = {"huge": "vit_h", "large": "vit_l", "base": "vit_b"}


def get_sam_spec(variant: str | dict | SamSpec) -> SamSpec:
    if isinstance(variant, SamSpec):
        return variant
    if isinstance(variant, dict):
        return SamSpec.from_dict(variant)
    key = SAM_SCALES.get(variant, variant)
    if key not in SAM_VARIANTS:
        raise ModelConfigError(
            f"unknown SAM variant {variant!r}; known: {sorted(SAM_VARIANTS)} "
            f"(or EVF scales {sorted(SAM_SCALES)}), or pass a SamSpec"
        )
    return SAM_VARIANTS[key]


def build_image_encoder(spec: SamSpec) -> ImageEncoderViT:
    return ImageEncoderViT(
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.encoder_dim,
        depth=spec.encoder_depth,
        num_heads=spec.encoder_heads,
        mlp_ratio=4,
        out_chans=spec.prompt_dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes,
    )


def build_prompt_encoder(spec: SamSpec) -> PromptEncoder:
    grid = spec.embedding_size
    return PromptEncoder(
        embed_dim=spec.prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(spec.img_size, spec.img_size),
        mask_in_chans=spec.mask_in_chans,
    )


def build_mask_decoder(spec: SamSpec) -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_heads,
        ),
        transformer_dim=spec.prompt_dim,
        iou_head_depth=spec.iou_head_depth,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )


SAM_PART_BUILDERS = {"image_encoder": build_image_encoder, "prompt_encoder": build_prompt_encoder,
                     "mask_decoder": build_mask_decoder}


def build_sam(spec: SamSpec) -> Sam:
    """A SAM model with the given shapes, randomly initialised, in eval mode."""
    sam = Sam(
        image_encoder=build_image_encoder(spec),
        prompt_encoder=build_prompt_encoder(spec),
        mask_decoder=build_mask_decoder(spec),
        pixel_mean=list(SAM_PIXEL_MEAN),
        pixel_std=list(SAM_PIXEL_STD),
    )
    return sam.eval()


def _count(prefix_re: str, keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(prefix_re, k))}
    return max(idx) + 1 if idx else 0


def infer_sam_spec(state: Mapping[str, torch.Tensor] | LazyState, prefix: str = "") -> SamSpec:
    """Read a SamSpec back from a SAM state dict's shapes (no tensor is read).

    Decoder attention heads can't be seen in shapes: the official 8 is assumed unless it
    doesn't divide the widths, in which case the largest divisor up to 8 is used. Name a variant
    or pass a SamSpec to override.
    """
    shapes = shapes_of(state)

    def get(key: str) -> tuple[int, ...]:
        full = prefix + key
        if full not in shapes:
            raise CheckpointError(f"not a SAM checkpoint: key {full!r} is missing")
        return tuple(shapes[full])

    pos = get("image_encoder.pos_embed")  # 1 x g x g x dim
    patch = get("image_encoder.patch_embed.proj.weight")  # dim x 3 x p x p
    grid, dim, p = pos[1], pos[3], patch[-1]
    keys = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    depth = _count(r"image_encoder\.blocks\.(\d+)\.", keys)
    rel = [get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    head_dim = rel[0][1]
    global_idx = tuple(i for i, r in enumerate(rel) if r[0] == 2 * grid - 1)
    windowed = [r[0] for r in rel if r[0] != 2 * grid - 1]
    window = (windowed[0] + 1) // 2 if windowed else 14
    prompt_dim = get("image_encoder.neck.0.weight")[0]
    mlp_dim = get("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0]
    iou_layers = _count(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", keys)
    heads = next(h for h in (8, 4, 2, 1) if prompt_dim % h == 0 and (prompt_dim // 2) % h == 0)
    return SamSpec(
        encoder_dim=dim,
        encoder_depth=depth,
        encoder_heads=dim // head_dim,
        global_attn_indexes=global_idx,
        img_size=grid * p,
        patch_size=p,
        window_size=window,
        prompt_dim=prompt_dim,
        mask_in_chans=get("prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=_count(r"mask_decoder\.transformer\.layers\.(\d+)\.", keys),
        decoder_mlp_dim=mlp_dim,
        decoder_heads=heads,
        iou_head_depth=iou_layers,
        iou_head_hidden_dim=get("mask_decoder.iou_prediction_head.layers.0.weight")[0],
    )


def match_variant(spec: SamSpec) -> SamSpec:
    """The named official/tiny spec equal to `spec` (fields, not name), or `spec` itself."""
    for known in SAM_VARIANTS.values():
        if replace(known, name=spec.name) == spec:
            return known
    return spec
