"""The interactive-segmentation protocol on ShapesRef: clicks until the mask is right.

    python -m biprompt.evaluate clicks --n 500 --seed 12345     # biprompt eval clicks

Click 1 is the sample's own point (the spec's prompt, so the ambiguous subset means what it means
in the one-click table); every next click comes from the protocol's clicker (biprompt.clicks):
the interior of the largest error region, positive in a false negative, negative in a false
positive. Each click after the first is decoded with every click so far and the previous mask's
low-res logits as SAM's mask_input; no encoder pass. Methods:
- point-only: click 1 takes SAM's candidate with the highest predicted IoU; later clicks take
  SAM's single-mask output (SAM's own practice);
- BiPrompt, then single mask: click 1 is BiPrompt (the text picks among the three candidates,
  the served rule), later clicks as point-only;
- BiPrompt, text votes on every click: later clicks keep three candidates and the text mask
  (computed once) picks among them, as on the first;
- oracle: on every click, whichever of SAM's four outputs (three candidates and the single mask)
  has the highest IoU with the ground truth. Not a method: the ceiling of any selection policy on
  this model (the one-click table's oracle row, for clicks).
Reported: NoC@85 / NoC@90 (clicks to reach that IoU, `max_clicks` if never), the share never
reaching 90%, and mIoU after each click.
"""

from __future__ import annotations

import time

import numpy as np

from biprompt.clicks import iou, next_click
from biprompt.data.shapes_ref import make_samples
from biprompt.join import join
from biprompt.prompts import make_prompt
from biprompt.selection import mask_ious
from biprompt.types import PointCandidates

POINT, BI_SINGLE, BI_VOTE = "point-only", "BiPrompt, then single mask", "BiPrompt, text votes"
ORACLE = "oracle (best of SAM's outputs)"
METHODS = (POINT, BI_SINGLE, BI_VOTE, ORACLE)
THRESHOLDS = (0.85, 0.90)


def run_sample(pipeline, sample, emb, method: str, max_clicks: int, text_mask) -> list[float]:
    """IoU after each of `max_clicks` clicks for one sample (`emb`: its image embedding)."""
    gt = sample.gt_mask
    x, y = sample.point_index
    points, labels = [[x, y]], [1]
    mode = "point" if method == POINT else "biprompt"
    experts = {"text": text_mask if mode == "biprompt" else None}
    prompt = make_prompt(emb.original_size, points, labels, text=sample.expression, mode=mode)
    if method == ORACLE:
        return _oracle_curve(pipeline, emb, gt, prompt, max_clicks)
    res = join(pipeline.decode_points(emb, [prompt])[0], experts, mode,
               pipeline.agreement_threshold)
    mask, logits = res.mask, res.low_res_logits
    out = [iou(mask, gt)]
    for _ in range(max_clicks - 1):
        click = next_click(mask, gt)
        if click is None:  # perfect: nothing left to click
            out.append(out[-1])
            continue
        points.append([click.x, click.y])
        labels.append(int(click.positive))
        vote = method == BI_VOTE
        prompt = make_prompt(emb.original_size, points, labels, mode=mode if vote else "point",
                             text=sample.expression if vote else None, mask_input=logits,
                             multimask=vote)
        res = join(pipeline.decode_points(emb, [prompt])[0],
                   experts if vote else {"text": None}, mode if vote else "point",
                   pipeline.agreement_threshold)
        mask, logits = res.mask, res.low_res_logits
        out.append(iou(mask, gt))
    return out


def _oracle_curve(pipeline, emb, gt, prompt, max_clicks: int) -> list[float]:
    """The ORACLE row: at each click the output closest to the ground truth, refined from."""
    points, labels = [list(p) for p in prompt.points], list(prompt.labels)
    cands = pipeline.decode_points(emb, [prompt])[0]
    out = []
    for click in range(max_clicks):
        k = int(np.argmax(mask_ious(cands.masks, gt)))
        mask, logits = cands.masks[k], cands.low_res_logits[k]
        out.append(iou(mask, gt))
        if click == max_clicks - 1:
            break
        c = next_click(mask, gt)
        if c is None:
            out += [out[-1]] * (max_clicks - 1 - click)
            break
        points.append([c.x, c.y])
        labels.append(int(c.positive))
        both = [make_prompt(emb.original_size, points, labels, mode="point", mask_input=logits,
                            multimask=m) for m in (False, True)]
        single, three = pipeline.decode_points(emb, both)
        cands = PointCandidates(np.concatenate([single.masks, three.masks]),
                             np.concatenate([single.scores, three.scores]),
                             np.concatenate([single.low_res_logits, three.low_res_logits]))
    return out


def noc(curve: np.ndarray, threshold: float) -> np.ndarray:
    """Clicks to reach `threshold` per sample (curve: samples x clicks); max clicks if never."""
    hit = curve >= threshold
    first = np.argmax(hit, axis=1) + 1
    return np.where(hit.any(axis=1), first, curve.shape[1])


def summarize(curves: np.ndarray) -> dict:
    return {
        **{f"noc@{round(t * 100)}": float(noc(curves, t).mean()) for t in THRESHOLDS},
        "never@90": float((~(curves >= 0.90).any(axis=1)).mean()),
        "miou_per_click": [round(float(v), 4) for v in curves.mean(axis=0)],
    }


def evaluate_clicks(pipeline, n: int = 500, seed: int = 12345, height: int = 256,
                    width: int = 256, max_clicks: int = 20) -> dict:
    if pipeline.text is None:
        raise ValueError("the clicks protocol needs a pipeline with a text model")
    if max_clicks < 5:
        raise ValueError("max_clicks must be at least 5 (mIoU after 1, 3 and 5 clicks)")
    samples = make_samples(n, seed, height, width)
    curves = {m: [] for m in METHODS}
    t0 = time.perf_counter()
    for sample in samples:
        emb = pipeline.embed(sample.image)
        text_mask = pipeline.text_masks([emb], [sample.expression])[0]
        for m in METHODS:
            curves[m].append(run_sample(pipeline, sample, emb, m, max_clicks, text_mask))
    amb = np.array([bool(s.ambiguous) for s in samples])
    result = {"n": n, "seed": seed, "height": height, "width": width, "max_clicks": max_clicks,
              "n_ambiguous": int(amb.sum()), "model": dict(pipeline.model_ids), "methods": {}}
    for m in METHODS:
        c = np.asarray(curves[m])
        result["methods"][m] = {"all": summarize(c), "ambiguous": summarize(c[amb])}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def format_table(result: dict) -> str:
    lines = [f"ShapesRef clicks: n={result['n']} seed={result['seed']} size={result['width']}x"
             f"{result['height']} ambiguous={result['n_ambiguous']} max clicks="
             f"{result['max_clicks']}", "",
             "| method | subset | NoC@85 | NoC@90 | never 90% | mIoU@1 | mIoU@3 | mIoU@5 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m, subsets in result["methods"].items():
        for s, r in subsets.items():
            c = r["miou_per_click"]
            lines.append(f"| {m} | {s} | {r['noc@85']:.2f} | {r['noc@90']:.2f} | "
                         f"{r['never@90']:.1%} | {c[0]:.3f} | {c[2]:.3f} | {c[4]:.3f} |")
    return "\n".join(lines)
