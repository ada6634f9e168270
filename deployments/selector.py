"""Selector (CPU): joins SAM's candidates and the text mask, picks one (biprompt.selection), and
encodes the masks for the wire (COCO RLE or PNG)."""

from __future__ import annotations

import io
import time

import numpy as np
from biprompt_client import rle
from PIL import Image

from biprompt.selection import select
from deployments.common import metrics, unpack_bits


def encode_mask(mask: np.ndarray, fmt: str):
    if fmt == "rle":
        return rle.encode(mask)
    if fmt == "png":
        buf = io.BytesIO()
        Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buf, format="PNG",
                                                                      optimize=False)
        return buf.getvalue()
    return None


class Selector:
    def __init__(self, config: dict):
        self.threshold = config["agreement_threshold_resolved"]

    async def __call__(self, points: dict | None, text: dict | np.ndarray | None, spec: dict) -> dict:
        t = time.perf_counter()
        if isinstance(text, dict):
            text_mask, timings = unpack_bits(text["mask"]), {"text_model": text["text_ms"]}
        else:
            text_mask, timings = text, {}
        mode, fmt = spec["mode"], spec["mask_format"]
        out: dict = {"candidates": [], "text_mask": None}
        if points is None:  # text mode without points
            mask, selected, strategy, agreement = text_mask, None, "text", None
        else:
            timings["point_decoder"] = points["decoder_ms"]
            masks, scores = unpack_bits(points["masks"]), points["scores"]
            sel = select(masks, scores, text_mask, mode, self.threshold)
            selected, strategy, agreement = sel.selected, sel.strategy, sel.agreement
            mask = text_mask if mode == "text" else masks[sel.selected]
            for i, score in enumerate(scores):
                out["candidates"].append({
                    "index": i,
                    "predicted_iou": float(score),
                    "text_iou": None if sel.text_ious is None else float(sel.text_ious[i]),
                    "mask": encode_mask(masks[i], fmt) if spec["return_candidates"] else None,
                })
        if spec["return_text_mask"] and text_mask is not None:
            out["text_mask"] = encode_mask(text_mask, fmt)
        out.update(mask=encode_mask(mask, fmt), selected=selected, strategy=strategy,
                   agreement=agreement)
        metrics()["strategy"].inc(tags={"strategy": strategy})
        if agreement is not None:
            metrics()["agreement"].observe(agreement)
        timings["selector"] = (time.perf_counter() - t) * 1000.0
        out["timings_ms"] = timings
        return out
