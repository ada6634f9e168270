"""Stage 3 of the demo model: refinement clicks. Teaches the demo SAM what its first-click training
never showed it: negative points, the previous mask as `mask_input`, and the single-mask output.

    python -m biprompt.train.refine --model models/demo          # make train-demo runs it last

Only the parts a first click never uses are trained, so a first click's three candidates (and
the one-click results, the ShapesRef tables, every cached embedding) stay bit for bit as they were:
the prompt encoder's mask branch (`mask_downscaling`) and negative-point embedding, and the
single-mask output's hypernetwork MLP and row 0 of the IoU head's last layer. (The output tokens
themselves stay frozen: all four go through the transformer together, so token 0 shapes the
three candidates too.) The image encoder is frozen; rows of shared tensors are frozen by zeroing their grads
(Adam without weight decay leaves a never-updated row exactly as it was). `main` checks that.

Each step: fresh scenes, a first click as stage 1 draws it, then 1-`max_clicks` clicks by the
protocol's clicker (biprompt.clicks) against the current mask, each decoded with every click so
far and the previous low-res logits; the loss is BCE + Dice of the single mask and the best of
the three candidates (so both refinement policies, single-mask and text-vote, have a trained
mask branch), plus the IoU head's error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import biprompt  # noqa: F401  (torchvision/timm stand-ins before segment_anything)
from biprompt.clicks import next_click
from biprompt.models.decoding import decode_all, decode_pairs
from biprompt.models.sam import build_sam
from biprompt.train.batches import CANVASES, make_batch, reweighted_canvases, scene_variation
from biprompt.train.demo import DEMO_BEIT3, DEMO_SAM, lr_at, mask_losses


def trainable(sam) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what a first click never uses."""
    for p in sam.parameters():
        p.requires_grad_(False)
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    params = [*pe.mask_downscaling.parameters(), pe.point_embeddings[0].weight,
              *dec.output_hypernetworks_mlps[0].parameters()]
    last = dec.iou_prediction_head.layers[-1]
    params += [last.weight, last.bias]
    for p in params:
        p.requires_grad_(True)
    # rows of a shared tensor that the first click reads: their grads are zeroed
    last.weight.register_hook(lambda g: _zero_rows(g, slice(1, None)))
    last.bias.register_hook(lambda g: _zero_rows(g, slice(1, None)))
    return params


def _zero_rows(grad: torch.Tensor, rows: slice) -> torch.Tensor:
    grad = grad.clone()
    grad[rows] = 0
    return grad


