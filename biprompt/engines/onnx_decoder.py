"""The point decoder on a CPU runtime (ONNX Runtime or OpenVINO): SAM's prompt encoder + mask
decoder, exported from the loaded checkpoint.

The exported graph (`DecoderGraph`) takes the prompts already in the model's input frame:

    image_embeddings 1xCxhxw; point_coords BxNx2 (XY, resized-longest-side frame);
    point_labels BxN int64 (1 / 0 points, 2 / 3 a box's corners, -1 the padding point SAM adds
    when there is no box); mask_input Bx1xLxL (the `decoder_mask` graph only)
      -> low_res_masks Bx4xLxL, iou_predictions Bx4 (SAM's single mask, then its three)

B (prompts) and N (points) are dynamic. There are two graphs, `decoder` (SAM's no-mask dense
embedding) and `decoder_mask` (SAM's mask downscaling of `mask_input`), so each case does SAM's
own arithmetic and the first click pays nothing for the mask path. The multimask / single-mask
slice and the upscaling to the original image stay outside the graph, in the torch code the torch
engine runs (`PointDecoderBase.decode_points`, `biprompt.models.decoding.upscale_logits`): the
crop to the image's resized size is right for every aspect ratio by construction (segment-anything
1.0's own ONNX export bakes its dummy input's crop into the graph).

The graphs are exported at first use and cached (`biprompt.engines.exported`: beside the Hugging
Face cache, keyed by a sha256 of the decoder's weights and shapes and by the exporter's version);
ONNX Runtime and OpenVINO run the same files. Exporting takes about 1 s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn

from biprompt.engines.base import Placement
from biprompt.engines.exported import (
    OPSET,
    RUNTIMES,
    Runtime,
    cached_graph,
    export_onnx,
    float32,
    graph_bytes,
    modules_digest,
    onnx_cache_dir,
)
from biprompt.engines.point_decoder import GroupInputs, PointDecoderBase
from biprompt.errors import ModelConfigError
from biprompt.factory import load_sam_part, open_sam
from biprompt.models.sam import SamSpec
from biprompt.profile import ModelProfile
from biprompt.types import ImageEmbedding

log = logging.getLogger(__name__)

# Bump when the exported graph changes: it is part of every cached file's name.
EXPORTER_VERSION = 1
PARTS = ("decoder", "decoder_mask")
INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input")
OUTPUTS = ("low_res_masks", "iou_predictions")
BOX_LABELS = np.array([2, 3], dtype=np.int64)  # SAM's labels for a box's two corners
PAD_LABEL = -1


class DecoderGraph(nn.Module):
    """SAM's PromptEncoder + MaskDecoder.predict_masks as one traceable forward (float32).

    Points, box corners and the padding point arrive as one list of labelled points, as in SAM's
    own ONNX model; the embeddings are the same arithmetic as PromptEncoder._embed_points /
    _embed_boxes (a label's embedding added to the positional encoding; the padding point's
    encoding replaced by `not_a_point_embed`)."""

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, with_mask: bool):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = prompt_encoder, mask_decoder
        self.with_mask = with_mask
        with torch.no_grad():
            self.register_buffer("image_pe", prompt_encoder.get_dense_pe().detach().clone())
            # row label + 1: the padding point's, then labels 0..3 (negative, positive, corners)
            rows = [prompt_encoder.not_a_point_embed.weight,
                    *(e.weight for e in prompt_encoder.point_embeddings)]
            self.register_buffer("label_embeddings", torch.cat(rows).detach().clone())
        h, w = prompt_encoder.input_image_size
        self.register_buffer("frame", torch.tensor([float(w), float(h)]))

    def forward(self, image_embeddings: torch.Tensor, point_coords: torch.Tensor,
                point_labels: torch.Tensor, mask_input: torch.Tensor | None = None):
        pe = self.prompt_encoder
        # pixel centres, normalised as PositionEmbeddingRandom.forward_with_coords does
        coords = (point_coords + 0.5) / self.frame
        encoding = pe.pe_layer._pe_encoding(coords)
        padding = (point_labels == PAD_LABEL).unsqueeze(-1)
        encoding = torch.where(padding, torch.zeros_like(encoding), encoding)
        sparse = encoding + self.label_embeddings[point_labels + 1]
        if self.with_mask:
            dense = pe.mask_downscaling(mask_input)
        else:
            h, w = pe.image_embedding_size
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(point_coords.shape[0],
                                                                        -1, h, w)
        return self.mask_decoder.predict_masks(image_embeddings, self.image_pe, sparse, dense)

    def example(self, spec: SamSpec) -> tuple[torch.Tensor, ...]:
        """Inputs to trace with (2 prompts of 3 points: neither dimension is 1) and to check the
        export on."""
        g = torch.Generator().manual_seed(0)
        coords = torch.rand(2, 3, 2, generator=g) * spec.img_size
        labels = torch.tensor([[1, 0, PAD_LABEL], [1, 2, 3]])
        emb = torch.randn(1, spec.prompt_dim, spec.embedding_size, spec.embedding_size, generator=g)
        args = (emb, coords, labels)
        if self.with_mask:
            side = 4 * spec.embedding_size
            args += (torch.randn(2, 1, side, side, generator=g) * 4,)
        return args


def weights_digest(spec: SamSpec, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> str:
    """The cache key: the decoder's spec and every tensor it holds (`modules_digest`)."""
    return modules_digest(spec.to_dict(), {"prompt_encoder": prompt_encoder,
                                           "mask_decoder": mask_decoder})


