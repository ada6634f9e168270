"""Model profiles (configs/models/*.yaml), typed: which SAM and text model, on what device, with
which selection threshold. Every role's engine is built from the same profile, so model ids (and
so cache keys) agree across roles and replicas."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from biprompt.arbiter import Arbiter
from biprompt.config import (
    DEFAULT_AGREEMENT_THRESHOLD,
    MAX_TEXT_CHARS,
    MAX_TEXT_TOKENS,
    resolve_profile_path,
)
from biprompt.errors import ModelConfigError

# Each role's runtime (biprompt.engines.backends): torch (any device), onnxruntime and openvino
# (the CPU, float32), or auto (the fastest of them measured on this CPU; torch elsewhere).
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
DECODER_BACKENDS = BACKENDS
ROLES = ("encoder", "points", "text")


def read_profile(path: str | Path) -> dict:
    """A model profile YAML as a dict, with checkpoint paths made relative to the file's
    directory and environment variables expanded."""
    path = Path(path)
    try:
        profile = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"could not read model profile {path}: {exc}") from None
    if not isinstance(profile, dict):
        raise ModelConfigError(f"{path}: a model profile is a mapping, got {type(profile).__name__}")
    for section in ("sam", "text_model", "reference_model"):
        part = profile.get(section) or {}
        ckpt = part.get("checkpoint")
        if isinstance(ckpt, str):
            ckpt = os.path.expandvars(ckpt)
            if "${" in ckpt or ckpt.startswith("$"):
                raise ModelConfigError(
                    f"{path}: {section}.checkpoint is {part['checkpoint']!r} and that "
                    "environment variable is not set"
                )
            if ckpt.startswith("."):
                ckpt = str((path.parent / ckpt).resolve())
            part["checkpoint"] = ckpt
    sel = profile.get("selection")
    if isinstance(sel, dict) and isinstance(sel.get("arbiter"), str):
        arb = os.path.expandvars(sel["arbiter"])
        sel["arbiter"] = str((path.parent / arb).resolve()) if arb.startswith(".") else arb
    profile.setdefault("name", path.stem)
    return profile


@dataclass(frozen=True)
class SamConfig:
    checkpoint: str | None = None  # .pth path / official name / URL / EVF-SAM dir; None: random
    variant: str | dict | None = None  # needed for random weights; else read from the shapes
    seed: int = 0  # random weights only
    fast_encoder: bool = True  # biprompt.models.fast_attention; False: the reference forward
    # the point decoder's runtime: the profile's `backends: {points: ...}`, of which this older
    # spelling (`sam.decoder_backend`) is an alias
    decoder_backend: str = "torch"


@dataclass(frozen=True)
class Backends:
    """Each role's runtime (`backends:` in a profile; BACKENDS)."""

    encoder: str = "torch"
    points: str = "torch"
    text: str = "torch"

    @classmethod
    def from_dict(cls, d: dict | None, points_alias: str | None = None) -> Backends:
        d = dict(d or {})
        unknown = set(d) - set(ROLES)
        if unknown:
            raise ModelConfigError(f"backends: unknown role(s) {', '.join(sorted(unknown))}; "
                                   f"the roles are {', '.join(ROLES)}")
        if points_alias is not None and "points" not in d:
            d["points"] = points_alias
        for role, value in d.items():
            if str(value) not in BACKENDS:
                raise ModelConfigError(f"backends.{role} is {value!r}; use one of "
                                       f"{', '.join(BACKENDS)}")
        return cls(**{k: str(v) for k, v in d.items()})

    def get(self, role: str) -> str:
        return getattr(self, role)

    def to_dict(self) -> dict[str, str]:
        return {r: self.get(r) for r in ROLES}


@dataclass(frozen=True)
class TextModelConfig:
    checkpoint: str | None = None  # EVF-SAM directory or hub id
    random: bool = False  # random small weights (the tiny profile)
    seed: int = 0
    max_tokens: int = MAX_TEXT_TOKENS
    max_chars: int = MAX_TEXT_CHARS


def _weights(d: Any) -> dict[str, float]:
    """selection.weights: {expert: weight >= 0} (text, reference)."""
    if d is None:
        return {}
    if not isinstance(d, dict) or set(d) - {"text", "reference"}:
        raise ModelConfigError(f"selection.weights is {d!r}; give {{text: w, reference: w}}")
    try:
        out = {str(k): float(v) for k, v in d.items()}
    except (TypeError, ValueError):
        raise ModelConfigError(f"selection.weights must be numbers, got {d!r}") from None
    if any(v < 0 for v in out.values()) or (out and not any(out.values())):
        raise ModelConfigError("selection.weights must be >= 0, not all 0")
    return out


