"""Reading checkpoints key by key, and matching them key-for-key against a model.

A serving replica runs one role, so it must read only that role's weights: `open_state` returns a
`LazyState`, whose keys and shapes are known up front and whose tensors are read on first use.
`.pth`/`.bin` files are memory-mapped (`torch.load(mmap=True)`: a tensor's pages are read only
when touched); `.safetensors` files are read through `safe_open`, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from biprompt.errors import CheckpointError

Shapes = Mapping[str, Sequence[int]]


class LazyState(Mapping[str, torch.Tensor]):
    """A read-only state dict whose tensors are fetched on access; `shapes` costs no reads."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], fetch: Callable[[str], torch.Tensor]):
        self.shapes = dict(shapes)
        self._fetch = fetch

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._fetch(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def select(self, prefix: str, strip: bool = True) -> dict[str, torch.Tensor]:
        """The tensors under `prefix` (read now), keyed without the prefix unless strip=False."""
        n = len(prefix) if strip else 0
        return {k[n:]: self._fetch(k) for k in self.shapes if k.startswith(prefix)}

    def sub(self, prefix: str) -> LazyState:
        """A lazy view of the keys under `prefix`, with the prefix removed."""
        n = len(prefix)
        return LazyState({k[n:]: s for k, s in self.shapes.items() if k.startswith(prefix)},
                         lambda k: self._fetch(prefix + k))

    def without(self, prefix: str) -> LazyState:
        """A lazy view of every key not under `prefix`."""
        return LazyState({k: s for k, s in self.shapes.items() if not k.startswith(prefix)},
                         self._fetch)

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> LazyState:
        """Wrap an in-memory state dict (random weights, tests)."""
        if isinstance(state, LazyState):
            return state
        return cls({k: tuple(v.shape) for k, v in state.items()}, state.__getitem__)

    @classmethod
    def union(cls, parts: Iterable[LazyState]) -> LazyState:
        """Shards of one checkpoint (a sharded *.index.json) as one state."""
        owner: dict[str, LazyState] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for part in parts:
            for k, s in part.shapes.items():
                owner[k], shapes[k] = part, tuple(s)
        return cls(shapes, lambda k: owner[k][k])


def _open_safetensors(path: Path) -> LazyState:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {exc}") from None
    return LazyState(shapes, handle.get_tensor)


def _open_torch(path: Path) -> LazyState:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {exc}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor")
    return LazyState.of(dict(state))


def open_state(path: str | Path) -> LazyState:
    """A checkpoint file's state, lazily: `.safetensors`, or a torch-saved `.pth`/`.bin` (weights
    only: no pickle code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    return _open_safetensors(path) if path.suffix == ".safetensors" else _open_torch(path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file (memory-mapped where the format allows)."""
    state = open_state(path)
    return {k: state[k] for k in state}


def shapes_of(state: Mapping[str, torch.Tensor] | LazyState) -> dict[str, tuple[int, ...]]:
    if isinstance(state, LazyState):
        return dict(state.shapes)
    return {k: tuple(v.shape) for k, v in state.items()}


def check_keys(
    expected: Mapping[str, Iterable[int]],
    state: Mapping[str, torch.Tensor] | LazyState,
    what: str,
) -> None:
    """Raise CheckpointError naming the first mis-shaped key (in model order), then the first
    missing and unexpected ones. Reads shapes only."""
    shapes = shapes_of(state)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    problems = []
    for key, shape in expected.items():
        if key in shapes and tuple(shapes[key]) != tuple(shape):
            problems.append(
                f"key {key!r} has shape {list(shapes[key])}, the model expects {list(shape)}"
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
