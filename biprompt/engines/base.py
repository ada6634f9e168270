"""What every role's engine shares: the device and dtype it runs in, and what it holds."""

from __future__ import annotations

import torch
from torch import nn

from biprompt.errors import ModelConfigError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float16 on CUDA, float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelConfigError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPES[dtype]


def param_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers (0 for None)."""
    if module is None:
        return 0
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class Placement:
    """Device and dtype of one engine."""

    def __init__(self, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