def graph_filename(digest: str, part: str) -> str:
    return f"{digest}-x{EXPORTER_VERSION}-torch{torch.__version__}-opset{OPSET}-{part}.onnx"


def export_graph(graph: DecoderGraph, spec: SamSpec) -> bytes:
    """The ONNX bytes of `graph`, checked against the torch forward on its example inputs."""
    names = list(INPUTS[:4 if graph.with_mask else 3])
    dynamic = {"point_coords": {0: "prompts", 1: "points"},
               "point_labels": {0: "prompts", 1: "points"},
               "low_res_masks": {0: "prompts"}, "iou_predictions": {0: "prompts"}}
    if graph.with_mask:
        dynamic["mask_input"] = {0: "prompts"}
    return export_onnx(graph, graph.example(spec), names, OUTPUTS, dynamic, "point decoder")


def exported_graphs(prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, spec: SamSpec,
                    cache: Path | None = None) -> tuple[dict[str, Path | bytes], dict]:
    """Each part's graph: its cached file, exported and written first if missing (bytes when the
    cache can't be written). Also {"digest", "exported": [parts exported now], "dir"}."""
    cache = Path(cache) if cache is not None else onnx_cache_dir()
    pe, md = float32(prompt_encoder), float32(mask_decoder)
    digest = weights_digest(spec, pe, md)
    out: dict[str, Path | bytes] = {}
    exported = []
    for part in PARTS:
        out[part], now = cached_graph(cache, graph_filename(digest, part), lambda part=part:
                                      export_graph(DecoderGraph(pe, md, part == "decoder_mask"),
                                                   spec))
        if now:
            exported.append(part)
    return out, {"digest": digest, "exported": exported, "dir": str(cache)}


class OnnxPointDecoderEngine(PointDecoderBase):
    """SAM's point decoder as an exported graph on a CPU runtime (ONNX Runtime or OpenVINO,
    float32); the same interface as PointDecoderEngine. It keeps no torch module: the graphs
    hold the weights."""

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, spec: SamSpec,
                 model_id: str, *, runtime: str = "onnxruntime", device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, batching: str = "auto",
                 threads: int | None = None, cache_dir: str | Path | None = None):
        super().__init__(spec, model_id, batching)
        place = Placement(device, dtype)
        if runtime not in RUNTIMES:
            raise ModelConfigError(f"no point-decoder runtime {runtime!r}; use one of "
                                   f"{', '.join(RUNTIMES)}")
        if place.device.type != "cpu" or place.dtype != torch.float32:
            raise ModelConfigError(
                f"the {runtime} point decoder runs float32 on the CPU, not {place.dtype} on "
                f"{place.device}: use the torch backend there")
        self.backend = runtime
        self.graphs, self.export = exported_graphs(prompt_encoder, mask_decoder, spec, cache_dir)
        self._runtimes = {part: Runtime(runtime, src, threads) for part, src in self.graphs.items()}

    @classmethod
    def from_profile(cls, profile: ModelProfile | dict | str | None = None,
                     **options) -> OnnxPointDecoderEngine:
        p = ModelProfile.load(profile)
        src = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
        options = {"device": p.device, "dtype": p.dtype, **options}
        return cls(load_sam_part(src, "prompt_encoder"), load_sam_part(src, "mask_decoder"),
                   src.spec, src.model_id, **options)

    def weights(self) -> dict[str, int]:
        """Bytes of each graph the runtime holds (the mask graph has its own copy of the
        decoder's weights)."""
        return {f"onnx.{part}": graph_bytes(src) for part, src in self.graphs.items()}

    def _image(self, emb: ImageEmbedding) -> np.ndarray:
        return np.ascontiguousarray(emb.embedding.detach().to("cpu", torch.float32).numpy())

    def _run(self, image: np.ndarray, inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(inputs)
        coords, labels = [], []
        if inputs.coords is not None:
            coords.append(inputs.coords)
            labels.append(inputs.labels)
        if inputs.boxes is not None:
            coords.append(inputs.boxes.reshape(b, 2, 2))
            labels.append(np.broadcast_to(BOX_LABELS, (b, 2)))
        elif inputs.coords is not None:  # SAM pads points with a point of its own when no box
            coords.append(np.zeros((b, 1, 2), np.float32))
            labels.append(np.full((b, 1), PAD_LABEL, np.int64))
        feed = {"image_embeddings": image,
                "point_coords": np.ascontiguousarray(np.concatenate(coords, 1), np.float32)
                if coords else np.zeros((b, 0, 2), np.float32),
                "point_labels": np.ascontiguousarray(np.concatenate(labels, 1), np.int64)
                if labels else np.zeros((b, 0), np.int64)}
        part = "decoder"
        if inputs.mask_input is not None:
            feed["mask_input"] = np.ascontiguousarray(inputs.mask_input, np.float32)
            part = "decoder_mask"
        low_res, iou = self._runtimes[part].run(feed)
        keep = slice(1, None) if inputs.multimask else slice(0, 1)
        return (torch.from_numpy(np.ascontiguousarray(low_res[:, keep])),
                torch.from_numpy(np.ascontiguousarray(iou[:, keep])))
