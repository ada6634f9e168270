"""deploy/kuberay: the generated RayService against KubeRay's CRD (vendored in tests/data/kuberay)
and Kubernetes' own schemas (kubernetes-validate, offline), and against what it deploys:
serve_config.yaml, SERVE_ENV, the pods' resources, Redis's settings."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deployments.driver import SERVE_ENV

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
CRD = REPO / "tests" / "data" / "kuberay" / "ray.io_rayservices.yaml"
K8S = "1.33"
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DELETE = object()

_spec = importlib.util.spec_from_file_location("kuberay_generate", KUBERAY / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

SERVICES = [d for d in yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text())
            if d["kind"] == "RayService"]
REDIS = list(yaml.safe_load_all((KUBERAY / "redis.yaml").read_text()))
SERVE_CONFIG = yaml.safe_load((REPO / "serve_config.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for app in SERVE_CONFIG["applications"] for d in app["deployments"]}
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def strict(schema: dict) -> dict:
    """A CRD schema as the API server applies it under Strict field validation (`kubectl apply
    --validate=strict`): an unknown field is an error rather than pruned. Quantities and other
    int-or-string fields are `anyOf` + `pattern` in the CRD already, which jsonschema checks."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            s[key] = strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    return s


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft4Validator]:
    """apiVersion -> validator (OpenAPI v3.0's schema objects are close to JSON Schema draft 4).
    Not checked: the CRD's CEL rules (x-kubernetes-validations; none applies to this manifest)."""
    # 1 MB of YAML: libyaml loads it in under a second, pure-Python PyYAML in seven
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == "RayService"
    return {f"{crd['spec']['group']}/{v['name']}": jsonschema.Draft4Validator(
        strict(v["schema"]["openAPIV3Schema"]), format_checker=FORMATS)
        for v in crd["spec"]["versions"]}


def errors(validators, doc: dict) -> list[tuple[tuple, str]]:
    found = validators[doc["apiVersion"]].iter_errors(doc)
    return [(tuple(e.absolute_path), e.message) for e in found]


def edit(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def test_there_is_a_rayservice():
    assert [s["metadata"]["name"] for s in SERVICES] == ["biprompt"]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s["metadata"]["name"])
def test_rayservice_matches_the_crd(validators, service):
    assert errors(validators, service) == []


RC = ("spec", "rayClusterConfig")
HEAD_CONTAINER = (*RC, "headGroupSpec", "template", "spec", "containers", 0)
WORKER = (*RC, "workerGroupSpecs", 0)


@pytest.mark.parametrize("path, value", [
    ((*WORKER, "replicas"), "two"),                            # type
    ((*RC, "headGroupSpec"), DELETE),                          # required
    ((*WORKER, "groupName"), DELETE),                          # required, in a list item
    ((*WORKER, "maxReplica"), 4),                              # unknown field (strict)
    ((*RC, "autoscalerOptions", "upscalingMode"), "Fast"),     # enum
    ((*HEAD_CONTAINER, "resources", "limits", "cpu"), "lots"),  # int-or-string quantity pattern
    ((*RC, "autoscalerOptions", "idleTimeoutSeconds"), 2**31),  # format int32
    (("spec", "serveConfigV2"), {"applications": []}),         # a string, not a mapping
], ids=["type", "required", "required-item", "unknown", "enum", "quantity", "int32", "string"])
def test_crd_validation_catches(validators, path, value):
    found = errors(validators, edit(SERVICES[0], path, value))
    assert any(p in (path, path[:-1]) for p, _ in found), found


