"""What every exported CPU backend shares: a torch module exported to ONNX (checked against the
module before it is used), the export cache, and the two CPU runtimes that run the graphs.

    backend      runs                                   where
    torch        the module itself                      any device and dtype
    onnxruntime  the ONNX graph, CPUExecutionProvider   the CPU, float32
    openvino     the same ONNX graph, OpenVINO's CPU    the CPU, float32 (precision hint f32, so
                 plugin                                 a bf16-capable CPU doesn't round)

Graphs are exported at first use from the weights already loaded (no download) and cached under
`biprompt.weights.cache_dir()/onnx` (beside the Hugging Face cache; BIPROMPT_CACHE moves it),
keyed by a sha256 of the weights and shapes (`modules_digest`) and by the exporter's version; each
file is written atomically (a temporary file, then os.replace), so replicas that export at once
never read half a file. Both runtimes read the same file. Exported with torch's TorchScript-based
exporter (`dynamo=False`): the torch.export-based one took 20x longer on these graphs and needs
onnxscript.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from biprompt.errors import ModelConfigError
from biprompt.profile import BACKENDS

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")
OPSET = 17
EXPORT_TOLERANCE = 1e-4  # a fresh export must match the torch module this closely


def check_backend(backend: str, what: str) -> str:
    if backend not in BACKENDS:
        raise ModelConfigError(f"{what} is {backend!r}; use one of {', '.join(BACKENDS)}")
    return backend


def onnx_cache_dir() -> Path:
    """Where exported graphs live: beside the Hugging Face cache (BIPROMPT_CACHE moves it)."""
    from biprompt.weights import cache_dir

    return cache_dir() / "onnx"


def modules_digest(spec: Mapping, modules: Mapping[str, nn.Module]) -> str:
    """sha256 of `spec` (JSON) and of every tensor the modules hold (names, dtypes, shapes,
    bytes): an export's cache key. The weights exported, whatever file, hub id or seed they came
    from; hashing costs about 0.2 s per 100 M parameters, where reading a checkpoint costs more."""
    h = hashlib.sha256(json.dumps(dict(spec), sort_keys=True, default=str).encode())
    for prefix, module in modules.items():
        for name, t in module.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def float32(module: nn.Module) -> nn.Module:
    """`module` if it is float32 already, else a float32 copy (the caller's stays as it is)."""
    if all(t.dtype == torch.float32 for t in module.state_dict().values() if t.is_floating_point()):
        return module
    return copy.deepcopy(module).float()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_onnx(module: nn.Module, args: Sequence[torch.Tensor], inputs: Sequence[str],
                outputs: Sequence[str], dynamic: Mapping[str, Mapping[int, str]], what: str,
                tolerance: float = EXPORT_TOLERANCE) -> bytes:
    """The ONNX bytes of `module` traced on `args`, checked against the module's own forward on
    `args` in ONNX Runtime: a graph that differs by more than `tolerance` is refused
    (ModelConfigError), so a broken export never serves."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        # NOTE: the legacy exporter announces its deprecation, and the tracer notes constants
        # (segment-anything's attention scales, shapes of the traced example).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        torch.onnx.export(module.eval(), tuple(args), buf, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes={k: dict(v) for k, v in
                                                                    dynamic.items()},
                          opset_version=OPSET, dynamo=False)
    data = buf.getvalue()
    with torch.no_grad():
        want = module(*args)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.numpy() for n, a in zip(inputs, args, strict=True)})
    err = max(float(np.abs(g - w.float().numpy()).max()) for g, w in zip(got, want, strict=True))
    if not err <= tolerance:
        raise ModelConfigError(f"the exported {what} differs from torch by {err:.2e} (more "
                               f"than {tolerance:g}): not using it")
    return data


def cached_graph(cache: Path, filename: str, export: Callable[[], bytes]) -> tuple[Path | bytes, bool]:
    """The cached file `cache/filename`, exported (`export()`) and written first if missing;
    the bytes when the cache can't be written. Also whether it was exported now."""
    path = cache / filename
    if path.is_file():
        return path, False
    data = export()
    try:
        write_atomic(path, data)
        return path, True
    except OSError as exc:
        log.warning("could not cache the exported graph at %s (%s): exported again at the next "
                    "load", path, exc)
        return data, True


def graph_bytes(graph: Path | bytes) -> int:
    return graph.stat().st_size if isinstance(graph, Path) else len(graph)


class Runtime:
    """One exported graph on one CPU runtime: `run(feed) -> outputs` (numpy, in the graph's
    output order). Its thread count follows torch.get_num_threads() unless `threads` is given: a
    replica's user_config may change torch's after load, and both runtimes fix theirs per
    session, so the session is rebuilt then."""

    def __init__(self, backend: str, graph: Path | bytes, threads: int | None = None):
        if backend not in RUNTIMES:
            raise ModelConfigError(f"no runtime {backend!r}; use one of {', '.join(RUNTIMES)}")
        self.backend, self.graph, self.threads = backend, graph, threads
        self._lock = threading.Lock()
        self._open_threads: int | None = None
        self._session = None
        self._open()

    def _wanted(self) -> int:
        return int(self.threads or torch.get_num_threads())

    def _open(self) -> None:
        threads = self._wanted()
        self._session = (self._onnxruntime if self.backend == "onnxruntime"
                         else self._openvino)(threads)
        self._open_threads = threads

    def _onnxruntime(self, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # NOTE: ONNX Runtime's workers spin after each run by default; here torch code runs right
        # after, and other replicas share the cores: spinning took 40% longer (measured, the
        # tiny point decoder, 16 prompts, a loaded 2-core machine).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        src = str(self.graph) if isinstance(self.graph, Path) else self.graph
        session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        return lambda feed: session.run(None, feed)

    def _openvino(self, threads: int):
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        core = ov.Core()
        if isinstance(self.graph, Path):
            compiled = core.compile_model(str(self.graph), "CPU", config)
        else:  # OpenVINO reads ONNX from a file: a temporary one, gone once compiled
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "graph.onnx"
                path.write_bytes(self.graph)
                compiled = core.compile_model(str(path), "CPU", config)
        outputs = list(compiled.outputs)

        def run(feed):
            # an infer request per call: a compiled model's own request isn't shared safely
            request = compiled.create_infer_request()
            result = request.infer(feed)
            return [np.array(result[o]) for o in outputs]

        return run

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self.threads is None and self._wanted() != self._open_threads:
                self._open()
            session = self._session
        return session(dict(feed))
