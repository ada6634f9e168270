"""The app's settings, typed end to end: a Serve config's `args:` validate into `AppArgs`, and
every deployment receives the same (resolved) `AppArgs`. Defaults come from biprompt.config."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from biprompt import config as C
from biprompt.profile import ModelProfile


def _env(name: str, default=None):
    return os.environ.get(name) or default


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_profile: str = Field(
        default_factory=lambda: _env(C.PROFILE_ENV, C.DEFAULT_PROFILE),
        description="model profile YAML (configs/models/*.yaml); relative paths: see "
        "biprompt.config.resolve_profile_path")
    cache_url: str | None = Field(
        default_factory=lambda: _env("BIPROMPT_CACHE_URL"),
        description="redis://host:port/db for the shared cache; empty: an in-process LRU")
    cache_ttl_s: int = Field(C.CACHE_TTL_S, ge=1,
                             description="time to live of cached embeddings and text masks")
    cache_timeout_s: float = Field(C.CACHE_TIMEOUT_S, gt=0,
                                   description="Redis socket timeout; a slower Redis is a miss")
    local_cache_mb: float = Field(C.LOCAL_CACHE_MB, gt=0, description="bound of the in-process LRU")
    embedding_dtype: Literal["float16", "float32"] = Field(
        "float16", description="embeddings in transport and cache (float32: bit-exact, 2x bytes)")
    replica_embeddings: int = Field(
        16, ge=1, description="embeddings each PointDecoder and TextMask replica keeps, by image "
        "(with a shared cache, requests for an image are routed to the replica holding it)")
    max_body_mb: float = Field(C.MAX_BODY_MB, gt=0)
    max_image_pixels: int = Field(C.DEFAULT_MAX_PIXELS, gt=0)
    max_batch_items: int = Field(C.MAX_BATCH_ITEMS, ge=1)
    agreement_threshold: float | None = Field(None, ge=0, le=1, description="default: the "
                                              "profile's")
    fast_encoder: bool | None = Field(None, description="SAM encoder fast attention path "
                                      "(default: the profile's sam.fast_encoder, else on); "
                                      "false: segment-anything's reference forward")
    backends: dict[Literal["encoder", "points", "text"],
                   Literal["torch", "onnxruntime", "openvino", "auto"]] = Field(
        default_factory=dict, description="each role's runtime, overriding the profile's "
        "`backends:` (biprompt.engines.backends): torch, onnxruntime, openvino (CPU, float32) or "
        "auto (the fastest measured on this CPU)")
    api_key: str | None = Field(default_factory=lambda: _env("BIPROMPT_API_KEY"),
                                description="if set, every route but /healthz needs "
                                "'Authorization: Bearer <key>'")
    deployment_options: dict[str, dict] = Field(
        default_factory=dict, description="per-deployment .options() overrides (tests, local "
        "runs); a Serve config's `deployments:` section does the same")

    def resolved(self) -> AppArgs:
        """The profile path made absolute, the agreement threshold taken from the profile when
        not given: what every deployment receives."""
        path = C.resolve_profile_path(self.model_profile)
        threshold = self.agreement_threshold
        if threshold is None:
            threshold = ModelProfile.load(path).agreement_threshold
        return self.model_copy(update={"model_profile": str(path),
                                       "agreement_threshold": float(threshold)})

    def profile(self) -> ModelProfile:
        """The model profile with this app's overrides applied."""
        return ModelProfile.load(self.model_profile).with_options(
            agreement_threshold=self.agreement_threshold, fast_encoder=self.fast_encoder,
            backends=dict(self.backends) or None)
