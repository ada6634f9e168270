"""Building a model on the meta device and filling it from a state dict, without a random init."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from biprompt.models.checkpoint import check_keys, expected_shapes


def materialize(
    build: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    what: str,
    fix_buffers: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """`build()` on the meta device, check `state` key-for-key, then load it (no random init).

    Non-persistent buffers are not in a state dict: `fix_buffers` must recreate them; any tensor
    still on the meta device afterwards is an error.
    """
    with torch.device("meta"):
        model = build()
    check_keys(expected_shapes(model), state, what)
    model.load_state_dict(dict(state), strict=True, assign=True)
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
