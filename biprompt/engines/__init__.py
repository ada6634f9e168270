"""One engine per role, each loading only its own weights from the official checkpoints:
the image encoder, the point decoder and the text-mask model. Plain torch, ONNX Runtime and
OpenVINO: no Ray here. The serving deployments wrap one engine each; BiPromptPipeline composes all
three in one process.

`engine_from_profile` builds a role's engine from a model profile on the profile's
`backends: {encoder, points, text}` (torch, onnxruntime, openvino or auto:
`biprompt.engines.backends`); `encoder_for`, `point_decoder_for` and `text_mask_for` are the one
place where each role's choice is made.
"""

from __future__ import annotations

import logging

from biprompt.engines.backends import choose
from biprompt.engines.base import Placement
from biprompt.engines.encoder import ImageEncoderEngine
from biprompt.engines.exported import modules_digest
from biprompt.engines.exported_encoder import ExportedEncoderEngine
from biprompt.engines.onnx_decoder import OnnxPointDecoderEngine, weights_digest
from biprompt.engines.point_decoder import PointDecoderBase, PointDecoderEngine
from biprompt.engines.reference_mask import ReferenceMaskEngine
from biprompt.engines.text_mask import TextMaskEngine, check_pairing
from biprompt.errors import ModelConfigError
from biprompt.factory import (
    SamSource,
    TextInfo,
    load_sam_part,
    load_text,
    open_sam,
    text_model_info,
)
from biprompt.profile import ModelProfile

log = logging.getLogger(__name__)

ENGINES = {"encoder": ImageEncoderEngine, "points": PointDecoderEngine, "text": TextMaskEngine,
           "reference": ReferenceMaskEngine}
RUNTIME_OPTIONS = ("threads", "cache_dir")  # the exported backends' own options

__all__ = ["ENGINES", "ExportedEncoderEngine", "ImageEncoderEngine", "OnnxPointDecoderEngine",
           "PointDecoderBase", "PointDecoderEngine", "ReferenceMaskEngine", "TextMaskEngine", "encoder_for",
           "engine_from_profile", "point_decoder_for", "point_decoder_from_profile",
           "text_mask_for"]


def _split(options: dict) -> tuple[dict, dict]:
    """(the engine's own options, the exported backends' runtime options)."""
    runtime = {k: options.pop(k) for k in RUNTIME_OPTIONS if k in options}
    return options, runtime


def engine_from_profile(role: str, profile: ModelProfile | dict | str | None, *,
                        backend: str | None = None, **options):
    """The engine of `role` ("encoder", "points", "text", "reference") for a model profile, on the
    profile's backend for that role (`backend` overrides)."""
    p = ModelProfile.load(profile)
    if role not in ENGINES:
        raise ModelConfigError(f"unknown role {role!r}; use one of {', '.join(ENGINES)}")
    src = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
    options = {"device": p.device, "dtype": p.dtype, **options}
    if role == "reference":  # torch only: a small model next to the decoder it drives
        if backend not in (None, "torch", "auto"):
            raise ModelConfigError(f"the reference model runs on torch only, not {backend!r}")
        return ReferenceMaskEngine.from_profile(p, src, **options)
    backend = backend or p.backends.get(role)
    if role == "points":
        return point_decoder_for(src, backend, **options)
    if role == "encoder":
        options.setdefault("fast_encoder", p.sam.fast_encoder)
        return encoder_for(src, text_model_info(p.text, src.spec), backend, **options)
    return text_mask_for(p, src, backend, **options)


def point_decoder_from_profile(profile: ModelProfile | dict | str | None,
                               **options) -> PointDecoderBase:
    """The profile's point decoder, on its `backends.points` (options override)."""
    return engine_from_profile("points", profile, **options)


