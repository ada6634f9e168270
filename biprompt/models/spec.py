"""A frozen-dataclass mixin for model shape specs: to/from plain dicts (YAML, config.json)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

from biprompt.errors import ModelConfigError

S = TypeVar("S", bound="SpecDict")


class SpecDict:
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any]) -> S:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ModelConfigError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
