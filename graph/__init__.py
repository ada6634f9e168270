"""The Serve application: ImageEncoder, PointDecoder, TextMask, ReferenceMask and Selector behind
an HTTP Ingress.

    serve run configs/serve/local-cpu.yaml      # this machine
    serve run graph:app                         # the embedded defaults
    serve deploy serve_config.yaml              # a GPU cluster

`build_app(args)` is the typed builder a Serve config's `args:` are validated against
(`AppArgs`, deployments/settings.py). Every deployment receives the same resolved `AppArgs` and
builds only its own engine.
"""

from __future__ import annotations

from pathlib import Path

from ray import serve
from ray.serve import Application

from deployments.encoder import ImageEncoder
from deployments.ingress import Ingress
from deployments.point_decoder import PointDecoder
from deployments.reference_mask import ReferenceMask
from deployments.selector import Selector
from deployments.settings import AppArgs
from deployments.text_mask import TextMask

__all__ = ["DEFAULT_OPTIONS", "DEPLOYMENTS", "REPO", "AppArgs", "app", "build_app"]

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENTS = {"ImageEncoder": ImageEncoder, "PointDecoder": PointDecoder, "TextMask": TextMask,
               "ReferenceMask": ReferenceMask, "Selector": Selector, "Ingress": Ingress}
# Defaults for the embedded app: fits one 2-core machine. Serve configs (serve_config.yaml,
# configs/serve/*.yaml) override them per deployment, GPUs included; GPU counts live there only.
# The embedded defaults are for one CPU machine: the models use every core (the point decoder too;
# without torch_threads a fractional num_cpus gets Ray's one thread: the served warm click at vit_b
# scale took 115 ms on auto's backends so, 88 ms on 2 threads), and batches are opportunistic (no wait: requests that queued while a batch ran form the next one), which keeps
# a lone request's latency down. serve_config.yaml sets GPU batch sizes and waits.
CPU_MODEL_CONFIG = {"torch_threads": 0, "batch_wait_timeout_s": 0.0}
# Draining (scale-down, redeploys, shutdown): Serve stops sending a replica new requests, then
# waits for its in-flight ones, checking every 0.5 s (Serve's default is 2 s, which every local
# shutdown and scale-down waited out), for at most the timeout: a model replica may hold a
# queued batch behind the running one.
MODEL_DRAIN = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 60}
LIGHT_DRAIN = {"graceful_shutdown_wait_loop_s": 0.5, "graceful_shutdown_timeout_s": 20}
DEFAULT_OPTIONS: dict[str, dict] = {
    "ImageEncoder": {"max_ongoing_requests": 16, "max_queued_requests": 128,
                     "user_config": CPU_MODEL_CONFIG, "ray_actor_options": {"num_cpus": 0.5},
                     **MODEL_DRAIN},
    "PointDecoder": {"max_ongoing_requests": 32, "max_queued_requests": 256,
                     "user_config": CPU_MODEL_CONFIG,
                     "ray_actor_options": {"num_cpus": 0.25}, **MODEL_DRAIN},
    "TextMask": {"max_ongoing_requests": 16, "max_queued_requests": 128,
                 "user_config": CPU_MODEL_CONFIG, "ray_actor_options": {"num_cpus": 0.5},
                 **MODEL_DRAIN},
    "ReferenceMask": {"max_ongoing_requests": 16, "max_queued_requests": 128,
                      "user_config": CPU_MODEL_CONFIG, "ray_actor_options": {"num_cpus": 0.25},
                      **MODEL_DRAIN},
    "Selector": {"max_ongoing_requests": 64, "max_queued_requests": 512,
                 "ray_actor_options": {"num_cpus": 0.1}, **LIGHT_DRAIN},
    "Ingress": {"max_ongoing_requests": 64, "max_queued_requests": 256,
                "ray_actor_options": {"num_cpus": 0.1}, **LIGHT_DRAIN},
}


def build_app(args: AppArgs | dict | None = None) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    unknown = set(args.deployment_options) - set(DEPLOYMENTS)
    if unknown:
        raise ValueError(f"deployment_options for unknown deployments {sorted(unknown)}; "
                         f"known: {sorted(DEPLOYMENTS)}")
    resolved = args.resolved()

    def dep(name: str):
        options = {**DEFAULT_OPTIONS[name], **args.deployment_options.get(name, {})}
        return serve.deployment(DEPLOYMENTS[name], name=name, **options)

    encoder = dep("ImageEncoder").bind(resolved)
    decoder = dep("PointDecoder").bind(resolved)
    text = dep("TextMask").bind(resolved)
    selector = dep("Selector").bind(resolved)
    # always bound, as TextMask is: without a reference model in the profile its replica holds
    # no model and the Ingress refuses `reference` (422)
    reference = dep("ReferenceMask").bind(resolved)
    return dep("Ingress").bind(encoder, decoder, text, selector, resolved, reference=reference)


app = build_app(AppArgs())
