"""The fast inference path of SAM's ViT image encoder (``segment_anything`` ``ImageEncoderViT``).

Same weights, same ``state_dict`` keys, same result up to float rounding (a test holds it to 1e-4
max-abs on vit_b). What changes is where the time goes on a CPU:

* **Attention.** The reference builds, per head, the (HW)x(HW) logits ``scale * Q K^T`` and then
  adds the decomposed relative-position bias ``rel_h[q, kh] + rel_w[q, kw]`` as a 5-D broadcast,
  writing the whole tensor twice more (40% of a vit_b pass). Here the compact factors ``rel_h``
  (N x H) and ``rel_w`` (N x W) are computed once, and the bias is expanded only for a block of
  queries at a time, small enough to stay in cache, and handed to
  ``scaled_dot_product_attention`` as its additive mask: the fused kernel does scale, bias,
  softmax and the product with V in one pass, and the (HW)x(HW) map never exists.
* **Blocks.** ``qkv`` and ``proj`` are per-token, so they run on the H x W tokens before window
  padding and after un-padding (the reference also runs them on the padding: 17% more work at
  64x64 tokens, window 14). Padded keys and values are exactly what the reference gives them:
  the zero-padded input maps to the ``qkv`` bias. The MLP and its residual run over blocks of
  tokens, so the 4x-wide hidden activation and its GELU stay in cache.

The switch (:func:`set_fast_attention`) swaps each ``Block``/``Attention`` instance's class to a
subclass with another ``forward`` (and back), so parameters, buffers and ``state_dict`` are
untouched and the model still pickles and deep-copies. The fast forward is for inference: with
autograd recording, a block falls back to the reference forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Importing this module imports the `biprompt` package first, whose __init__ installs the
# torchvision stand-ins that `segment_anything` needs.
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos

__all__ = [
    "FastAttention",
    "FastBlock",
    "fast_attention_enabled",
    "set_fast_attention",
]

# Bias logits per attention call (16 MB): 1024 queries x 4096 keys of one head in a global block
# of vit_b, 9 windows of 196 tokens with all 12 heads in a windowed one. Measured best among
# 64 to 4096 queries and 1 to 12 heads on a 2-core Xeon.
BIAS_ELEMENTS = 1024 * 4096
# Off the CPU (CUDA) the cache argument does not hold: one SDPA call per attention with the whole
# bias (memory-efficient kernel, fewest launches) is the variant we expect to be faster, and the
# one used until `benchmarks/gpu.py` has measured it against the blocked one on a real GPU.
# Budgets by device type other than "cpu" (which takes BIAS_ELEMENTS); absent: the whole bias.
BIAS_ELEMENTS_BY_DEVICE: dict[str, int] = {}
# Tokens per MLP step: 2048 x 3072 hidden floats = 25 MB (best of 256 to 4096 measured).
MLP_TOKENS = 2048
# Tokens per qkv GEMM (1024: about 10% faster than one 4096-row GEMM).
QKV_TOKENS = 1024


def _rel_factors(attn: Attention, q: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """rel_h (B', heads, N, h) and rel_w (B', heads, N, w), contiguous, for q (B', heads, N, C):
    rel_h[., (qh, qw), kh] = q . R_h[qh, kh] and rel_w[., (qh, qw), kw] = q . R_w[qw, kw]."""
    b, heads, n, c = q.shape
    r_h = get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)  # (h, h, C)
    r_w = get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)  # (w, w, C)
    r_q = q.reshape(b * heads, h, w, c)
    rel_h = torch.matmul(r_q, r_h.transpose(1, 2))  # batched over (B', qh)
    rel_w = torch.matmul(r_q.transpose(1, 2), r_w.transpose(1, 2)).transpose(1, 2)  # over qw
    return rel_h.reshape(b, heads, n, h), rel_w.contiguous().view(b, heads, n, w)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int,
            w: int) -> torch.Tensor:
    """softmax(scale * q k^T + rel-pos bias) v for q, k, v of shape (B', heads, N=h*w, C).

    Returns (B', N, heads, C). The bias goes to SDPA as an additive mask, built for at most
    ``BIAS_ELEMENTS`` logits per call: whole items (windows) when they are small, else one head
    and a block of queries."""
    b, heads, n, c = q.shape
    out = q.new_empty(b, n, heads, c)
    budget = bias_budget(q.device)
    if not attn.use_rel_pos:
        out.copy_(F.scaled_dot_product_attention(q, k, v, scale=attn.scale).transpose(1, 2))
        return out
    rel_h, rel_w = _rel_factors(attn, q, h, w)
    per_head = n * n
    items = max(1, budget // (per_head * heads))
    head_step = heads if items > 1 else max(1, min(heads, budget // per_head))
    rows = n if head_step > 1 or per_head <= budget else max(1, budget // n)
    items = min(items, b)
    buf = q.new_empty(items, head_step, rows, h, w)
    for i in range(0, b, items):
        i2 = min(b, i + items)
        for j in range(0, heads, head_step):
            j2 = min(heads, j + head_step)
            for r in range(0, n, rows):
                r2 = min(n, r + rows)
                bias = torch.add(rel_h[i:i2, j:j2, r:r2, :, None],
                                 rel_w[i:i2, j:j2, r:r2, None, :],
                                 out=buf[:i2 - i, :j2 - j, :r2 - r])
                y = F.scaled_dot_product_attention(
                    q[i:i2, j:j2, r:r2], k[i:i2, j:j2], v[i:i2, j:j2], scale=attn.scale,
                    attn_mask=bias.view(i2 - i, j2 - j, r2 - r, n),
                )
                out[i:i2, r:r2, j:j2].copy_(y.transpose(1, 2))
    return out


def bias_budget(device: torch.device) -> int:
    """Bias logits per SDPA call on `device`: BIAS_ELEMENTS on the CPU, else
    BIAS_ELEMENTS_BY_DEVICE's entry, else unbounded (read at call time, so a test or benchmark
    may change either)."""
    if device.type == "cpu":
        return BIAS_ELEMENTS
    return BIAS_ELEMENTS_BY_DEVICE.get(device.type, 1 << 62)


def fast_attention_forward(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Same result as ``Attention.forward`` on x (B, H, W, dim), up to float rounding."""
    b, h, w, dim = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = _attend(attn, q, k, v, h, w)
    return attn.proj(out.reshape(b, h, w, dim))


def _spans(n: int, size: int) -> list[tuple[slice, slice, slice]]:
    """Cover tokens 0..n-1 with windows of `size`: (windows, rows in window, source rows) for the
    whole windows, then for the last, partial one."""
    full, rem = divmod(n, size)
    spans = [(slice(0, full), slice(None), slice(0, full * size))] if full else []
    if rem:
        spans.append((slice(full, full + 1), slice(0, rem), slice(full * size, n)))
    return spans


def _windowed_qkv(qkv: torch.Tensor, bias: torch.Tensor | None, heads: int,
                  size: int) -> tuple[tuple[torch.Tensor, ...], int, int]:
    """(B, H, W, 3*dim) projections -> q, k, v of shape (B*windows, heads, size*size, C).

    Padded as the reference pads: padded tokens are zeros before ``qkv``, so their projection is
    its bias. The window layout is allocated first and written through a strided view of it as
    a token grid, so the projections are copied once (no padded intermediate)."""
    b, h, w, three_dim = qkv.shape
    c = three_dim // (3 * heads)
    nh, nw = -(-h // size), -(-w // size)
    win = qkv.new_empty(3, b, nh, nw, heads, size, size, c)
    grid = win.permute(1, 2, 5, 3, 6, 0, 4, 7)  # (B, nh, size, nw, size, 3, heads, C)
    src = qkv.view(b, h, w, 3, heads, c)
    for rw, ra, rs in _spans(h, size):
        for cw, ca, cs in _spans(w, size):
            dst = grid[:, rw, ra, cw, ca]
            dst.copy_(src[:, rs, cs].reshape(dst.shape))
    fill = 0.0 if bias is None else bias.view(3, heads, c)
    if h % size:
        grid[:, h // size, h % size:] = fill
    if w % size:
        grid[:, :, :, w // size, w % size:] = fill
    return win.view(3, b * nh * nw, heads, size * size, c).unbind(0), nh * size, nw * size


def _linear_rows(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) for x (..., in), computed over blocks of QKV_TOKENS rows (faster GEMMs here)."""
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], layer.out_features)
    for r in range(0, flat.shape[0], QKV_TOKENS):
        if layer.bias is None:
            torch.mm(flat[r:r + QKV_TOKENS], layer.weight.t(), out=out[r:r + QKV_TOKENS])
        else:
            torch.addmm(layer.bias, flat[r:r + QKV_TOKENS], layer.weight.t(),
                        out=out[r:r + QKV_TOKENS])
    return out.view(*x.shape[:-1], layer.out_features)


def fast_block_forward(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """Same result as ``Block.forward`` on x (B, H, W, dim), up to float rounding."""
    b, h, w, dim = x.shape
    attn = blk.attn
    heads = attn.num_heads
    qkv = _linear_rows(blk.norm1(x), attn.qkv)
    if blk.window_size > 0:
        size = blk.window_size
        (q, k, v), hp, wp = _windowed_qkv(qkv, attn.qkv.bias, heads, size)
        out = _attend(attn, q, k, v, size, size)  # (B*windows, s*s, heads, C)
        out = out.view(b, hp // size, wp // size, size, size, dim)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, dim)[:, :h, :w]
    else:
        # SDPA runs about 10% faster on contiguous heads than on strided views of qkv.
        qkv = qkv.view(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = (t.contiguous() for t in qkv.unbind(0))
        out = _attend(attn, q, k, v, h, w).view(b, h, w, dim)
    x = attn.proj(out).add_(x)
    _mlp_residual_(blk, x.view(-1, dim))
    return x


def _mlp_residual_(blk: Block, x: torch.Tensor) -> None:
    """x += mlp(norm2(x)) for x (tokens, dim), a block of tokens at a time (in place)."""
    lin1, lin2, act = blk.mlp.lin1, blk.mlp.lin2, blk.mlp.act
    exact_gelu = type(act) is nn.GELU and act.approximate == "none"
    for s in range(0, x.shape[0], MLP_TOKENS):
        part = x[s:s + MLP_TOKENS]
        hidden = lin1(blk.norm2(part))
        hidden = torch.ops.aten.gelu_(hidden) if exact_gelu else act(hidden)
        part.add_(lin2(hidden))


class FastAttention(Attention):
    """``Attention`` with the cache-blocked SDPA forward (no new parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return fast_attention_forward(self, x)


class FastBlock(Block):
    """``Block`` with the fast forward (no new parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return fast_block_forward(self, x)


_SWAPS = ((Block, FastBlock), (Attention, FastAttention))


def _swappable(module: nn.Module) -> list[nn.Module]:
    found = []
    for m in module.modules():
        for ref, fast in _SWAPS:
            if isinstance(m, ref):
                if type(m) not in (ref, fast):
                    raise TypeError(
                        f"set_fast_attention: unsupported {ref.__name__} subclass "
                        f"{type(m).__qualname__}"
                    )
                found.append(m)
                break
    return found


def set_fast_attention(image_encoder: nn.Module, enabled: bool = True) -> None:
    """Switch SAM's encoder blocks inside ``image_encoder`` to the fast (or reference) forward.

    Works on an ``ImageEncoderViT`` or any module containing one (e.g. a whole ``Sam``). Idempotent
    and reversible; parameters and ``state_dict`` are not touched. Subclasses of ``Block`` or
    ``Attention`` other than ours are refused, since swapping them would drop their overrides.
    """
    for m in _swappable(image_encoder):
        for ref, fast in _SWAPS:
            if isinstance(m, ref):
                m.__class__ = fast if enabled else ref
                break


def fast_attention_enabled(image_encoder: nn.Module) -> bool:
    """True when the module has SAM encoder blocks and all of them use the fast forward."""
    modules = _swappable(image_encoder)
    return bool(modules) and all(type(m) in (FastBlock, FastAttention) for m in modules)
