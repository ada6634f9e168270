"""Stage 4 of the demo model: the reference-image expert (biprompt.models.vrp) on the frozen demo SAM.

    python -m biprompt.train.reference --model models/demo      # make train-demo runs it last
    python -m biprompt.train.reference --model /tmp/m --pool 64 --steps 3   # smoke

As VRP-SAM trains its encoder, SAM stays frozen (image encoder and mask decoder): only the
visual reference prompt encoder learns. The frozen encoder makes a pool of scenes cheap: each
scene is encoded once, and every step draws fresh episodes from the pool (a target object in one
scene, a reference object of the same colour, shape and size class in another). The loss is
BCE + Dice of SAM's single-mask output against the union of the target scene's objects of that
class, at half the input size. One in five reference annotations is the object's box filled in, so
the expert also holds up on a coarse annotation (a box or a point turned into a mask by SAM).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import biprompt  # noqa: F401  (torchvision/timm stand-ins before segment_anything)
from biprompt.data.episodes import object_class
from biprompt.data.shapes_ref import generate_scene
from biprompt.factory import PROBE_KEY, load_sam
from biprompt.models.decoding import decode_pairs
from biprompt.models.vrp import VrpConfig, VrpEncoder, grid_mask, probe_digest, save_vrp
from biprompt.preprocess import sam_normalize_pad, sam_resize
from biprompt.train.batches import _gt_frame, draw_canvas, scene_variation
from biprompt.train.demo import DEMO_SAM, LossLog, _set_lr, half_res_losses, lr_at

BOX_ANNOTATION_P = 0.2


class Pool:
    """Scenes encoded once: embeddings, and per object its class, its half-size target (the
    loss's) and its area fractions on the embedding grid, both filled and as its box."""

    def __init__(self, sam, n: int, rng: np.random.Generator, batch: int = 16, quiet: bool = False,
                 wide: bool = False):
        size, grid = DEMO_SAM.img_size, DEMO_SAM.embedding_size
        variation = scene_variation(wide)
        embs, self.half, self.grid, self.box_grid, self.objects = [], [], [], [], []
        self.by_class: dict[tuple, list[int]] = defaultdict(list)
        bar = tqdm(range(0, n, batch), desc="pool", unit="batch", disable=quiet)
        for start in bar:
            images = []
            for s in range(start, min(n, start + batch)):
                h, w = draw_canvas(rng, variation)
                scene = generate_scene(rng, h, w, variation=variation)
                x = sam_resize(scene.image, size)
                images.append(sam_normalize_pad(x, size))
                input_size = (x.shape[-2], x.shape[-1])
                for o in scene.objects:
                    full = _gt_frame(o.mask, input_size, size)[None, None]
                    x0, y0, x1, y1 = o.bbox
                    boxed = np.zeros(o.mask.shape, dtype=bool)
                    boxed[y0:y1, x0:x1] = True
                    box_full = _gt_frame(boxed, input_size, size)[None, None]
                    self.by_class[object_class(o)].append(len(self.objects))
                    self.objects.append((s, object_class(o)))
                    self.half.append(F.avg_pool2d(full, 2)[0].half())
                    self.grid.append(grid_mask(full, grid)[0])
                    self.box_grid.append(grid_mask(box_full, grid)[0])
            with torch.no_grad():
                embs.append(sam.image_encoder(torch.cat(images)))
        self.emb = torch.cat(embs)
        self.classes = {s: [] for s in range(n)}
        for i, (s, key) in enumerate(self.objects):
            self.classes[s].append((i, key))

    def target(self, obj: int) -> torch.Tensor:
        """1xS/2xS/2: the union of the objects of `obj`'s class in its scene."""
        s, key = self.objects[obj]
        parts = [self.half[i].float() for i, k in self.classes[s] if k == key]
        return torch.stack(parts).amax(0)

    def episodes(self, rng: np.random.Generator, b: int):
        """b (target scene, reference scene, reference grid mask, target) tensors."""
        tgt, ref, ref_mask, gt = [], [], [], []
        while len(tgt) < b:
            t = int(rng.integers(len(self.objects)))
            s, key = self.objects[t]
            others = [i for i in self.by_class[key] if self.objects[i][0] != s]
            if not others:
                continue
            r = others[int(rng.integers(len(others)))]
            tgt.append(s)
            ref.append(self.objects[r][0])
            boxed = rng.random() < BOX_ANNOTATION_P
            ref_mask.append(self.box_grid[r] if boxed else self.grid[r])
            gt.append(self.target(t))
        return (self.emb[tgt], self.emb[ref], torch.stack(ref_mask), torch.stack(gt))


def vrp_logits(vrp: VrpEncoder, sam, tgt: torch.Tensor, ref: torch.Tensor,
               ref_mask: torch.Tensor) -> torch.Tensor:
    """Bx1x4hx4w low-res logits of the single-mask output under the VRP prompt tokens (of the
    VRP's own decoder copy, or SAM's)."""
    pe = sam.prompt_encoder
    image_pe = pe.get_dense_pe()
    feats = vrp.reference(ref, ref_mask, image_pe)
    tokens = vrp.target(tgt, feats, image_pe)
    b = tokens.shape[0]
    h, w = pe.image_embedding_size
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w)
    decoder = vrp.mask_decoder if vrp.mask_decoder is not None else sam.mask_decoder
    logits, _ = decode_pairs(decoder, tgt, image_pe, tokens, dense, multimask_output=False)
    return logits


