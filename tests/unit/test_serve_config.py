"""serve_config.yaml and configs/serve/*.yaml: valid for Serve's own schema, for our AppArgs, and
consistent with the deployments (names, batching knobs, GPU layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from graph import DEPLOYMENTS, REPO, AppArgs, build_app

CONFIGS = [REPO / "serve_config.yaml", *sorted((REPO / "configs" / "serve").glob("*.yaml"))]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_serve_schema_and_app_args(path):
    cfg = load(path)
    ServeDeploySchema.model_validate(cfg)  # raises on anything Serve would refuse
    (app,) = cfg["applications"]
    assert app["import_path"] == "graph:build_app"
    args = AppArgs.model_validate(app["args"])
    profile = REPO / args.model_profile
    assert profile.is_file(), f"{path.name} names a missing profile {profile}"
    names = [d["name"] for d in app["deployments"]]
    assert sorted(names) == sorted(DEPLOYMENTS)
    for d in app["deployments"]:
        batching = d.get("user_config") or {}
        assert set(batching) <= {"max_batch_size", "batch_wait_timeout_s", "torch_threads"}
        if "max_batch_size" in batching:  # a batch can't fill past max_ongoing_requests
            assert batching["max_batch_size"] <= d["max_ongoing_requests"], d["name"]
        assert d.get("max_queued_requests", -1) > 0, f"{d['name']}: bound the queue"


def test_production_gpu_layout():
    deps = {d["name"]: d for d in load(REPO / "serve_config.yaml")["applications"][0]["deployments"]}
    gpus = {name: d["ray_actor_options"].get("num_gpus", 0) for name, d in deps.items()}
    assert gpus == {"ImageEncoder": 1, "TextMask": 1, "PointDecoder": 0.25,
                    "ReferenceMask": 0.25, "Selector": 0, "Ingress": 0}
    for name in ("ImageEncoder", "TextMask", "PointDecoder", "ReferenceMask", "Selector",
                 "Ingress"):
        auto = deps[name]["autoscaling_config"]
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"]


def test_local_cpu_config_uses_no_gpu_and_fits_two_cores():
    deps = load(REPO / "configs/serve/local-cpu.yaml")["applications"][0]["deployments"]
    assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in deps)
    assert sum(d["ray_actor_options"]["num_cpus"] for d in deps) <= 2


def test_app_args_reject_unknown_fields_and_deployments():
    with pytest.raises(ValueError, match="extra"):
        AppArgs.model_validate({"model_profil": "x"})
    with pytest.raises(ValueError, match="unknown deployments"):
        build_app({"deployment_options": {"Encoder": {}}})


def test_build_app_resolves_profile_and_threshold():
    app = build_app({"agreement_threshold": 0.3})
    ingress = app._bound_deployment
    args = ingress.init_args[-1]
    assert isinstance(args, AppArgs)  # typed end to end, not a dict
    assert Path(args.model_profile).is_absolute()
    assert args.agreement_threshold == 0.3
    # without an override, the threshold is the profile's (demo: 0.01)
    default = build_app({})._bound_deployment.init_args[-1]
    assert default.agreement_threshold == 0.01
