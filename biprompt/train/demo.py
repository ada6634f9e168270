"""Train the ShapesRef demo model: a tiny SAM, then a tiny EVF-SAM on its frozen embeddings.

    python -m biprompt.train.demo --out models/demo            # make train-demo
    python -m biprompt.train.demo --out /tmp/x --sam-steps 3 --evf-steps 3   # smoke

Stage 1 (SAM): batches of fresh scenes, several point prompts per scene (one encoder pass serves
them all), every pair decoded in one batched call. Loss: for each prompt, the minimum over SAM's
three candidates of BCE + Dice against a target sampled among the objects under the point, so the
part/whole ambiguity of nested objects spreads over the candidates; plus MSE of the IoU head
against each candidate's real IoU.

Stage 2 (EVF-SAM): BEiT-3 reads (image, expression), its CLS token is projected to one SAM prompt
token, and EVF's copy of SAM's prompt encoder and mask decoder draws the mask from the frozen SAM
embedding. The visual model starts as a copy of stage 1's SAM (its image encoder stays frozen).
`make train-demo` then runs three more passes over it (biprompt/train/text.py, `train_text`).
`make train-demo FAST=1` (the one-hour recipe) skips stage 2 here (--evf-steps 0) and trains the
text expert once, after the refinement stage, with text.py --new.

Both stages are seeded; scenes come from `biprompt.data.shapes_ref` at mixed canvas sizes so the
same checkpoint serves 256x256 and 320x240. Checkpoints are written in the official layouts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import biprompt  # noqa: F401  (torchvision/timm stand-ins before segment_anything)
from biprompt.data.shapes_ref import COLOURS, SHAPES
from biprompt.models.beit3 import Beit3Spec
from biprompt.models.decoding import decode_pairs
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import save_evf
from biprompt.models.sam import SAM_VARIANTS, build_sam
from biprompt.text import TextTokenizer
from biprompt.train.batches import TextPool, make_batch, scene_variation
from biprompt.train.grounding import GroundingHead, grounding_loss

DEMO_SAM = SAM_VARIANTS["demo"]
DEMO_BEIT3 = Beit3Spec(embed_dim=128, layers=4, heads=4, ffn_dim=512, img_size=128,
                       patch_size=16, vocab_size=0, max_source_positions=66)
def mask_losses(logits: torch.Tensor, gt: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits BxKxhxw (low-res), gt Bx1xSxS -> (BCE + Dice per candidate BxK, IoU per candidate).

    Computed at half the model's input size (2x the low-res grid) against area-averaged (soft)
    targets: a quarter of the full-size cost, for a boundary still finer than the logits'."""
    return half_res_losses(logits, F.avg_pool2d(gt, 2))


