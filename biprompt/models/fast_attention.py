"""Fast attention path for SAM's ViT image encoder (``segment_anything`` ``ImageEncoderViT``).

The reference ``Attention`` builds, per head, the full (HW)x(HW) logit matrix
``S = scale * Q K^T`` and then adds the decomposed relative-position bias
``bias[q, (kh, kw)] = rel_h[q, kh] + rel_w[q, kw]`` (``rel_h = Q . R_h``, ``rel_w = Q . R_w``).
That bias is separable, so it is a dot product: with ``Q' = [scale * Q, rel_h, rel_w]``
(head dim C + H + W) and ``K' = [K, onehot(kh), onehot(kw)]`` we get ``Q' K'^T = S + bias``
exactly, i.e. one matmul and no bias tensor. Attention then runs through
``scaled_dot_product_attention(Q', K', V', scale=1)``; V is zero-padded to C + H + W columns so
that Q/K/V share a head dim (the CPU flash kernel requires it) and the extra output columns (all
zero) are sliced off. Without relative positions it is plain SDPA with the module's scale.

The switch swaps each ``Attention`` instance's class to the :class:`FastAttention` subclass (and
back), so weights, parameters, buffers and ``state_dict`` keys are untouched, and the swapped
model still pickles and deep-copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Importing this module imports the `biprompt` package first, whose __init__ installs the
# torchvision stand-ins that `segment_anything` needs.
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

__all__ = ["FastAttention", "fast_attention_enabled", "set_fast_attention"]


def _key_position_onehot(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(h*w, h+w) matrix whose row for token (kh, kw) is [onehot_h(kh), onehot_w(kw)]."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    onehot = torch.zeros(h * w, h + w, dtype=dtype, device=device)
    idx = torch.arange(h * w, device=device)
    onehot[idx, rows] = 1
    onehot[idx, h + cols] = 1
    return onehot


def fast_attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Same result as ``Attention.forward`` (up to float rounding), computed via SDPA."""
    b, h, w, _ = x.shape
    n = h * w
    heads = attn.num_heads
    # (3, B, heads, N, C) -> q, k, v of shape (B, heads, N, C)
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    c = q.shape[-1]

    if not attn.use_rel_pos:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        r_h = get_rel_pos(h, h, attn.rel_pos_h)  # (h, h, C)
        r_w = get_rel_pos(w, w, attn.rel_pos_w)  # (w, w, C)
        r_q = q.reshape(b * heads, h, w, c)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, r_h).reshape(b, heads, n, h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, r_w).reshape(b, heads, n, w)
        # Under autocast the einsum may come back in another dtype than q; align before cat.
        q_aug = torch.cat([q * attn.scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1)
        onehot = _key_position_onehot(h, w, k.dtype, k.device)
        k_aug = torch.cat([k, onehot.expand(b, heads, n, h + w)], dim=-1)
        v_aug = F.pad(v, (0, h + w))
        out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)[..., :c]

    # (B, heads, N, C) -> (B, H, W, heads * C), the reference's head-major channel order.
    out = out.transpose(1, 2).reshape(b, h, w, heads * c)
    return attn.proj(out)


class FastAttention(Attention):
    """``Attention`` whose forward uses the augmented-QK SDPA path (no new parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_attention_forward(self, x)


def _attention_modules(module: nn.Module) -> list[Attention]:
    return [m for m in module.modules() if isinstance(m, Attention)]


def set_fast_attention(image_encoder: nn.Module, enabled: bool = True) -> None:
    """Switch every SAM ``Attention`` inside ``image_encoder`` to the fast (or reference) forward.

    Works on an ``ImageEncoderViT`` or any module containing one (e.g. a whole ``Sam``). Idempotent
    and reversible; parameters and ``state_dict`` are not touched. Subclasses of ``Attention``
    other than :class:`FastAttention` are refused, since swapping them would drop their overrides.
    """
    modules = _attention_modules(image_encoder)
    for m in modules:
        if type(m) not in (Attention, FastAttention):
            raise TypeError(
                f"set_fast_attention: unsupported Attention subclass {type(m).__qualname__}"
            )
    target = FastAttention if enabled else Attention
    for m in modules:
        m.__class__ = target


def fast_attention_enabled(image_encoder: nn.Module) -> bool:
    """True when the module has Attention layers and all of them use the fast forward."""
    modules = _attention_modules(image_encoder)
    return bool(modules) and all(type(m) is FastAttention for m in modules)