def encoder_for(src: SamSource, text: TextInfo | None, backend: str = "torch", *, device="cpu",
                dtype=None, **options) -> ImageEncoderEngine:
    """SAM's image encoder from `src`, reading only its weights, on `backend`. `options`: the
    engine's own (fast_encoder, max_pixels; threads and cache_dir for the CPU runtimes)."""
    options, runtime = _split(dict(options))
    place = Placement(device, dtype)
    module = load_sam_part(src, "image_encoder", place.dtype)  # one copy, shared by candidates
    args = (module, src.spec, src.model_id)
    common = {"text": text, "device": device, "dtype": dtype, **options}

    def exported(name: str):
        return lambda: ExportedEncoderEngine(*args, runtime=name, **runtime, **common)

    return choose("encoder", backend, {
        "torch": lambda: ImageEncoderEngine(*args, **common),
        "onnxruntime": exported("onnxruntime"), "openvino": exported("openvino")},
        device=device, dtype=dtype, cache_dir=runtime.get("cache_dir"),
        digest=lambda: modules_digest({**src.spec.to_dict(), "fast": common.get(
            "fast_encoder", True)}, {"image_encoder": module}), what="the encoder backend")


def point_decoder_for(src: SamSource, backend: str = "torch", *, device="cpu", dtype=None,
                      **options) -> PointDecoderBase:
    """SAM's point decoder from `src`, reading only its two parts, on `backend`: torch,
    onnxruntime or openvino (CPU, float32), or auto. `options`: the engine's own (batching;
    threads and cache_dir for the CPU runtimes)."""
    options, runtime = _split(dict(options))
    prompt_encoder = load_sam_part(src, "prompt_encoder")
    mask_decoder = load_sam_part(src, "mask_decoder")
    args = (prompt_encoder, mask_decoder, src.spec, src.model_id)
    common = {"device": device, "dtype": dtype, **options}

    def exported(name: str):
        return lambda: OnnxPointDecoderEngine(*args, runtime=name, **runtime, **common)

    return choose("points", backend, {"torch": lambda: PointDecoderEngine(*args, **common),
                                      "onnxruntime": exported("onnxruntime"),
                                      "openvino": exported("openvino")},
                  device=device, dtype=dtype, cache_dir=runtime.get("cache_dir"),
                  digest=lambda: weights_digest(src.spec, prompt_encoder, mask_decoder),
                  what="the point-decoder backend")


def text_mask_for(p: ModelProfile, sam: SamSource, backend: str = "torch", *, device="cpu",
                  dtype=None, **options) -> TextMaskEngine:
    """The profile's text model (EVF-SAM without its image encoder) on `backend`, checked
    against the SAM whose embeddings it reads. `options`: threads and cache_dir for the CPU
    runtimes."""
    if p.text is None:
        raise ModelConfigError(f"profile {p.name!r} has no text_model")
    options, runtime = _split(dict(options))
    if options:
        raise TypeError(f"unknown text-model options: {', '.join(options)}")
    place = Placement(device, dtype)
    spare: list = []  # a loaded text model no engine holds yet
    checked: list = []

    def fresh():
        # each candidate gets modules of its own: an exported backend drops BEiT-3's
        if spare:
            return spare.pop()
        text = load_text(p.text, sam.spec, place.dtype)
        if not checked:
            check_pairing(sam.spec, sam.probe(), text)
            checked.append(True)
        return text

    def exported(name: str):
        def build():
            from biprompt.engines.exported_text import ExportedTextMaskEngine

            return ExportedTextMaskEngine(fresh(), sam.spec, sam.model_id, runtime=name,
                                          device=device, dtype=dtype, **runtime)
        return build

    def digest() -> str:
        text = fresh()
        spare.append(text)
        m = text.model
        return modules_digest(text.config.to_dict(), {"mm_extractor": m.mm_extractor,
                                                      "text_hidden_fcs": m.text_hidden_fcs})

    return choose("text", backend, {
        "torch": lambda: TextMaskEngine(fresh(), sam.spec, sam.model_id, device=device,
                                        dtype=dtype),
        "onnxruntime": exported("onnxruntime"), "openvino": exported("openvino")},
        device=device, dtype=dtype, cache_dir=runtime.get("cache_dir"), digest=digest,
        what="the text backend")