def half_res_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`mask_losses` against Bx1x(S/2)x(S/2) soft targets already at half the input size."""
    half = target.shape[-1]
    up = F.interpolate(logits, (half, half), mode="bilinear", align_corners=False)
    target = target.expand_as(up)
    bce = F.binary_cross_entropy_with_logits(up, target, reduction="none").mean((2, 3))
    p = up.sigmoid()
    inter = (p * target).sum((2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((2, 3)) + target.sum((2, 3)) + 1)
    with torch.no_grad():
        hard = up > 0
        i = (hard & (target > 0.5)).sum((2, 3)).float()
        u = (hard | (target > 0.5)).sum((2, 3)).float()
        iou = torch.where(u > 0, i / u.clamp(min=1), torch.zeros_like(u))
    return bce + dice, iou


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class LossLog:
    """Running means printed on the bar and written as JSON lines."""

    def __init__(self, path: Path, stage: str):
        self.fh = path.open("a")
        self.stage, self.acc, self.n, self.t0 = stage, {}, 0, time.perf_counter()

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.acc[k] = self.acc.get(k, 0.0) + float(v)
        self.n += 1

    def flush(self, step: int, lr: float) -> dict:
        row = {k: round(v / max(1, self.n), 4) for k, v in self.acc.items()}
        row.update(stage=self.stage, step=step, lr=lr, minutes=round((time.perf_counter() - self.t0) / 60, 2))
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        self.acc, self.n = {}, 0
        return row


def train_sam(args, log_path: Path) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    sam = build_sam(DEMO_SAM).train()
    opt = torch.optim.AdamW(sam.parameters(), lr=args.sam_lr, weight_decay=0.05)
    pe = sam.prompt_encoder
    log = LossLog(log_path, "sam")
    size, k = DEMO_SAM.img_size, args.prompts
    bar = tqdm(range(args.sam_steps), desc="SAM", unit="step", disable=args.quiet)
    for step in bar:
        lr = lr_at(step, args.sam_steps, args.sam_lr, args.warmup)
        _set_lr(opt, lr)
        b = make_batch(rng, args.images, k, size, DEMO_BEIT3.img_size,
                       variation=scene_variation(args.wide))
        emb = sam.image_encoder(b.images).repeat_interleave(k, 0)
        labels = torch.ones(len(b.coords), 1, dtype=torch.int)
        sparse, dense = pe(points=(b.coords, labels), boxes=None, masks=None)
        logits, iou_pred = decode_pairs(sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense,
                                        multimask_output=True)
        per_cand, iou = mask_losses(logits, b.gt, size)
        best = per_cand.min(dim=1).values.mean()
        iou_loss = F.mse_loss(iou_pred, iou)
        loss = best + iou_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        log.add(loss=loss.item(), mask=best.item(), iou_head=iou_loss.item(),
                best_iou=iou.max(dim=1).values.mean().item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.sam_steps:
            row = log.flush(step + 1, lr)
            bar.set_postfix(loss=row["loss"], best_iou=row["best_iou"])
    return sam.eval()


def expression_corpus() -> list[str]:
    """Every expression the spec can produce, to train the tokenizer on."""
    out = []
    for c in COLOURS:
        for s in SHAPES:
            out.append(f"the {c} {s}")
            out += [f"the {z} {c} {s}" for z in ("small", "large")]
            out += [f"the {p} {c} {s}" for p in ("leftmost", "rightmost")]
    return out


def new_evf(sam: torch.nn.Module, tok_dir: Path, vocab_size: int) -> tuple[EvfSam, TextTokenizer]:
    """An untrained demo EVF-SAM on `sam` (its visual model a copy of it) and its tokenizer,
    trained on the spec's expressions and written to `tok_dir`."""
    tok = TextTokenizer.train(expression_corpus() * 4, tok_dir, vocab_size=vocab_size)
    beit = Beit3Spec(**{**DEMO_BEIT3.to_dict(), "vocab_size": tok.vocab_size})
    config = EvfConfig(hidden_size=beit.embed_dim, out_dim=DEMO_SAM.prompt_dim,
                       mm_extractor_scale="custom", sam_scale="custom", torch_dtype="float16",
                       sam_spec=DEMO_SAM, beit3_spec=beit)
    evf = EvfSam(config, with_image_encoder=True)
    evf.visual_model.load_state_dict(sam.state_dict())
    return evf, tok


def train_evf(args, sam: torch.nn.Module, tok_dir: Path, log_path: Path) -> tuple[EvfSam, TextTokenizer]:
    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    evf, tok = new_evf(sam, tok_dir, args.vocab_size)
    train_text(evf, tok, rng, steps=args.evf_steps, lr=args.evf_lr, warmup=args.warmup,
               images=args.evf_images, prompts=args.prompts, wide=args.wide, log_path=log_path,
               log_every=args.log_every, quiet=args.quiet)
    return evf.eval(), tok


