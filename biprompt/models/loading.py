"""Building a model and filling it from a state dict, reading (and converting) one tensor at a
time, without a random init of large models."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from biprompt.models.checkpoint import check_keys, expected_shapes


def _read(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of `state`, floating ones converted to `dtype` as each is read, so a
    checkpoint stored in fp16 and run in fp32 never holds both copies of every weight."""
    out = {}
    for k in state:
        t = state[k]
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def materialize(
    build: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    what: str,
    fix_buffers: Callable[[nn.Module], None] | None = None,
    dtype: torch.dtype | None = None,
    meta: bool = True,
) -> nn.Module:
    """`build()` on the meta device, check `state` key-for-key, then load it (no random init).

    meta=False builds on the CPU and copies the weights in: for small modules, where a random
    init costs less than the meta device's one-time machinery (about 70 MB of RSS).
    Non-persistent buffers are not in a state dict: `fix_buffers` must recreate them; any tensor
    still on the meta device afterwards is an error.
    """
    if meta:
        with torch.device("meta"):
            model = build()
    else:
        model = build()
    check_keys(expected_shapes(model), state, what)
    if meta:
        model.load_state_dict(_read(state, dtype), strict=True, assign=True)
    else:
        if dtype is not None:
            model.to(dtype)
        model.load_state_dict(_read(state, dtype), strict=True)
    if fix_buffers is not None:
        fix_buffers(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left uninitialised after loading: {left[:5]}")
    return model.eval()


def fix_sam_buffers(sam: nn.Module) -> None:
    """Sam's pixel_mean/pixel_std are non-persistent: recreate them (on CPU, float32)."""
    from biprompt.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    for mod in sam.modules():
        if hasattr(mod, "pixel_mean") and isinstance(mod.pixel_mean, torch.Tensor):
            mod.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(-1, 1, 1), False)
            mod.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(-1, 1, 1), False)
