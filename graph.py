"""The Serve application: ImageEncoder, PointDecoder, TextMask and Selector behind an HTTP Ingress.

    serve run configs/serve/local-cpu.yaml      # this machine
    serve run graph:app                         # the embedded defaults
    serve deploy serve_config.yaml              # a GPU cluster

`build_app(args)` is the typed builder a Serve config's `args:` are validated against.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from biprompt.factory import read_profile
from biprompt.images import DEFAULT_MAX_PIXELS
from biprompt.selection import DEFAULT_AGREEMENT_THRESHOLD
from deployments.encoder import ImageEncoder
from deployments.ingress import Ingress
from deployments.point_decoder import PointDecoder
from deployments.selector import Selector
from deployments.text_mask import TextMask

REPO = Path(__file__).resolve().parent
DEPLOYMENTS = {"ImageEncoder": ImageEncoder, "PointDecoder": PointDecoder, "TextMask": TextMask,
               "Selector": Selector, "Ingress": Ingress}
# Defaults for the embedded app: fits one 2-core machine. Serve configs (serve_config.yaml,
# configs/serve/*.yaml) override them per deployment, GPUs included; GPU counts live there only.
# The embedded defaults are for one CPU machine: the heavy models use every core, and batches are
# opportunistic (no wait: requests that queued while a batch ran form the next one), which keeps
# a lone request's latency down. serve_config.yaml sets GPU batch sizes and waits.
CPU_MODEL_CONFIG = {"torch_threads": 0, "batch_wait_timeout_s": 0.0}
DEFAULT_OPTIONS: dict[str, dict] = {
    "ImageEncoder": {"max_ongoing_requests": 16, "max_queued_requests": 128,
                     "user_config": CPU_MODEL_CONFIG, "ray_actor_options": {"num_cpus": 0.5}},
    "PointDecoder": {"max_ongoing_requests": 32, "max_queued_requests": 256,
                     "user_config": {"batch_wait_timeout_s": 0.0},
                     "ray_actor_options": {"num_cpus": 0.25}},
    "TextMask": {"max_ongoing_requests": 16, "max_queued_requests": 128,
                 "user_config": CPU_MODEL_CONFIG, "ray_actor_options": {"num_cpus": 0.5}},
    "Selector": {"max_ongoing_requests": 64, "max_queued_requests": 512,
                 "ray_actor_options": {"num_cpus": 0.1}},
    "Ingress": {"max_ongoing_requests": 64, "max_queued_requests": 256,
                "ray_actor_options": {"num_cpus": 0.1}},
}


def _env(name: str, default=None):
    return os.environ.get(name) or default


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_profile: str = Field(
        default_factory=lambda: _env("BIPROMPT_PROFILE", "configs/models/demo.yaml"),
        description="model profile YAML (configs/models/*.yaml); relative to the repo root")
    cache_url: str | None = Field(
        default_factory=lambda: _env("BIPROMPT_CACHE_URL"),
        description="redis://host:port/db for the shared cache; empty: an in-process LRU")
    cache_ttl_s: int = Field(86400, ge=1, description="time to live of cached embeddings/masks")
    cache_timeout_s: float = Field(0.5, gt=0, description="Redis socket timeout; a slower Redis "
                                   "is a miss")
    local_cache_mb: float = Field(512, gt=0, description="bound of the in-process LRU")
    embedding_dtype: Literal["float16", "float32"] = Field(
        "float16", description="embeddings in transport and cache (float32: bit-exact, 2x bytes)")
    max_body_mb: float = Field(32, gt=0)
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    max_batch_items: int = Field(256, ge=1)
    agreement_threshold: float | None = Field(None, ge=0, le=1, description="default: the "
                                              "profile's")
    fast_encoder: bool | None = Field(None, description="SAM encoder fast attention path "
                                      "(default: the profile's sam.fast_encoder, else on); "
                                      "false: segment-anything's reference forward")
    api_key: str | None = Field(default_factory=lambda: _env("BIPROMPT_API_KEY"),
                                description="if set, every route but /healthz needs "
                                "'Authorization: Bearer <key>'")
    deployment_options: dict[str, dict] = Field(
        default_factory=dict, description="per-deployment .options() overrides (tests, local "
        "runs); a Serve config's `deployments:` section does the same")


def resolve_config(args: AppArgs) -> dict:
    config = args.model_dump()
    path = Path(args.model_profile).expanduser()
    path = path if path.is_absolute() else REPO / path
    config["model_profile"] = str(path)
    threshold = args.agreement_threshold
    if threshold is None:
        sel = read_profile(path).get("selection") or {}
        threshold = sel.get("agreement_threshold", DEFAULT_AGREEMENT_THRESHOLD)
    config["agreement_threshold_resolved"] = float(threshold)
    return config


def build_app(args: AppArgs | dict | None = None) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    unknown = set(args.deployment_options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"deployment_options for unknown deployments {sorted(unknown)}; "
                         f"known: {sorted(DEPLOYMENTS)}")
    config = resolve_config(args)

    def dep(name: str):
        options = {**DEFAULT_OPTIONS[name], **args.deployment_options.get(name, {})}
        return serve.deployment(DEPLOYMENTS[name], name=name, **options)

    encoder = dep("ImageEncoder").bind(config)
    decoder = dep("PointDecoder").bind(config)
    text = dep("TextMask").bind(config)
    selector = dep("Selector").bind(config)
    return dep("Ingress").bind(encoder, decoder, text, selector, config)


app = build_app(AppArgs())