def train_text(evf: EvfSam, tok: TextTokenizer, rng: np.random.Generator, *, steps: int, lr: float,
               warmup: int, images: int, prompts: int, wide: bool, log_path: Path,
               log_every: int = 25, quiet: bool = False, stage: str = "evf",
               pool: int = 0, distinct: bool = False, grounding: float = 0.0) -> EvfSam:
    """Train every part of `evf` but its (frozen) image encoder on (scene, expression) -> mask:
    `steps` of `images` scenes with `prompts` expressions each, cosine from `lr`. The scenes are
    fresh every step, or with `pool` drawn from that many encoded once (batches.TextPool; the
    expressions are still drawn afresh; `distinct`: a scene's prompts name different objects,
    TextPool.batch). `grounding` > 0 adds that weight of biprompt.train.grounding's loss on
    BEiT-3's patches (a pool only); its head is trained alongside and then dropped."""
    if grounding and not pool:
        raise ValueError("the grounding loss reads its targets from the scene pool: give a pool")
    encoder = evf.visual_model.image_encoder.eval().requires_grad_(False)
    params = [p for n, p in evf.named_parameters() if not n.startswith("visual_model.image_encoder")]
    spec = evf.config.beit3_spec
    grid = spec.img_size // spec.patch_size if grounding else 0
    head = GroundingHead(spec.embed_dim, grid) if grounding else None  # drawn only when used
    opt = torch.optim.AdamW(params + (list(head.parameters()) if head else []), lr=lr,
                            weight_decay=0.05)
    size, beit_size, variation = DEMO_SAM.img_size, spec.img_size, scene_variation(wide)
    scenes = (TextPool(encoder, pool, rng, size, beit_size, variation, quiet=quiet, grid=grid)
              if pool else None)
    evf.train()
    encoder.eval()
    log = LossLog(log_path, stage)
    bar = tqdm(range(steps), desc=stage.upper(), unit="step", disable=quiet)
    for step in bar:
        step_lr = lr_at(step, steps, lr, warmup)
        _set_lr(opt, step_lr)
        if scenes is not None:
            emb, beit, texts, target, patches = scenes.batch(rng, images, prompts, distinct)
        else:
            b = make_batch(rng, images, prompts, size, beit_size, text_targets=True,
                           variation=variation)
            with torch.no_grad():
                emb = encoder(b.images).repeat_interleave(prompts, 0)
            beit, texts = b.beit.repeat_interleave(prompts, 0), b.texts
            target = F.avg_pool2d(b.gt, 2)  # as mask_losses does
        ids, padding = tok(texts)
        fused = evf.fuse(beit, ids, padding)
        logits = evf.decode(emb, evf.prompt_from(fused))
        per, iou = half_res_losses(logits, target)
        loss = per.mean()
        extra = {}
        if head is not None:
            ground = grounding_loss(head(fused), patches)
            loss = loss + grounding * ground
            extra["grounding"] = ground.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.add(loss=loss.item(), iou=iou.mean().item(), **extra)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = log.flush(step + 1, step_lr)
            bar.set_postfix(loss=row["loss"], iou=row["iou"])
    return evf.eval()


def save_demo(sam: torch.nn.Module, evf: EvfSam | None, tok: TextTokenizer | None,
              out: Path) -> dict:
    """SAM, and the text expert unless `evf` is None (`--evf-steps 0`: text.py --new trains it)."""
    out.mkdir(parents=True, exist_ok=True)
    sam_path = out / "sam_demo.pth"
    torch.save({k: v.detach().half().contiguous() for k, v in sam.state_dict().items()}, sam_path)
    sizes = {"sam_bytes": sam_path.stat().st_size}
    if evf is not None:
        evf_dir = save_evf(evf, out / "evf_demo", tokenizer=tok.tokenizer, dtype=torch.float16)
        sizes["evf_bytes"] = sum(f.stat().st_size for f in evf_dir.rglob("*") if f.is_file())
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="models/demo")
    p.add_argument("--seed", type=int, default=20261122)
    p.add_argument("--sam-steps", type=int, default=2800)
    p.add_argument("--evf-steps", type=int, default=1000,
                   help="stage 2's steps; 0: SAM only (text.py --new trains the text expert)")
    p.add_argument("--images", type=int, default=16, help="scenes per SAM step")
    p.add_argument("--evf-images", type=int, default=16, help="scenes per EVF step")
    p.add_argument("--prompts", type=int, default=4, help="prompts per scene")
    p.add_argument("--sam-lr", type=float, default=1e-3)
    p.add_argument("--evf-lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=40)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--wide", action=argparse.BooleanOptionalAction, default=False,
                   help="train on the wide distribution (shapes_ref.WIDE, free canvases); "
                   "measured worse for the demo model's size, see the README")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    sam = train_sam(args, log_path)
    t_sam = time.perf_counter() - t0
    evf, tok = train_evf(args, sam, out / "evf_demo", log_path) if args.evf_steps else (None, None)
    t_all = time.perf_counter() - t0
    sizes = save_demo(sam, evf, tok, out)
    summary = {"sam_minutes": round(t_sam / 60, 2), "total_minutes": round(t_all / 60, 2),
               **sizes, "args": vars(args)}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


if __name__ == "__main__":
    main()
