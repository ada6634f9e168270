"""One item of the offline batch (serving/offline.py): its prompt checked as the Ingress checks
a request, its error as the served path reports it, and its output line: the join of SAM's
candidates and the text mask (biprompt.join, as the Selector calls it), in the keys of
`biprompt batch`'s lines. Plain functions; serving/offline_stages.py calls them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from biprompt_client.schema import SegmentRequest, WireError
from pydantic import ValidationError

from biprompt.errors import BiPromptError, InvalidImageError, InvalidInputError
from biprompt.join import join
from biprompt.prompts import Prompt, make_prompt
from biprompt.types import PointCandidates
from deployments.common import unpack_bits
from deployments.http import as_api_error, clean_message
from deployments.selector import encode_mask

# The output is COCO RLE (or no mask); polygons and PNGs are for the served path's callers.
OFFLINE_MASK_FORMATS = ("rle", "none")
_ANY_IMAGE_ID = "0" * 64
REFERENCE_OFFLINE = ("the offline batch takes no `reference` yet: send reference items to a "
                     "server (`biprompt batch`), which encodes each reference once")
IMAGE_ID_OFFLINE = ("the offline batch reads images from files: give \"image\" (a path); an "
                    "image_id names an embedding in a server's cache")


def error_record(exc: BaseException) -> dict:
    """An item's error as the served path reports it: our error type, status and message."""
    if isinstance(exc, (ValidationError, WireError)):
        exc = as_api_error(exc)
    if isinstance(exc, BiPromptError):
        return {"type": exc.type, "message": clean_message(exc.message, exc.status_code),
                "status_code": exc.status_code, "request_id": None}
    # offline, the operator is the caller: the real error, not the server's "see the logs"
    return {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}",
            "status_code": 500, "request_id": None}


def prepare(item: dict, size: tuple[int, int]) -> tuple[Prompt, SegmentRequest]:
    """The item's prompt, checked as the Ingress checks a request (wire limits, then the prompt
    against the image's size). Raises InvalidInputError / InvalidPromptError."""
    fields = {k: v for k, v in item.items() if k != "id"}
    if "labels" in fields:
        fields["point_labels"] = fields.pop("labels")
    if "image_id" in fields:
        raise InvalidInputError(IMAGE_ID_OFFLINE)
    if fields.get("reference") is not None or fields.get("mode") == "reference":
        raise InvalidInputError(REFERENCE_OFFLINE)
    try:
        req = SegmentRequest.model_validate({"image_id": _ANY_IMAGE_ID, **fields})
    except ValidationError as exc:
        raise as_api_error(exc) from None
    if req.mask_format not in OFFLINE_MASK_FORMATS:
        raise InvalidInputError(f"mask_format {req.mask_format!r}: the offline batch writes "
                                "COCO RLE (\"rle\", the default) or no mask (\"none\")")
    prompt = make_prompt(size, req.points or None, req.point_labels, box=req.box, text=req.text,
                         mode=req.mode, multimask=req.multimask)
    return prompt, req


def no_image_error(item: dict) -> dict:
    """The error of an item that names no image file."""
    if "image_id" in item:
        return error_record(InvalidInputError(IMAGE_ID_OFFLINE))
    return error_record(InvalidInputError("give \"image\": the path of an image file"))


def wants_text(prompt: Prompt) -> bool:
    """Mode 'point' ignores the text: it doesn't pay for the text model (as served)."""
    return prompt.text is not None and prompt.mode != "point"


def item_state(item: dict, size: tuple[int, int], text_model: bool) -> dict:
    """What the later stages need of one item, or {"error": ...}."""
    try:
        prompt, req = prepare(item, size)
        if wants_text(prompt) and not text_model:
            raise InvalidInputError("this model profile has no text model: use mode 'point' or "
                                    "leave out text")
    except Exception as exc:  # noqa: BLE001 - this item's own error
        return {"error": error_record(exc)}
    return {"mode": prompt.mode, "points": bool(len(prompt.points) or prompt.box is not None),
            "text": prompt.text.strip() if wants_text(prompt) else None,
            "format": req.mask_format, "candidates": req.return_candidates,
            "text_mask": req.return_text_mask}


def read_image(path: str) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise InvalidImageError(f"image file not found: {path}") from None
    except OSError as exc:
        raise InvalidImageError(f"could not read the image file {path}: {exc.strerror}") from None


# --- output lines ---------------------------------------------------------------------------


def _bits(record: dict) -> np.ndarray:
    return unpack_bits({"bits": np.frombuffer(record["bits"], dtype=np.uint8),
                        "shape": record["shape"]})


def error_line(rid: str, image: str | None, error: dict) -> dict:
    return {"id": rid, "ok": False, "image": image, "error": error}


def result_line(rid: str, row: dict, s: dict, texts: dict, threshold: float) -> dict:
    """One item's answer: the join of SAM's candidates and the text mask, as the Selector
    makes it, in the keys of `biprompt batch`'s lines."""
    cands = None
    if "masks" in s:
        masks = _bits({"bits": s["masks"], "shape": s["shape"]})
        cands = PointCandidates(masks, np.asarray(s["scores"], dtype=np.float32), None)
    text = None
    if s.get("text"):
        found = texts.get(s["text"], {"error": error_record(RuntimeError("no text mask"))})
        if "error" in found:
            return error_line(rid, row["image"], found["error"])
        text = _bits(found)
    res = join(cands, {"text": text}, s["mode"], threshold)
    fmt = s["format"]
    candidates = []
    if cands is not None:
        text_ious = res.expert_ious.get("text")
        for i, score in enumerate(cands.scores):
            candidates.append({"index": i, "predicted_iou": float(score),
                               "text_iou": None if text_ious is None else float(text_ious[i]),
                               "mask": encode_mask(cands.masks[i], fmt) if s["candidates"]
                               else None})
    selected = None if res.selected is None else int(res.selected)
    return {"id": rid, "ok": True, "image": row["image"], "image_id": row["image_id"],
            "width": int(row["width"]), "height": int(row["height"]), "mode": s["mode"],
            "mask": encode_mask(res.mask, fmt), "selected": selected,
            "predicted_iou": None if selected is None else candidates[selected]["predicted_iou"],
            "strategy": res.strategy,
            "agreement": None if res.agreement is None else float(res.agreement),
            "candidates": candidates,
            "text_mask": encode_mask(res.text_mask, fmt)
            if s["text_mask"] and res.text_mask is not None else None}
