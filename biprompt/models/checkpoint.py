"""Reading checkpoints key by key, and matching them key-for-key against a model.

A serving replica runs one role, so it must read only that role's weights: `open_state` returns a
`LazyState`, whose keys and shapes are known up front and whose tensors are read on first use.
`.pth`/`.bin` files are memory-mapped (`torch.load(mmap=True)`: a tensor's pages are read only
when touched, and weights kept in their stored dtype stay those pages); `.safetensors` files are
read one tensor at a time.
"""

from __future__ import annotations

import json
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


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _open_safetensors(path: Path) -> LazyState:
    """NOTE: safetensors' own `safe_open` memory-maps the file, and every page it reads then
    counts toward the process's RSS until the handle closes: a replica's peak would hold the whole
    file beside the weights converted from it. So the header is parsed here (the format is an
    8-byte little-endian length, a JSON header, then raw little-endian data) and each tensor is
    read with a plain read into its own buffer."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = {k: (_ST_DTYPES[v["dtype"]], tuple(v["shape"]), tuple(v["data_offsets"]))
                   for k, v in header.items()}
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {exc}") from None
    base = 8 + n

    def fetch(key: str) -> torch.Tensor:
        dtype, shape, (start, end) = entries[key]
        out = torch.empty(shape, dtype=dtype)
        raw = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if raw is None or raw.nbytes != end - start:
            if out.numel() == 0 and end == start:
                return out
            raise CheckpointError(f"{path}: tensor {key!r} has {end - start} bytes, its shape "
                                  f"{list(shape)} needs {raw.nbytes if raw is not None else 0}")
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(memoryview(raw)) != raw.nbytes:
                raise CheckpointError(f"{path} is truncated (tensor {key!r})")
        return out

    return LazyState({k: e[1] for k, e in entries.items()}, fetch)


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
