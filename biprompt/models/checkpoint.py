"""Reading state dicts from disk and matching them key-for-key against a model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from biprompt.errors import CheckpointError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or a torch-saved `.pth`/`.bin` (weights only: no pickle
    code runs). Tensors are memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {exc}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def check_keys(
    expected: Mapping[str, Iterable[int]],
    state: Mapping[str, torch.Tensor],
    what: str,
) -> None:
    """Raise CheckpointError naming the first mis-shaped key (in model order), then the first
    missing and unexpected ones."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    for key, shape in expected.items():
        if key in state and tuple(state[key].shape) != tuple(shape):
            problems.append(
                f"key {key!r} has shape {list(state[key].shape)}, the model expects {list(shape)}"
            )
            break
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
    if problems:
        raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems))


def expected_shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in state.items() if k.startswith(prefix)}
