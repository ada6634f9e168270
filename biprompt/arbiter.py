"""The arbiter: a learnt tie-breaker for when two experts vote for different candidates.

With two experts (text and reference), each one's own pick is the candidate it overlaps best.
When they agree, that is the answer. When they disagree (about a fifth of ShapesRef's samples),
the `confident` rule trusts the expert with the higher best IoU, which is right little more often
than either expert alone. The arbiter instead weighs what the join already knows about the two
picks: each expert's IoU with both of them, SAM's predicted IoUs and areas of the two, which of
part / object / whole each is, how decisively each expert chose (its best IoU minus its second),
and how much the two experts' masks overlap. A logistic model over those features (fit by
`biprompt.train.arbiter` to maximise the ground-truth IoU of the chosen pick) says which expert's
pick to take.

The model is a small JSON file (`FORMAT`), next to the checkpoints it was fit for:

    {"format": "biprompt-arbiter/1", "experts": ["text", "reference"], "features": [...],
     "mean": [...], "std": [...], "weights": [...], "bias": b, "models": {...}, "fit": {...}}

A profile names it as `selection.arbiter` and serves it with `selection.rule: arbiter`. Plain
numpy; the fitting (torch) lives in biprompt.train.arbiter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biprompt.errors import ModelConfigError

FORMAT = "biprompt-arbiter/1"
# a = the first expert's pick, b = the second's; the order of the model's weights
FEATURES = (
    "first_iou_a", "first_iou_b", "second_iou_a", "second_iou_b",
    "score_a", "score_b", "log_area_a", "log_area_b", "expert_agreement",
    "first_margin", "second_margin", "a_before_b",
    "a_is_part", "a_is_whole", "b_is_part", "b_is_whole",
)


def own_pick(ious: np.ndarray, scores: np.ndarray) -> int:
    """One expert's pick: the candidate it overlaps best; ties to the higher predicted IoU, then
    the lower index (the paper's rule)."""
    order = np.lexsort((-np.arange(len(ious)), scores, ious))
    return int(order[-1])


def _margin(ious: np.ndarray) -> float:
    top = np.sort(ious)[::-1]
    return float(top[0] - (top[1] if len(top) > 1 else 0.0))


def features(first: np.ndarray, second: np.ndarray, scores: np.ndarray, areas: np.ndarray,
             agreement: float) -> tuple[np.ndarray, int, int]:
    """(features in FEATURES' order, a, b): the two experts' picks a and b (indices) and what
    tells them apart. first/second: (K,) each candidate's IoU with that expert's mask; scores:
    SAM's predicted IoUs; areas: each candidate's share of the image; agreement: the IoU
    between the two experts' masks."""
    a, b = own_pick(first, scores), own_pick(second, scores)
    last = len(scores) - 1
    f = np.array([
        first[a], first[b], second[a], second[b], scores[a], scores[b],
        np.log(areas[a] + 1e-4), np.log(areas[b] + 1e-4), agreement,
        _margin(first), _margin(second), float(a < b),
        float(a == 0), float(a == last), float(b == 0), float(b == last),
    ], dtype=np.float64)
    return f, a, b


@dataclass(frozen=True)
class Arbiter:
    experts: tuple[str, str]  # (first, second): whose pick the model's "yes" takes
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    models: Mapping[str, str] = field(default_factory=dict)  # the expert model ids it was fit for
    fit: Mapping = field(default_factory=dict)  # how it was fit (data, seed, its own scores)
    path: str | None = None

    def __post_init__(self):
        n = len(FEATURES)
        if not (len(self.mean) == len(self.std) == len(self.weights) == n):
            raise ModelConfigError(f"an arbiter has {n} features ({', '.join(FEATURES)}); this "
                                   f"one has {len(self.weights)} weights")
        if len(set(self.experts)) != 2:
            raise ModelConfigError(f"an arbiter decides between two experts, not {self.experts}")

    def prefers_first(self, f: np.ndarray) -> bool:
        """True: take the first expert's pick."""
        z = ((f - np.asarray(self.mean)) / np.asarray(self.std)) @ np.asarray(self.weights)
        return bool(z + self.bias > 0)

    def choose(self, ious: Mapping[str, np.ndarray], scores: np.ndarray, areas: np.ndarray,
               agreement: float) -> tuple[int, str]:
        """(the chosen candidate, the expert whose pick it is)."""
        first, second = self.experts
        f, a, b = features(ious[first], ious[second], scores, areas, agreement)
        if a == b or self.prefers_first(f):
            return a, first
        return b, second

    def mismatches(self, model_ids: Mapping[str, str | None]) -> list[str]:
        """The experts whose served model is not the one this arbiter was fit for."""
        return [e for e in self.experts
                if self.models.get(e) and model_ids.get(e) != self.models[e]]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "experts": list(self.experts), "features": list(FEATURES),
                "mean": list(self.mean), "std": list(self.std), "weights": list(self.weights),
                "bias": self.bias, "models": dict(self.models), "fit": dict(self.fit)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: Mapping, path: str | None = None) -> Arbiter:
        where = path or "arbiter"
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ModelConfigError(f"{where}: not a {FORMAT} file (format {got!r})")
        if list(d.get("features", [])) != list(FEATURES):
            raise ModelConfigError(f"{where}: its features are {d.get('features')}, this version "
                                   f"computes {list(FEATURES)}; fit it again "
                                   "(python -m biprompt.train.arbiter)")
        try:
            return cls(experts=tuple(str(e) for e in d["experts"]),
                       mean=tuple(float(v) for v in d["mean"]),
                       std=tuple(float(v) for v in d["std"]),
                       weights=tuple(float(v) for v in d["weights"]), bias=float(d["bias"]),
                       models={str(k): str(v) for k, v in (d.get("models") or {}).items()},
                       fit=dict(d.get("fit") or {}), path=path)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"{where}: a malformed arbiter ({exc!r})") from None

    @classmethod
    def load(cls, path: str | Path) -> Arbiter:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"could not read the arbiter {path}: {exc}") from None
        return cls.from_dict(d, str(path))
