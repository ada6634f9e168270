"""EVF-SAM's text prompt on a CPU runtime (ONNX Runtime or OpenVINO): BEiT-3's fusion of the
image's 224x224 view with the referring expression, and the projection of its vision-CLS token
to one SAM prompt token (`EvfSam.text_prompt`, nearly all of the text model's time), exported
from the loaded model.

    beit_images Bx3xSxS float32 (the text model's view, normalised); input_ids BxT int64;
    padding BxT bool (True at pad positions, as `TextTokenizer` returns it) -> prompt Bx1xC

B (pairs) and T (tokens) are dynamic. EVF's SAM prompt encoder and mask decoder stay in torch
(`TextMaskEngine.text_masks` runs them on the graph's prompts), so the torch engine's mask code is
the one both backends run. The export is cached as the other exported parts are
(`biprompt.engines.exported`: keyed by a sha256 of BEiT-3's and the projection's weights, the
exporter's version, torch's version and the opset).

NOTE: torchscale's BEiT-3 traces as it is: its branches test for None (a Python question, fixed
by the call), not tensors, and the padding mask enters the graph only as data (the embeddings
zeroed at pads, keys masked with -inf before the softmax). The shapes it reads are recorded as
shape ops, not constants: the split between vision and text tokens is the vision-token count
(fixed by the model's image size), the text positions are an `arange` over T, and the vision
half of the padding mask a `zeros` of the vision tokens' shape. The tracer warns of nothing, the
example is traced with B=2 and T=5 with one row padded so neither is specialised to 1, and the
tests run other B and T through the graph. The padding mask stays a bool input: both runtimes
take it as it is.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from biprompt.engines.base import Placement, param_bytes
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
from biprompt.engines.text_mask import TextMaskEngine
from biprompt.errors import ModelConfigError
from biprompt.factory import LoadedText
from biprompt.models.evf import EvfSam
from biprompt.models.sam import SamSpec

EXPORTER_VERSION = 1  # bump when the exported graph changes: part of every cached file's name
INPUTS = ("beit_images", "input_ids", "padding")
OUTPUTS = ("prompt",)
EXAMPLE_TOKENS = 5  # the traced example's T (its second row is padded after 3 tokens)


class TextPromptGraph(nn.Module):
    """`EvfSam.text_prompt` as a module of its own: BEiT-3 + the projection to a prompt token."""

    def __init__(self, model: EvfSam):
        super().__init__()
        self.mm_extractor, self.text_hidden_fcs = model.mm_extractor, model.text_hidden_fcs

    def forward(self, beit_images: torch.Tensor, input_ids: torch.Tensor,
                padding: torch.Tensor) -> torch.Tensor:
        out = self.mm_extractor.beit3(visual_tokens=beit_images, textual_tokens=input_ids,
                                      text_padding_position=padding)
        return self.text_hidden_fcs[0](out["encoder_out"][:, :1, :])


def example_inputs(model: EvfSam, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two pairs of EXAMPLE_TOKENS tokens, the second padded after 3: neither B nor T is 1."""
    spec = model.config.beit3_spec
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, spec.img_size, spec.img_size, generator=g).clamp(-1, 1)
    ids = torch.randint(0, spec.vocab_size, (2, EXAMPLE_TOKENS), generator=g)
    padding = torch.zeros(2, EXAMPLE_TOKENS, dtype=torch.bool)
    padding[1, 3:] = True
    ids[:, 0] = model.config.bos_token_id
    ids[0, -1] = ids[1, 2] = model.config.eos_token_id
    ids[padding] = pad_id
    return images, ids, padding


def text_filename(digest: str) -> str:
    return f"{digest}-x{EXPORTER_VERSION}-torch{torch.__version__}-opset{OPSET}-text_prompt.onnx"


def exported_text_prompt(model: EvfSam, pad_id: int, cache: str | Path | None = None
                         ) -> tuple[Path | bytes, dict]:
    """The text prompt's graph (its cached file; bytes when the cache can't be written) and
    {"digest", "exported": bool, "dir"}. `model` must be float32 on the CPU."""
    cache = Path(cache) if cache is not None else onnx_cache_dir()
    graph = TextPromptGraph(model).eval()
    digest = modules_digest({"beit3": model.config.beit3_spec.to_dict()},
                            {"mm_extractor": graph.mm_extractor,
                             "text_hidden_fcs": graph.text_hidden_fcs})
    dynamic = {"beit_images": {0: "batch"}, "input_ids": {0: "batch", 1: "tokens"},
               "padding": {0: "batch", 1: "tokens"}, "prompt": {0: "batch"}}
    src, now = cached_graph(cache, text_filename(digest), lambda: export_onnx(
        graph, example_inputs(model, pad_id), INPUTS, OUTPUTS, dynamic, "text prompt"))
    return src, {"digest": digest, "exported": now, "dir": str(cache)}


class ExportedTextMaskEngine(TextMaskEngine):
    """TextMaskEngine whose `_prompt` (BEiT-3 + the projection) runs the exported graph on
    `runtime` (CPU, float32). It keeps EVF's prompt encoder and mask decoder in torch for
    `decode`, and drops its own reference to BEiT-3 and the projection once exported: the graph
    holds those weights. The caller's `text.model` is left whole (the engine holds a shallow copy
    without them), so BEiT-3's torch weights are freed once the caller lets go of `text`, as
    `from_profile` does."""

    def __init__(self, text: LoadedText, sam_spec: SamSpec, sam_model_id: str, *,
                 runtime: str = "onnxruntime", threads: int | None = None,
                 cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None):
        if runtime not in RUNTIMES:
            raise ModelConfigError(f"no text-model runtime {runtime!r}; use one of "
                                   f"{', '.join(RUNTIMES)}")
        place = Placement(device, dtype)
        if place.device.type != "cpu" or place.dtype != torch.float32:
            # checked before the weights move: a CUDA or float16 request never converts them
            raise ModelConfigError(
                f"the {runtime} text model runs float32 on the CPU, not {place.dtype} on "
                f"{place.device}: use the torch backend there")
        super().__init__(text, sam_spec, sam_model_id, device=place.device, dtype=place.dtype)
        self.backend = runtime
        self.graph, self.export = exported_text_prompt(self.model, self.tokenizer.pad_id,
                                                       cache_dir)
        self.runtime = Runtime(runtime, self.graph, threads)
        kept = copy.copy(self.model)
        kept._modules = dict(self.model._modules)  # its own table: the caller's model stays whole
        kept.mm_extractor = None
        kept.text_hidden_fcs = None
        self.model = kept

    def weights(self) -> dict[str, int]:
        """The graph's bytes (BEiT-3 + the projection) and the torch parts still held."""
        vm = self.model.visual_model
        return {"onnx.text_prompt": graph_bytes(self.graph),
                "evf.prompt_encoder": param_bytes(vm.prompt_encoder),
                "evf.mask_decoder": param_bytes(vm.mask_decoder),
                "evf.image_encoder": param_bytes(vm.image_encoder)}

    def _prompt(self, beit: torch.Tensor, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        feed = {"beit_images": np.ascontiguousarray(beit.detach().to("cpu", torch.float32).numpy()),
                "input_ids": np.ascontiguousarray(ids.detach().to("cpu", torch.int64).numpy()),
                "padding": np.ascontiguousarray(padding.detach().to("cpu", torch.bool).numpy())}
        return torch.from_numpy(self.runtime.run(feed)[0])
