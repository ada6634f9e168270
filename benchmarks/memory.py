"""What each replica of the served app holds in memory, next to one process holding the whole
pipeline, at vit_b scale (SAM vit_b + BEiT-3 base, random weights).

    .venv/bin/python -m benchmarks.memory [--profile P] [--json out.json]

Without `--profile` the vit_b-shaped random checkpoints of `benchmarks/checkpoints.py` are written
(or reused) under `--checkpoints`. Two measurements, one after the other:

- one process, the whole pipeline: a fresh subprocess runs `BiPromptPipeline.from_config`, embeds
  one image, segments it with a point and a text, then reads its own /proc/self/status;
- the served app on a local Ray cluster: one cold request (a new image, a point and a text) goes
  through every role, then each replica reports peak RSS (VmHWM), steady RSS (VmRSS), seconds from
  its process start to the end of its constructor, and the bytes of parameters it holds, through
  its `stats()` handle method. The replicas' processes are also found in Ray's actor table and
  their /proc/<pid>/status read from here (same machine): that covers a deployment whose
  `stats()` is missing or says less, and cross-checks the ones that answer.

Where CUDA is present, `torch.cuda.max_memory_allocated` is read in every replica (inside it,
through `__ray_call__`, unless its `stats()` reports it) and in the whole-pipeline process;
without CUDA that column is left out. It counts what the profile and the app's options put on the
GPU: the random vit_b profile says `device: cpu`.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
APP = "memory"
DEPLOYMENTS = ("ImageEncoder", "PointDecoder", "TextMask", "ReferenceMask", "Selector",
               "Ingress")
# What a replica or pipeline may hold, by the name `weights()` / `stats()["weights"]` report;
# "evf.image_encoder" is EVF-SAM's own copy of SAM's image encoder.
# "vrp" and "reference.sam.*" are the reference expert's (its VRP encoder, and the SAM prompt
# encoder and mask decoder it turns annotations into masks with).
PARTS = ("sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder", "evf.beit3",
         "evf.text_hidden_fcs", "evf.prompt_encoder", "evf.mask_decoder", "evf.image_encoder",
         "vrp", "reference.sam.prompt_encoder", "reference.sam.mask_decoder")
IMAGE_SIZE = (480, 640)  # rows, columns: the served vit_b benchmark's images
CHILD_TIMEOUT_S = 300


# --- the request --------------------------------------------------------------------------------


def request_inputs(seed: int, size: tuple[int, int] = IMAGE_SIZE) -> dict:
    """One ShapesRef scene (HxWx3 uint8 and its PNG), a click on one object and its expression;
    the same for the same seed in any process."""
    from PIL import Image

    from biprompt.data.shapes_ref import generate_scene, sample_from_scene

    rng = np.random.default_rng(seed)
    scene = generate_scene(rng, *size)
    sample = sample_from_scene(scene, rng)
    buf = io.BytesIO()
    Image.fromarray(scene.image).save(buf, format="PNG")
    return {"rgb": scene.image, "png": buf.getvalue(), "points": [list(sample.point_index)],
            "text": sample.expression}


# --- reading a process --------------------------------------------------------------------------


STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def proc_status_mb(pid: int | str = "self") -> dict:
    """Peak RSS (VmHWM), RSS (VmRSS) and the RSS split into anonymous memory and file-backed pages
    (RssAnon, RssFile: memory-mapped checkpoints land there) of a Linux process, in MB, keyed
    `vmhwm_mb`, `vmrss_mb`, `rssanon_mb`, `rssfile_mb`; None for a field that can't be read."""
    out: dict = {f.lower() + "_mb": None for f in STATUS_FIELDS}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        field = line.split(":", 1)[0]
        if field in STATUS_FIELDS:
            out[field.lower() + "_mb"] = int(line.split()[1]) / 1024.0  # kB
    return out


