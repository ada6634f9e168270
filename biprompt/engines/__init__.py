"""One engine per role, each loading only its own weights from the official checkpoints:
the image encoder, the point decoder and the text-mask model. Plain torch (and ONNX Runtime for
the point decoder on the CPU): no Ray here. The serving deployments wrap one engine each;
BiPromptPipeline composes all three in one process.

`engine_from_profile` builds a role's engine from a model profile; for the point decoder it
honours `sam.decoder_backend` (`point_decoder_for`), the one place where that choice is made.
"""

from __future__ import annotations

import logging
import statistics

from biprompt.engines.base import Placement
from biprompt.engines.encoder import ImageEncoderEngine
from biprompt.engines.onnx_decoder import OnnxPointDecoderEngine
from biprompt.engines.point_decoder import PointDecoderBase, PointDecoderEngine
from biprompt.engines.text_mask import TextMaskEngine
from biprompt.errors import ModelConfigError
from biprompt.factory import SamSource, load_sam_part, open_sam
from biprompt.profile import DECODER_BACKENDS, ModelProfile

log = logging.getLogger(__name__)

ENGINES = {"encoder": ImageEncoderEngine, "points": PointDecoderEngine, "text": TextMaskEngine}
AUTO_ROUNDS = 5  # alternating one-point decodes per backend when `auto` chooses

__all__ = ["ENGINES", "ImageEncoderEngine", "OnnxPointDecoderEngine", "PointDecoderBase",
           "PointDecoderEngine", "TextMaskEngine", "engine_from_profile", "point_decoder_for",
           "point_decoder_from_profile"]


def engine_from_profile(role: str, profile: ModelProfile | dict | str | None, **options):
    """The engine of `role` ("encoder", "points", "text") for a model profile."""
    if role == "points":
        return point_decoder_from_profile(profile, **options)
    return ENGINES[role].from_profile(profile, **options)


def point_decoder_from_profile(profile: ModelProfile | dict | str | None,
                               **options) -> PointDecoderBase:
    """The profile's point decoder, on its `sam.decoder_backend` (options override)."""
    p = ModelProfile.load(profile)
    src = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
    options = {"backend": p.sam.decoder_backend, "device": p.device, "dtype": p.dtype, **options}
    return point_decoder_for(src, **options)


def point_decoder_for(src: SamSource, backend: str = "torch", *, device="cpu", dtype=None,
                      **options) -> PointDecoderBase:
    """SAM's point decoder from `src`, reading only its two parts, on `backend`: torch,
    onnxruntime (CPU, float32), or auto (the faster of both on a one-point decode, timed here;
    torch where onnxruntime doesn't apply). `options`: the engine's own (batching; threads and
    cache_dir for onnxruntime)."""
    if backend not in DECODER_BACKENDS:
        raise ModelConfigError(f"unknown decoder backend {backend!r}; use one of "
                               f"{', '.join(DECODER_BACKENDS)}")
    place = Placement(device, dtype)
    prompt_encoder = load_sam_part(src, "prompt_encoder")
    if backend == "torch":
        return PointDecoderEngine(prompt_encoder, load_sam_part(src, "mask_decoder", place.dtype),
                                  src.spec, src.model_id, device=device, dtype=dtype, **options)
    mask_decoder = load_sam_part(src, "mask_decoder")
    args = (prompt_encoder, mask_decoder, src.spec, src.model_id)
    if backend == "onnxruntime":
        return OnnxPointDecoderEngine(*args, device=device, dtype=dtype, **options)
    torch_options = {k: v for k, v in options.items() if k == "batching"}
    if place.device.type != "cpu" or str(place.dtype) != "torch.float32":
        engine = PointDecoderEngine(*args, device=device, dtype=dtype, **torch_options)
        engine.backend_choice = {"chosen": "torch", "reason": "onnxruntime runs float32 on the CPU"}
        return engine
    try:
        onnx = OnnxPointDecoderEngine(*args, device=device, dtype=dtype, **options)
    except Exception as exc:  # noqa: BLE001 - any failure to export or load: torch serves
        log.warning("decoder_backend auto: onnxruntime unavailable (%s); using torch", exc)
        engine = PointDecoderEngine(*args, device=device, dtype=dtype, **torch_options)
        engine.backend_choice = {"chosen": "torch", "reason": f"onnxruntime failed: {exc}"}
        return engine
    return fastest([PointDecoderEngine(*args, device=device, dtype=dtype, **torch_options), onnx])


def fastest(engines: list[PointDecoderBase], rounds: int = AUTO_ROUNDS) -> PointDecoderBase:
    """The engine with the lowest median one-point, three-mask decode (after one untimed decode
    each; rounds alternate between engines), its choice and every timing in `backend_choice`."""
    for e in engines:
        e.decode_points(*e.dummy())
    times: dict[str, list[float]] = {e.backend: [] for e in engines}
    for _ in range(rounds):
        for e in engines:
            times[e.backend].append(e.time_decode(rounds=1))
    medians = {k: statistics.median(v) for k, v in times.items()}
    best = min(engines, key=lambda e: medians[e.backend])
    best.backend_choice = {"chosen": best.backend, "rounds": rounds,
                           **{f"{k}_ms": round(v, 2) for k, v in medians.items()}}
    log.info("decoder_backend auto: %s (%s)", best.backend, best.backend_choice)
    return best