def pod_template(template: dict) -> dict:
    """A RayService's pod template as the built-in PodTemplate object that carries it."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
            "template": template}


def builtin_objects() -> dict[str, dict]:
    objects = {f"redis.yaml {d['kind']}": d for d in REDIS}
    for s in SERVICES:
        rc = s["spec"]["rayClusterConfig"]
        objects[f"{s['metadata']['name']} head"] = pod_template(rc["headGroupSpec"]["template"])
        for g in rc["workerGroupSpecs"]:
            objects[f"{s['metadata']['name']} {g['groupName']}"] = pod_template(g["template"])
    return objects


@pytest.mark.parametrize("name", builtin_objects())
def test_builtin_objects_match_kubernetes(name):
    assert kubernetes_validate.validate(builtin_objects()[name], K8S, strict=True) == K8S


@pytest.mark.parametrize("name, path, value", [
    ("redis.yaml Deployment", ("spec", "replicas"), "one"),
    ("biprompt head", ("template", "spec", "containers", 0, "resource"), {}),
    ("redis.yaml Service", ("spec", "ports", 0, "port"), "6379"),
], ids=["type", "unknown", "port-type"])
def test_kubernetes_validation_catches(name, path, value):
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(edit(builtin_objects()[name], path, value), K8S, strict=True)


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s["metadata"]["name"])
def test_serve_config_is_embedded(service):
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == SERVE_CONFIG


def test_generated_file_is_current(tmp_path):
    assert generate.main(["--check"]) == 0
    stale = tmp_path / "rayservice.yaml"
    current = (KUBERAY / "rayservice.yaml").read_text()
    stale.write_text(current.replace("maxReplicas:", "maxReplicas: 1 #"))
    assert generate.main(["--check", "--out", str(stale)]) == 1


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def groups(service: dict) -> dict[str, tuple[float, float]]:
    """Group -> (CPUs, GPUs) that Ray sees in each pod: rayStartParams, else the container's
    limits, else its requests (KubeRay's order)."""
    rc = service["spec"]["rayClusterConfig"]
    out = {}
    named = [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc["workerGroupSpecs"]]
    for name, g in named:
        res = g["template"]["spec"]["containers"][0]["resources"]
        params = g.get("rayStartParams", {})
        lim, req = res.get("limits", {}), res.get("requests", {})
        cpu = params.get("num-cpus", cpus(lim.get("cpu", req.get("cpu", 0))))
        gpu = params.get("num-gpus", lim.get("nvidia.com/gpu", req.get("nvidia.com/gpu", 0)))
        out[name] = (float(cpu), float(gpu))
    return out


def needs(name: str) -> tuple[float, float]:
    opts = DEPLOYMENTS[name].get("ray_actor_options", {})
    return float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0))


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_each_replica_fits_a_group(name):
    cpu, gpu = needs(name)
    fits = [g for g, (c, n) in groups(SERVICES[0]).items() if cpu <= c and gpu <= n]
    assert fits, f"{name} needs {cpu} CPU, {gpu} GPU: {groups(SERVICES[0])}"
    if gpu:
        assert "head" not in fits
    else:
        assert "head" in fits  # the CPU deployments run on the head


def test_groups_hold_the_autoscaling_range():
    rc = SERVICES[0]["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    head_cpu, head_gpu = groups(SERVICES[0])["head"]
    assert head_gpu == 0
    cpu_only = [n for n in DEPLOYMENTS if not needs(n)[1]]
    assert sum(DEPLOYMENTS[n]["autoscaling_config"]["min_replicas"] * needs(n)[0]
               for n in cpu_only) <= head_cpu
    (gpu_group,) = [g for g in rc["workerGroupSpecs"] if groups(SERVICES[0])[g["groupName"]][1]]
    pod_cpu, pod_gpu = groups(SERVICES[0])[gpu_group["groupName"]]
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    for bound, pods in (("min_replicas", gpu_group["minReplicas"]),
                        ("max_replicas", gpu_group["maxReplicas"])):
        on_gpu = [(DEPLOYMENTS[n]["autoscaling_config"][bound], *needs(n))
                  for n in DEPLOYMENTS if needs(n)[1]]
        assert sum(k * g for k, _, g in on_gpu) <= pods * pod_gpu, bound
        assert sum(k * c for k, c, _ in on_gpu) <= pods * pod_cpu, bound


def test_ray_containers_carry_serve_env():
    assert DRAIN in SERVE_ENV  # renamed? then the generator's exception is stale too
    expected = {k: v for k, v in SERVE_ENV.items() if k != DRAIN}
    rc = SERVICES[0]["spec"]["rayClusterConfig"]
    templates = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for container in [c for t in templates for c in t["spec"]["containers"]]:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert {k: v for k, v in env.items() if k.startswith("RAY_")} == expected, container["name"]


def test_ray_version_matches_the_pin():
    pin = re.search(r'"ray\[serve\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert SERVICES[0]["spec"]["rayClusterConfig"]["rayVersion"] == pin
    assert f"FROM rayproject/ray:{pin}-" in (REPO / "deploy" / "Dockerfile").read_text()


def size(text: str) -> int:
    """Bytes in a Redis size ("16gb") or a Kubernetes memory quantity ("20Gi")."""
    number, unit = re.fullmatch(r"(\d+)([a-zA-Z]*)", text).groups()
    return int(number) * {"": 1, "mb": 2**20, "gb": 2**30, "Mi": 2**20, "Gi": 2**30}[unit]


def test_redis_is_a_bounded_cache_at_the_cache_url():
    deployment, service = (next(d for d in REDIS if d["kind"] == k)
                           for k in ("Deployment", "Service"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    local = dict(line.split(None, 1) for line in (REPO / "configs/redis/local.conf").read_text()
                 .splitlines() if line.strip() and not line.startswith("#"))
    for key in ("maxmemory-policy", "maxmemory-samples", "save", "appendonly"):
        assert args[f"--{key}"] == local[key].strip('"'), key
    assert size(args["--maxmemory"]) > size(local["maxmemory"])
    assert size(args["--maxmemory"]) <= 0.8 * size(container["resources"]["limits"]["memory"])
    url = urlparse(SERVE_CONFIG["applications"][0]["args"]["cache_url"])
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