def train(args) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model_dir = Path(args.model)
    loaded = load_sam(model_dir / "sam_demo.pth", "demo")
    sam = loaded.model.float().eval().requires_grad_(False)
    t0 = time.perf_counter()
    pool = Pool(sam, args.pool, rng, quiet=args.quiet, wide=args.wide)
    held = Pool(sam, args.held_out, np.random.default_rng(args.seed + 1), quiet=True)
    t_pool = time.perf_counter() - t0
    probe = sam.state_dict()[PROBE_KEY]
    config = VrpConfig(embed_dim=DEMO_SAM.prompt_dim, hidden_dim=args.hidden,
                       num_queries=args.queries, num_heads=4, ffn_dim=2 * args.hidden,
                       sam_model=loaded.model_id, sam_probe=probe_digest(probe),
                       own_decoder=args.own_decoder,
                       sam_spec=DEMO_SAM.to_dict() if args.own_decoder else None)
    vrp = VrpEncoder(config).train()
    if vrp.mask_decoder is not None:
        vrp.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
    opt = torch.optim.AdamW(vrp.parameters(), lr=args.lr, weight_decay=0.05)
    log_path = model_dir / "reference_log.jsonl"
    log_path.unlink(missing_ok=True)
    log = LossLog(log_path, "reference")
    bar = tqdm(range(args.steps), desc="reference", unit="step", disable=args.quiet)
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        _set_lr(opt, lr)
        tgt, ref, ref_mask, gt = pool.episodes(rng, args.batch)
        per, iou = half_res_losses(vrp_logits(vrp, sam, tgt, ref, ref_mask), gt)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vrp.parameters(), 1.0)
        opt.step()
        log.add(loss=loss.item(), iou=iou.mean().item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            row = log.flush(step + 1, lr)
            bar.set_postfix(loss=row["loss"], iou=row["iou"])
    vrp.eval()
    with torch.no_grad():
        hrng = np.random.default_rng(args.seed + 2)
        ious = []
        for _ in range(max(1, args.held_out_episodes // 64)):
            tgt, ref, ref_mask, gt = held.episodes(hrng, 64)
            ious.append(half_res_losses(vrp_logits(vrp, sam, tgt, ref, ref_mask), gt)[1])
        held_iou = float(torch.cat(ious).mean())
    t_all = time.perf_counter() - t0
    out = save_vrp(vrp, model_dir / "vrp_demo", dtype=torch.float16)
    summary = {"reference_minutes": round(t_all / 60, 2), "pool_minutes": round(t_pool / 60, 2),
               "held_out_iou": round(held_iou, 4),
               "vrp_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
               "args": vars(args)}
    (model_dir / "reference_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/demo", help="the demo model directory (its SAM is "
                   "read; vrp_demo/ is written)")
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--pool", type=int, default=3000, help="scenes encoded for training")
    p.add_argument("--held-out", type=int, default=200, help="scenes encoded for the check")
    p.add_argument("--held-out-episodes", type=int, default=512)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--own-decoder", action=argparse.BooleanOptionalAction, default=True,
                   help="fine-tune a copy of SAM's mask decoder (else SAM's, frozen)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--wide", action=argparse.BooleanOptionalAction, default=False,
                   help="training scenes from the wide distribution (held-out ones keep the spec)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return train(args)


if __name__ == "__main__":
    main()