def cuda_peak_mb() -> float | None:
    """`torch.cuda.max_memory_allocated` of this process in MB; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _module_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module else 0


def pipeline_weights(pipe) -> dict[str, int]:
    """Bytes of parameters `pipe` holds, by part: its own `weights()` where it has one, else read
    from the module tree segment-anything and EVF-SAM lay out (parts it lacks are left out)."""
    if hasattr(pipe, "weights"):
        return {k: int(v) for k, v in pipe.weights().items()}
    sam, text = pipe.sam, pipe.text
    evf = getattr(text, "model", None)
    modules = {
        "sam.image_encoder": getattr(sam, "image_encoder", None),
        "sam.prompt_encoder": getattr(sam, "prompt_encoder", None),
        "sam.mask_decoder": getattr(sam, "mask_decoder", None),
        "evf.beit3": getattr(evf, "mm_extractor", None),
        "evf.text_hidden_fcs": getattr(evf, "text_hidden_fcs", None),
        "evf.prompt_encoder": getattr(getattr(evf, "visual_model", None), "prompt_encoder", None),
        "evf.mask_decoder": getattr(getattr(evf, "visual_model", None), "mask_decoder", None),
        "evf.image_encoder": getattr(getattr(evf, "visual_model", None), "image_encoder", None),
    }
    return {k: b for k, m in modules.items() if (b := _module_bytes(m))}


# --- one process, the whole pipeline -----------------------------------------------------------


def _whole_pipeline_child(profile: str, seed: int) -> dict:
    """Runs in a fresh interpreter: load, embed, segment, then read this process."""
    from deployments.process import ReplicaClock

    clock = ReplicaClock()  # the same clock the replicas use: process start -> loaded
    from biprompt.pipeline import BiPromptPipeline

    pipe = BiPromptPipeline.from_config(profile)
    clock.ready()
    req = request_inputs(seed)
    t = time.perf_counter()
    emb = pipe.embed(req["rgb"])
    res = pipe.segment(emb, req["points"], text=req["text"])
    request_ms = (time.perf_counter() - t) * 1000
    if res.text_mask is None:
        raise RuntimeError("the whole pipeline ran no text model: the profile has none")
    gc.collect()
    split = {k: v for k, v in proc_status_mb().items() if k.startswith("rss")}
    return {**clock.stats(), **split, "request_ms": request_ms, "weights": pipeline_weights(pipe),
            "cuda_max_allocated_mb": cuda_peak_mb(), "ray_imported": "ray" in sys.modules}


def whole_pipeline(profile: str | Path, seed: int) -> dict:
    """The whole pipeline in one fresh subprocess (this process's memory is not counted)."""
    cmd = [sys.executable, "-m", "benchmarks.memory", "--whole-pipeline-child",
           "--profile", str(Path(profile).resolve()), "--seed", str(seed)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the whole-pipeline process failed ({done.returncode}):\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the served app ----------------------------------------------------------------------------


def replica_actors(app: str) -> dict[str, list[dict]]:
    """{deployment: [{"pid", "name"}]} of the app's live replica actors (class names
    `ServeReplica:<app>:<Deployment>`) in the cluster this process is connected to: from the
    state API where it runs a dashboard, else from its GCS actor table (the benchmarks start Ray
    without a dashboard)."""
    import ray

    prefix = f"ServeReplica:{app}:"
    rows: list[tuple[str, int, str]] = []
    # NOTE: without an address the state API asks localhost:8265, which may be another cluster's
    # dashboard: ask this cluster's own, or read its GCS table.
    dashboard = ray._private.worker.global_worker.node.address_info.get("webui_url")
    if dashboard:
        from ray.util.state import list_actors

        for a in list_actors(address=f"http://{dashboard}", filters=[("state", "=", "ALIVE")],
                             limit=10_000):
            rows.append((a.class_name, a.pid, a.name))
    else:
        from ray._private.state import actors

        for a in actors().values():
            if a.get("State") == "ALIVE":
                rows.append((a.get("ActorClassName") or "", a.get("Pid"), a.get("Name")))
    out: dict[str, list[dict]] = {}
    for cls, pid, name in rows:
        if cls.startswith(prefix) and pid:
            out.setdefault(cls[len(prefix):], []).append({"pid": int(pid), "name": name})
    return out


def _replica_cuda_peak_mb(_replica) -> float | None:
    """Run inside a replica actor (`__ray_call__`)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _actor_cuda_peak_mb(name: str) -> float | None:
    import ray

    actor = ray.get_actor(name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(_replica_cuda_peak_mb), timeout=60)


def _stats(calls, app: str, deployment: str) -> tuple[dict | None, str | None]:
    try:
        return calls.call(app, deployment, "stats", timeout=60), None
    except Exception as e:  # noqa: BLE001 - a deployment without stats() (or one that fails)
        lines = [x for x in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if x.strip()]
        return None, (lines[-1] if lines else type(e).__name__)[:300]


def replica_rows(calls, app: str, cuda: bool) -> list[dict]:
    """One row per live replica of each deployment: its stats() where the handle reached it, its
    /proc status read from here in any case."""
    actors = replica_actors(app)
    rows = []
    for dep in DEPLOYMENTS:
        stats, error = _stats(calls, app, dep)
        process = (stats or {}).get("process") or {}
        for actor in actors.get(dep, []):
            proc = proc_status_mb(actor["pid"])
            answered = process.get("pid") == actor["pid"]
            row = {
                "deployment": dep, "pid": actor["pid"],
                "vmhwm_mb": process.get("vmhwm_mb") if answered else proc["vmhwm_mb"],
                "vmrss_mb": process.get("vmrss_mb") if answered else proc["vmrss_mb"],
                "ready_s": process.get("ready_s") if answered else None,
                "constructor_s": process.get("constructor_s") if answered else None,
                "weights": (stats or {}).get("weights") if answered else None,
                "rssanon_mb": proc["rssanon_mb"], "rssfile_mb": proc["rssfile_mb"],
                "proc_vmhwm_mb": proc["vmhwm_mb"], "proc_vmrss_mb": proc["vmrss_mb"],
                "source": "stats" if answered else "proc",
                "stats_error": error,
            }
            if cuda:
                row["cuda_max_allocated_mb"] = process.get("cuda_max_allocated_mb")
                if row["cuda_max_allocated_mb"] is None:
                    row["cuda_max_allocated_mb"] = _actor_cuda_peak_mb(actor["name"])
            rows.append(row)
    return rows


def served(profile: str | Path, seed: int) -> dict:
    """Deploy the app on a fresh local cluster, send one cold request with a point and a text,
    read every replica, and shut Ray down."""
    import ray
    from biprompt_client import BiPromptClient
    from ray import serve

    from benchmarks.serving import deploy, start_cluster
    from deployments.driver import DriverCalls

    req = request_inputs(seed)
    port = start_cluster()
    calls = DriverCalls()
    try:
        url, startup_s = deploy(port, str(profile), APP, cache_url=None)
        with BiPromptClient(url, timeout=600, max_retries=0) as client:
            t = time.perf_counter()
            res = client.segment(image=req["png"], points=req["points"], text=req["text"])
            request_ms = (time.perf_counter() - t) * 1000
        missing = {"encoder", "point_decoder", "text_model", "selector"} - set(res.timings_ms)
        if missing:
            raise RuntimeError(f"the cold request skipped {sorted(missing)}: {res.timings_ms}")
        cuda = cuda_peak_mb() is not None
        rows = replica_rows(calls, APP, cuda)
    finally:
        calls.close()
        serve.shutdown()
        ray.shutdown()
    return {"startup_s": startup_s, "request_ms": request_ms, "timings_ms": res.timings_ms,
            "replicas": rows}


def run(profile: str | Path, seed: int = 0, scale: str = "vit_b") -> dict:
    """Both measurements on `profile` (`scale` names it in the report); the dict BENCHMARKS.md's
    memory section renders."""
    t0 = time.perf_counter()
    whole = whole_pipeline(profile, seed)
    app = served(profile, seed)
    return {"scale": scale, "profile": str(profile), "seed": seed, "image_size": list(IMAGE_SIZE),
            "whole_pipeline": whole, **app, "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=None,
                    help="model profile (default: the vit_b-shaped random checkpoints)")
    ap.add_argument("--checkpoints", default=str(REPO / "out/bench/checkpoints"),
                    help="where the vit_b-shaped random checkpoints are written (reused)")
    ap.add_argument("--seed", type=int, default=0, help="scene seed of the one request")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--whole-pipeline-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.whole_pipeline_child:
        out = _whole_pipeline_child(args.profile, args.seed)
        print(json.dumps(out))
        return out
    profile, scale = args.profile, "vit_b"
    if profile is None:
        from benchmarks.checkpoints import write_vitb_checkpoints

        profile = write_vitb_checkpoints(Path(args.checkpoints))["profile"]
    else:
        profile, scale = Path(profile).resolve(), Path(profile).stem
    results = run(profile, args.seed, scale)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    from benchmarks.report import memory_section

    print("\n".join(memory_section(results)))
    return results


if __name__ == "__main__":
    main()
