"""SAM's image encoder on a CPU runtime (ONNX Runtime or OpenVINO), exported from the loaded
encoder (fast attention path or segment-anything's reference forward, whichever the profile
runs: both are the same function within float rounding, and the graph is checked against it).

    images Bx3xSxS float32 (normalised, padded: `sam_normalize_pad`) -> embeddings BxCxhxw

B is dynamic. The export is cached as the point decoder's is (`biprompt.engines.exported`); at
vit_b scale the graph is 359 MB and takes about 25 s to export on 2 cores, once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT

from biprompt.engines.encoder import ImageEncoderEngine
from biprompt.engines.exported import (
    OPSET,
    RUNTIMES,
    Runtime,
    cached_graph,
    export_onnx,
    graph_bytes,
    modules_digest,
    onnx_cache_dir,
)
from biprompt.errors import ModelConfigError
from biprompt.models.sam import SamSpec

EXPORTER_VERSION = 1  # bump when the exported graph changes: part of every cached file's name


def encoder_filename(digest: str, fast: bool) -> str:
    path = "fast" if fast else "reference"
    return (f"{digest}-x{EXPORTER_VERSION}-torch{torch.__version__}-opset{OPSET}-"
            f"image_encoder-{path}.onnx")


def exported_encoder(encoder: ImageEncoderViT, spec: SamSpec, fast: bool,
                     cache: str | Path | None = None) -> tuple[Path | bytes, dict]:
    """The encoder's graph (its cached file; bytes when the cache can't be written) and
    {"digest", "exported": bool, "dir"}. `encoder` must be float32 on the CPU."""
    cache = Path(cache) if cache is not None else onnx_cache_dir()
    digest = modules_digest(spec.to_dict(), {"image_encoder": encoder})
    example = torch.randn(1, 3, spec.img_size, spec.img_size,
                          generator=torch.Generator().manual_seed(0))
    graph, now = cached_graph(cache, encoder_filename(digest, fast), lambda: export_onnx(
        encoder, (example,), ["images"], ["embeddings"],
        {"images": {0: "batch"}, "embeddings": {0: "batch"}}, "image encoder"))
    return graph, {"digest": digest, "exported": now, "dir": str(cache)}


class ExportedEncoderEngine(ImageEncoderEngine):
    """ImageEncoderEngine whose forward runs the exported graph on `runtime` (CPU, float32). It
    keeps no torch module once exported: the graph holds the weights."""

    def __init__(self, encoder: ImageEncoderViT, spec: SamSpec, model_id: str, *,
                 runtime: str = "onnxruntime", threads: int | None = None,
                 cache_dir: str | Path | None = None, **options):
        if runtime not in RUNTIMES:
            raise ModelConfigError(f"no image-encoder runtime {runtime!r}; use one of "
                                   f"{', '.join(RUNTIMES)}")
        super().__init__(encoder, spec, model_id, **options)
        if self.place.device.type != "cpu" or self.place.dtype != torch.float32:
            raise ModelConfigError(
                f"the {runtime} image encoder runs float32 on the CPU, not {self.place.dtype} "
                f"on {self.place.device}: use the torch backend there")
        self.backend = runtime
        self.graph, self.export = exported_encoder(self.encoder, spec, self.fast_encoder,
                                                   cache_dir)
        self.runtime = Runtime(runtime, self.graph, threads)
        self.encoder = None

    def weights(self) -> dict[str, int]:
        return {"onnx.image_encoder": graph_bytes(self.graph)}

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.runtime.run({"images": images})[0])
