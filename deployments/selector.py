"""Selector (CPU): joins SAM's candidates and the expert masks (biprompt.join) and encodes the
masks for the wire (COCO RLE, polygons or PNG)."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from biprompt.arbiter import Arbiter
from biprompt.join import join
from biprompt.polygons import mask_to_polygons
from biprompt.types import PointCandidates
from deployments.common import metrics, replica_stats, unpack_bits
from deployments.process import ReplicaClock
from deployments.settings import AppArgs


def encode_mask(mask: np.ndarray, fmt: str):
    if fmt == "rle":
        # pycocotools' C encoder: the same counts string as biprompt_client.rle (the light
        # client's pure-numpy one), 12x faster on a 640x480 mask with a ragged edge (1.1 ms
        # against 13 ms, measured)
        from pycocotools import mask as coco

        out = coco.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
        return {"size": [int(v) for v in out["size"]], "counts": out["counts"].decode("ascii")}
    if fmt == "polygon":
        return mask_to_polygons(mask)
    if fmt == "png":
        buf = io.BytesIO()
        Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG",
                                                                      optimize=False)
        return buf.getvalue()
    return None


def _expert_mask(value: dict | np.ndarray | None, name: str, timings: dict) -> np.ndarray | None:
    """An expert's reply ({"mask": packed, "<name>_ms": ...}), a cached mask (packed: RLE), or an
    array."""
    if isinstance(value, dict) and "mask" in value:  # an expert deployment's reply
        timings[f"{name}_model"] = value.get(f"{name}_ms", 0.0)
        return unpack_bits(value["mask"])
    if isinstance(value, dict):
        return unpack_bits(value)
    return value


def select(points: dict | None, spec: dict, threshold: float, rule: str = "mean",
           weights: dict | None = None, arbiter: Arbiter | None = None,
           **experts: dict | np.ndarray | None) -> dict:
    """The join, as the answer's body: SAM's candidates (the PointDecoder's reply, None without a
    point or box) and each expert's mask (a reply, a cached mask, or None) -> the selected mask in
    `spec["mask_format"]`, the candidates, the strategy, the agreement and the timings. Run by the
    Selector, or by the PointDecoder itself when every expert mask is known before decoding
    (cached, or no expert): then the candidates never leave the replica that made them."""
    t = time.perf_counter()
    timings: dict[str, float] = {}
    experts = {name: _expert_mask(v, name, timings) for name, v in experts.items()}
    cands = None
    if points is not None:
        timings["point_decoder"] = points["decoder_ms"]
        cands = PointCandidates(unpack_bits(points["masks"]), points["scores"],
                                points.get("logits"))
    res = join(cands, experts, spec["mode"], threshold, rule, weights, arbiter)
    fmt = spec["mask_format"]
    out: dict = {"candidates": [], "text_mask": None}
    if cands is not None:
        text_ious = res.expert_ious.get("text")
        for i, score in enumerate(cands.scores):
            out["candidates"].append({
                "index": i,
                "predicted_iou": float(score),
                "text_iou": None if text_ious is None else float(text_ious[i]),
                "expert_ious": {k: float(v[i]) for k, v in res.expert_ious.items()},
                "mask": encode_mask(cands.masks[i], fmt) if spec["return_candidates"] else None,
            })
    if spec["return_text_mask"] and res.text_mask is not None:
        out["text_mask"] = encode_mask(res.text_mask, fmt)
    reference = res.expert_masks.get("reference")
    if spec.get("return_expert_masks") and reference is not None:
        out["reference_mask"] = encode_mask(reference, fmt)
    out.update(mask=encode_mask(res.mask, fmt), selected=res.selected, strategy=res.strategy,
               agreement=res.agreement, expert_agreement=res.expert_agreement)
    if spec.get("logits", "none") != "none" and res.low_res_logits is not None:
        out["logits"] = np.asarray(res.low_res_logits, dtype=np.float16)  # the Ingress's
    metrics()["strategy"].inc(tags={"strategy": res.strategy})
    if res.agreement is not None:
        metrics()["agreement"].observe(res.agreement)
    timings["selector"] = (time.perf_counter() - t) * 1000.0
    out["timings_ms"] = timings
    return out


class Selector:
    def __init__(self, args: AppArgs):
        self.clock = ReplicaClock()
        resolved = args.resolved()
        self.threshold = float(resolved.agreement_threshold)
        self.rule = resolved.profile().selection_rule
        self.weights = resolved.profile().selection_weights
        self.arbiter = resolved.profile().selection_arbiter
        self.clock.ready()

    def stats(self) -> dict:
        return replica_stats(self.clock)

    async def __call__(self, points: dict | None, spec: dict,
                       **experts: dict | np.ndarray | None) -> dict:
        """points: the PointDecoder's reply (None: no point or box); spec: mode, mask format and
        what to return; experts: each expert's reply or cached mask by name (text, reference)."""
        return select(points, spec, self.threshold, self.rule, self.weights, self.arbiter,
                      **experts)
