"""The reference-image expert, VRP-SAM style (arXiv 2402.17726): a visual reference prompt encoder
that turns (reference embedding, reference mask, target embedding) into prompt tokens for SAM's
own (frozen) mask decoder.

Our version reads SAM's image-encoder embeddings for both images (VRP-SAM reads a separate frozen
backbone; SAM's embedding is already computed and cached for every image we serve):

1. Feature augmenter. The reference mask, area-averaged onto the embedding grid (Bx1xhxw), pools
   the reference embedding into a foreground prototype (BxC). The target gets a pseudo-mask: at
   each target position, the highest cosine similarity with any reference foreground position,
   min-max normalised per image. A shared 1x1 convolution fuses [features, prototype, mask] into
   D channels for each image.
2. Prompt generator. N learnable queries cross-attend to the fused reference (then self-attend):
   that is the *reference stage*, which depends only on the reference and is cached per
   (reference image, annotation). The target stage cross-attends them to the fused target, self-
   attends, and projects them to SAM's prompt width: N sparse prompt tokens for the mask decoder.

Checkpoint layout (a directory, `save_vrp` / `biprompt.models.vrp_loading.load_vrp`):
`config.json` (`model_type: "vrp"`, the fields of `VrpConfig`, and the SAM it was trained on)
and `model.safetensors` with keys `fuse.*`, `queries`, `pos_proj.*`, `reference_block.*`,
`target_block.*`, `out.*`, and `mask_decoder.*` when it keeps its own fine-tuned copy of SAM's
mask decoder (`own_decoder`); else SAM's decoder is read from the SAM checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from biprompt.errors import CheckpointError, ModelConfigError
from biprompt.models.checkpoint import open_state
from biprompt.models.loading import materialize
from biprompt.models.sam import SamSpec, build_mask_decoder


@dataclass(frozen=True)
class VrpConfig:
    embed_dim: int  # C: SAM's embedding channels (= its prompt width)
    hidden_dim: int = 128  # D
    num_queries: int = 8  # N prompt tokens (VRP-SAM uses 50 for real SAM)
    num_heads: int = 4
    ffn_dim: int = 256
    sam_model: str | None = None  # the SAM model id it was trained on (informative)
    sam_probe: str | None = None  # sha256 of that SAM's patch-embedding weights (pairing check)
    # a fine-tuned copy of SAM's mask decoder in the checkpoint (`mask_decoder.*`, the shapes of
    # `sam_spec`), as EVF-SAM keeps its own; False: SAM's own decoder, frozen, as VRP-SAM does
    own_decoder: bool = False
    sam_spec: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> VrpConfig:
        if d.get("model_type", "vrp") != "vrp":
            raise ModelConfigError(f"config.json model_type is {d.get('model_type')!r}, not 'vrp'")
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "embed_dim" not in fields:
            raise ModelConfigError("a VRP config.json needs embed_dim")
        cfg = cls(**fields)
        if cfg.own_decoder and not cfg.sam_spec:
            raise ModelConfigError("a VRP config with own_decoder needs the sam_spec of its decoder")
        if cfg.hidden_dim % cfg.num_heads:
            raise ModelConfigError(f"hidden_dim {cfg.hidden_dim} is not a multiple of "
                                   f"num_heads {cfg.num_heads}")
        return cfg

    def to_dict(self) -> dict:
        return {"architectures": ["VrpEncoder"], "model_type": "vrp", **asdict(self)}


@dataclass
class ReferenceFeatures:
    """What the target stage needs of one or more references (B of them), cacheable.

    queries: BxNxD (after the reference stage); prototype: BxC; fg: BxMxC unit-norm reference
    features at the M grid positions most covered by the mask, fg_valid: BxM bool."""

    queries: torch.Tensor
    prototype: torch.Tensor
    fg: torch.Tensor
    fg_valid: torch.Tensor

    def __len__(self) -> int:
        return self.queries.shape[0]

    @staticmethod
    def cat(parts: list[ReferenceFeatures]) -> ReferenceFeatures:
        m = max(p.fg.shape[1] for p in parts)

        def pad(t: torch.Tensor, value=0) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, m - t.shape[1]) if t.dim() == 3 else (0, m - t.shape[1]),
                         value=value)

        return ReferenceFeatures(torch.cat([p.queries for p in parts]),
                                 torch.cat([p.prototype for p in parts]),
                                 torch.cat([pad(p.fg) for p in parts]),
                                 torch.cat([pad(p.fg_valid, False) for p in parts]))

    def split(self) -> list[ReferenceFeatures]:
        return [ReferenceFeatures(self.queries[i:i + 1], self.prototype[i:i + 1],
                                  self.fg[i:i + 1], self.fg_valid[i:i + 1])
                for i in range(len(self))]


class QueryBlock(nn.Module):
    """Queries cross-attend to a memory, then self-attend, then an MLP; post-norm residuals."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.cross(q, memory + memory_pos, memory, need_weights=False)[0])
        q = self.norm2(q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norm3(q + self.mlp(q))


def grid_mask(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Bx1xSxS float masks in the padded model frame -> Bx1xgxg area fractions."""
    return F.adaptive_avg_pool2d(mask.float(), grid)


class VrpEncoder(nn.Module):
    """The visual reference prompt encoder (module docstring). Shapes: embeddings BxCxhxw; masks
    Bx1xhxw area fractions on the same grid; `image_pe` 1xCxhxw (SAM's dense positional
    encoding)."""

    MAX_FG = 64  # reference positions kept for the target's pseudo-mask

    def __init__(self, config: VrpConfig):
        super().__init__()
        self.config = config
        c, d = config.embed_dim, config.hidden_dim
        self.fuse = nn.Sequential(nn.Conv2d(2 * c + 1, d, 1), nn.GELU(), nn.Conv2d(d, d, 1))
        self.pos_proj = nn.Linear(c, d)
        self.queries = nn.Parameter(torch.randn(config.num_queries, d) * 0.02)
        self.reference_block = QueryBlock(d, config.num_heads, config.ffn_dim)
        self.target_block = QueryBlock(d, config.num_heads, config.ffn_dim)
        self.out = nn.Linear(d, c)
        self.mask_decoder = (build_mask_decoder(SamSpec.from_dict(config.sam_spec))
                             if config.own_decoder else None)

    def _fused(self, emb: torch.Tensor, proto: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = emb.shape
        x = torch.cat([emb, proto[:, :, None, None].expand(b, c, h, w), mask], dim=1)
        return self.fuse(x).flatten(2).transpose(1, 2)  # Bx(hw)xD

    def _pos(self, image_pe: torch.Tensor, b: int) -> torch.Tensor:
        return self.pos_proj(image_pe.flatten(2).transpose(1, 2)).expand(b, -1, -1)

    def reference(self, emb: torch.Tensor, mask: torch.Tensor, image_pe: torch.Tensor) -> ReferenceFeatures:
        """The reference stage: prototype, foreground features and queries."""
        b, c = emb.shape[:2]
        weight = mask.flatten(1)  # Bx(hw)
        feats = emb.flatten(2).transpose(1, 2)  # Bx(hw)xC
        proto = (feats * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1e-6)
        m = min(self.MAX_FG, weight.shape[1])
        top_w, top_i = weight.topk(m, dim=1)
        fg = F.normalize(feats.gather(1, top_i[..., None].expand(b, m, c)), dim=-1)
        # the most covered positions, at least one, and those at least half as covered as the most
        valid = (top_w >= 0.5 * top_w[:, :1]) & (top_w > 0)
        valid[:, 0] = True
        ref = self._fused(emb, proto, mask)
        q = self.queries[None].expand(b, -1, -1)
        q = self.reference_block(q, ref, self._pos(image_pe, b))
        return ReferenceFeatures(q, proto, fg, valid)

    def pseudo_mask(self, emb: torch.Tensor, ref: ReferenceFeatures) -> torch.Tensor:
        """Bx1xhxw: each target position's best cosine similarity with the reference
        foreground, min-max normalised per image."""
        b, c, h, w = emb.shape
        t = F.normalize(emb.flatten(2).transpose(1, 2), dim=-1)  # Bx(hw)xC
        sim = t @ ref.fg.transpose(1, 2)  # Bx(hw)xM
        sim = sim.masked_fill(~ref.fg_valid[:, None, :], -2.0).max(dim=2).values
        lo, hi = sim.min(1, keepdim=True).values, sim.max(1, keepdim=True).values
        return ((sim - lo) / (hi - lo).clamp(min=1e-6)).view(b, 1, h, w)

    def target(self, emb: torch.Tensor, ref: ReferenceFeatures, image_pe: torch.Tensor) -> torch.Tensor:
        """The target stage: BxNxC sparse prompt tokens for SAM's mask decoder."""
        b = emb.shape[0]
        tgt = self._fused(emb, ref.prototype, self.pseudo_mask(emb, ref))
        q = self.target_block(ref.queries, tgt, self._pos(image_pe, b))
        return self.out(q)


def probe_digest(probe: torch.Tensor) -> str:
    """sha256 of a SAM's patch-embedding weights as float32: which SAM a VRP model was trained on."""
    import hashlib

    return hashlib.sha256(probe.detach().float().contiguous().numpy().tobytes()).hexdigest()


def load_vrp(directory: str | Path, dtype: torch.dtype | None = None) -> VrpEncoder:
    """A VRP checkpoint directory (config.json + model.safetensors or pytorch_model.bin), every
    key's shape checked against the config."""
    directory = Path(directory).expanduser()
    try:
        config = VrpConfig.from_dict(json.loads((directory / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"could not read the reference model's config in {directory}: "
                              f"{exc}") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            state = open_state(directory / name)
            break
    else:
        raise CheckpointError(f"no weights in {directory}: expected model.safetensors or "
                              "pytorch_model.bin")
    return materialize(lambda: VrpEncoder(config), state, f"reference model {directory}",
                       dtype=dtype, meta=False)


def save_vrp(model: VrpEncoder, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `model` in the layout of the module docstring (safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