def _clicks(prev: torch.Tensor, gt_half: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The clicker's next click for each prompt, in the model frame; (x, y) and label."""
    half = size // 2
    pred = (F.interpolate(prev, (half, half), mode="bilinear", align_corners=False) > 0)
    pred = pred[:, 0].cpu().numpy()
    xy, lab = np.zeros((len(pred), 2), np.float32), np.ones(len(pred), np.int64)
    for i in range(len(pred)):
        c = next_click(pred[i], gt_half[i])
        if c is None:  # already right: a positive click inside the mask changes nothing
            ys, xs = np.nonzero(gt_half[i])
            c_x, c_y, pos = (int(xs[0]), int(ys[0]), True) if len(xs) else (0, 0, False)
        else:
            c_x, c_y, pos = c.x, c.y, c.positive
        xy[i] = (2 * c_x + 1, 2 * c_y + 1)  # half-res pixel -> model-frame centre
        lab[i] = int(pos)
    return xy, lab


def all_decoding(sam) -> list[torch.nn.Parameter]:
    """--full: the whole prompt encoder and mask decoder (the image encoder stays frozen); the
    first click's loss is kept in every step so the one-click behaviour is trained, not lost."""
    for p in sam.image_encoder.parameters():
        p.requires_grad_(False)
    params = [*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def train(sam, steps: int, *, seed: int, images: int, prompts: int, max_clicks: int, lr: float,
          warmup: int, full: bool = False, wide: bool = False, canvases: tuple = CANVASES,
          log=print) -> None:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = all_decoding(sam) if full else trainable(sam)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pe, dec, size = sam.prompt_encoder, sam.mask_decoder, DEMO_SAM.img_size
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        b = make_batch(rng, images, prompts, size, DEMO_BEIT3.img_size,
                       variation=scene_variation(wide), canvases=canvases)
        gt_half = (F.avg_pool2d(b.gt, 2) > 0.5)[:, 0].numpy()
        with torch.no_grad():
            emb = sam.image_encoder(b.images).repeat_interleave(prompts, 0)
        opt.zero_grad(set_to_none=True)
        image_pe = pe.get_dense_pe()
        with torch.set_grad_enabled(full):
            sparse, dense = pe(points=(b.coords, torch.ones(len(b.coords), 1, dtype=torch.int)),
                               boxes=None, masks=None)
            logits, iou_pred = decode_pairs(dec, emb, image_pe, sparse, dense, True)
            if full:  # the first click's own loss (stage 1's), so it is kept
                l0, iou0 = mask_losses(logits, b.gt, size)
                (l0.min(1).values.mean() + F.mse_loss(iou_pred, iou0)).backward()
                image_pe = pe.get_dense_pe()
        prev = logits.detach()[torch.arange(len(logits)), iou_pred.detach().argmax(1)][:, None]
        coords, labels = b.coords, torch.ones(len(b.coords), 1, dtype=torch.int)
        acc = {"single": 0.0, "multi": 0.0, "iou_single": 0.0}
        n_clicks = int(rng.integers(1, max_clicks + 1))
        for _ in range(n_clicks):
            xy, lab = _clicks(prev, gt_half, size)
            coords = torch.cat([coords, torch.from_numpy(xy)[:, None]], 1)
            labels = torch.cat([labels, torch.from_numpy(lab)[:, None].int()], 1)
            sparse, dense = pe(points=(coords, labels), boxes=None, masks=prev)
            # one pass gives both outputs (the single mask is token 0, the candidates 1-3)
            masks, ious = decode_all(dec, emb, image_pe, sparse, dense)
            one, one_iou, three, three_iou = masks[:, :1], ious[:, :1], masks[:, 1:], ious[:, 1:]
            l1, iou1 = mask_losses(one, b.gt, size)
            l3, iou3 = mask_losses(three, b.gt, size)
            loss = (l1.mean() + l3.min(1).values.mean() + F.mse_loss(one_iou, iou1)
                    + F.mse_loss(three_iou, iou3)) / n_clicks
            loss.backward()
            acc["single"] += iou1.mean().item() / n_clicks
            acc["multi"] += iou3.max(1).values.mean().item() / n_clicks
            acc["iou_single"] += F.mse_loss(one_iou, iou1).item() / n_clicks
            prev = one.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            log(json.dumps({"stage": "refine", "step": step + 1, "clicks": n_clicks,
                            **{k: round(v, 4) for k, v in acc.items()},
                            "minutes": round((time.perf_counter() - t0) / 60, 2)}))


def first_click_logits(sam, seed: int = 5) -> torch.Tensor:
    """Three candidates' logits for first clicks on fixed scenes: must not change in stage 3."""
    rng = np.random.default_rng(seed)
    b = make_batch(rng, 4, 2, DEMO_SAM.img_size, DEMO_BEIT3.img_size)
    with torch.no_grad():
        emb = sam.image_encoder(b.images).repeat_interleave(2, 0)
        pe = sam.prompt_encoder
        sparse, dense = pe(points=(b.coords, torch.ones(len(b.coords), 1, dtype=torch.int)),
                           boxes=None, masks=None)
        logits, iou = decode_pairs(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense, True)
    return torch.cat([logits.flatten(), iou.flatten()])


def load_demo_sam(path: Path):
    sam = build_sam(DEMO_SAM)
    state = torch.load(path, map_location="cpu")
    sam.load_state_dict({k: v.float() for k, v in state.items()})
    return sam.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/demo", help="folder with sam_demo.pth (rewritten)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--max-clicks", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--full", action="store_true", help="train the whole prompt encoder and mask "
                   "decoder, with the first click's loss (first clicks change)")
    p.add_argument("--wide", action=argparse.BooleanOptionalAction, default=False,
                   help="scenes from the wide distribution (shapes_ref.WIDE, free canvases)")
    p.add_argument("--canvas-weights", default=None, metavar="W,W,W,W",
                   help="how often each training canvas is drawn, in the order "
                   + ", ".join(f"{w}x{h}" for (h, w), _ in CANVASES) + " (default "
                   + ",".join(str(v) for _, v in CANVASES) + ")")
    args = p.parse_args(argv)
    try:
        canvases = reweighted_canvases(args.canvas_weights) if args.canvas_weights else CANVASES
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) / "sam_demo.pth"
    sam = load_demo_sam(path)
    before = first_click_logits(sam)
    t0 = time.perf_counter()
    log_path = Path(args.model) / "train_log.jsonl"
    with log_path.open("a") as fh:
        def log(line: str) -> None:
            print(line, flush=True)
            fh.write(line + "\n")
        train(sam.train(), args.steps, seed=args.seed, images=args.images, prompts=args.prompts,
              max_clicks=args.max_clicks, lr=args.lr, warmup=args.warmup, full=args.full,
              wide=args.wide, canvases=canvases, log=log)
    sam.eval()
    if not args.full and not torch.equal(first_click_logits(sam), before):
        raise AssertionError("stage 3 changed a first click's output: a frozen weight moved")
    torch.save({k: v.detach().half().contiguous() for k, v in sam.state_dict().items()}, path)
    summary = {"refine_minutes": round((time.perf_counter() - t0) / 60, 2), "args": vars(args)}
    print(json.dumps(summary))
    # one entry per pass over this SAM (make train-demo runs two), as text_summary.json
    record = Path(args.model) / "refine_summary.json"
    passes = json.loads(record.read_text()) if record.is_file() else []
    record.write_text(json.dumps([*passes, summary], indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