@dataclass(frozen=True)
class ReferenceModelConfig:
    """The reference-image expert (biprompt.models.vrp): a VRP checkpoint directory."""

    checkpoint: str | None = None
    random: bool = False  # random small weights (the tiny profile)
    seed: int = 0


@dataclass(frozen=True)
class ModelProfile:
    name: str | None = None  # None: the SAM model id
    sam: SamConfig = field(default_factory=SamConfig)
    text: TextModelConfig | None = None
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD
    device: str = "cpu"
    dtype: str | None = None  # None: float16 on CUDA, float32 on CPU
    backends: Backends = field(default_factory=Backends)
    reference: ReferenceModelConfig | None = None
    selection_rule: str = "mean"  # biprompt.selection.RULES: how several experts' votes combine
    selection_weights: dict[str, float] = field(default_factory=dict)  # the mean's, per expert
    selection_arbiter: Arbiter | None = None  # the arbiter rule's model (selection.arbiter)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelProfile:
        sam = d.get("sam") or {}
        text = d.get("text_model")
        limits = d.get("text_limits") or {}
        text_cfg = None
        if text:
            if not text.get("checkpoint") and not text.get("random"):
                raise ModelConfigError("text_model needs a checkpoint, or random: true")
            text_cfg = TextModelConfig(
                checkpoint=text.get("checkpoint"), random=bool(text.get("random")),
                seed=int(text.get("seed", 0)),
                max_tokens=int(limits.get("max_tokens", MAX_TEXT_TOKENS)),
                max_chars=int(limits.get("max_chars", MAX_TEXT_CHARS)))
        ref = d.get("reference_model")
        ref_cfg = None
        if ref:
            if not ref.get("checkpoint") and not ref.get("random"):
                raise ModelConfigError("reference_model needs a checkpoint, or random: true")
            ref_cfg = ReferenceModelConfig(checkpoint=ref.get("checkpoint"),
                                           random=bool(ref.get("random")),
                                           seed=int(ref.get("seed", 0)))
        sel = d.get("selection") or {}
        rule = str(sel.get("rule", "mean"))
        if rule not in ("mean", "confident", "arbiter"):
            raise ModelConfigError(f"selection.rule is {sel.get('rule')!r}; use mean, confident "
                                   "or arbiter")
        arbiter = sel.get("arbiter")
        if isinstance(arbiter, (str, Path)):
            arbiter = Arbiter.load(arbiter)
        elif isinstance(arbiter, dict):
            arbiter = Arbiter.from_dict(arbiter)
        elif arbiter is not None and not isinstance(arbiter, Arbiter):
            raise ModelConfigError(f"selection.arbiter is {arbiter!r}; give the path of an "
                                   "arbiter file (python -m biprompt.train.arbiter)")
        if rule == "arbiter" and arbiter is None:
            raise ModelConfigError("selection.rule is arbiter but the profile names no "
                                   "selection.arbiter file")
        alias = sam.get("decoder_backend")
        if alias is not None and str(alias) not in BACKENDS:
            raise ModelConfigError(f"sam.decoder_backend is {alias!r}; use one of "
                                   f"{', '.join(BACKENDS)}")
        backends = Backends.from_dict(d.get("backends"), None if alias is None else str(alias))
        return cls(
            name=d.get("name"),
            sam=SamConfig(checkpoint=sam.get("checkpoint"), variant=sam.get("variant"),
                          seed=int(sam.get("seed", 0)),
                          fast_encoder=bool(sam.get("fast_encoder", True)),
                          decoder_backend=backends.points),
            text=text_cfg,
            agreement_threshold=float(sel.get("agreement_threshold",
                                              DEFAULT_AGREEMENT_THRESHOLD)),
            device=str(d.get("device", "cpu")),
            dtype=d.get("dtype"),
            backends=backends,
            reference=ref_cfg,
            selection_rule=rule,
            selection_weights=_weights(sel.get("weights")),
            selection_arbiter=arbiter,
        )

    @classmethod
    def load(cls, source: str | Path | dict | ModelProfile | None) -> ModelProfile:
        """From a profile, a dict, or a YAML path (None: $BIPROMPT_PROFILE or the demo's)."""
        if isinstance(source, ModelProfile):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        return cls.from_dict(read_profile(resolve_profile_path(source)))

    def with_options(self, *, fast_encoder: bool | None = None,
                     backends: dict[str, str] | None = None, **fields: Any) -> ModelProfile:
        """A copy with top-level fields replaced (None values are ignored); `backends` replaces
        the roles it names."""
        out = replace(self, **{k: v for k, v in fields.items() if v is not None})
        if fast_encoder is not None:
            out = replace(out, sam=replace(out.sam, fast_encoder=bool(fast_encoder)))
        if backends:
            b = Backends.from_dict({**out.backends.to_dict(), **backends})
            out = replace(out, backends=b, sam=replace(out.sam, decoder_backend=b.points))
        return out
