"""The demo model's text expert (EVF-SAM), trained on the SAM's frozen embeddings: anew or in passes.

    python -m biprompt.train.text --model models/demo --new --pool 8000 --grounding 1  # make train-demo

Stage 2 (biprompt/train/demo.py) stops while the text expert is still improving fast: its
training IoU climbs from 0.37 to 0.52 over its last 500 steps. A pass of this stage reads the
saved EVF-SAM checkpoint, checks that its image encoder is the demo SAM's (whose cached
embeddings it is served with; the refinement stage never touches the encoder), trains everything
else on fresh seeded scenes (or, with --pool, on a seeded pool of scenes encoded once:
biprompt.train.batches.TextPool) with its own warm-up and cosine schedule, and writes it back in
the same layout. Nothing else in the model changes.

With --new it starts a text expert from nothing instead (stage 2 of demo.py, after `demo.py
--evf-steps 0`): a fresh EVF-SAM whose visual model is a copy of the saved SAM, as stage 2 builds
it. `make train-demo` trains it so, in one run on a pool, with --grounding: a loss on BEiT-3's
image patches (biprompt/train/grounding.py) that teaches it where the named object is, much
faster than the mask loss alone. Passes without --new over an existing expert still work (the
recipe before grounding ran three).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import biprompt  # noqa: F401  (torchvision/timm stand-ins before segment_anything)
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import read_hf_weights, save_evf
from biprompt.models.sam import build_sam
from biprompt.text import TextTokenizer
from biprompt.train.demo import DEMO_SAM, new_evf, train_text

ENCODER = "visual_model.image_encoder."


def load_trainable_evf(directory: Path) -> EvfSam:
    """The whole EVF-SAM (image encoder included) in float32, from the official layout."""
    config = EvfConfig.from_file(directory / "config.json")
    evf = EvfSam(config, with_image_encoder=True)
    state = {k: v.float() for k, v in read_hf_weights(directory).items()}
    evf.load_state_dict(state)
    return evf


def check_same_encoder(evf: EvfSam, sam_path: Path) -> None:
    sam_state = torch.load(sam_path, map_location="cpu", weights_only=True)
    for name, value in evf.state_dict().items():
        if name.startswith(ENCODER):
            theirs = sam_state[name.removeprefix("visual_model.")]
            if not torch.equal(value.half(), theirs.half()):
                raise SystemExit(f"{name} differs from {sam_path}: the text expert was not "
                                 f"trained on this SAM's embeddings")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/demo", help="the demo model directory")
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--images", type=int, default=16, help="scenes per step")
    p.add_argument("--prompts", type=int, default=4, help="expressions per scene")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--wide", action=argparse.BooleanOptionalAction, default=False,
                   help="scenes from shapes_ref.WIDE (as the other stages' --wide)")
    p.add_argument("--pool", type=int, default=0,
                   help="draw the scenes from a pool of this many, encoded once "
                   "(biprompt.train.batches.TextPool); 0: fresh scenes every step")
    p.add_argument("--distinct-targets", action="store_true",
                   help="with --pool: a scene's prompts name different objects (TextPool.batch)")
    p.add_argument("--grounding", type=float, default=0.0,
                   help="with --pool: weight of the grounding loss on BEiT-3's image patches "
                   "(biprompt.train.grounding); 0: the mask loss alone")
    p.add_argument("--new", action="store_true",
                   help="start from an untrained text expert on the saved SAM (and a new "
                   "tokenizer) instead of reading evf_demo")
    p.add_argument("--vocab-size", type=int, default=40, help="the tokenizer's, with --new")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.distinct_targets and not args.pool:
        raise SystemExit("--distinct-targets draws from the scene pool: give --pool N as well")
    if args.grounding and not args.pool:
        raise SystemExit("--grounding reads its targets from the scene pool: give --pool N as well")
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.model)
    evf_dir = root / "evf_demo"
    if args.new:
        torch.manual_seed(args.seed)  # the new expert's initial weights, then its training
        sam = build_sam(DEMO_SAM)
        state = torch.load(root / "sam_demo.pth", map_location="cpu", weights_only=True)
        sam.load_state_dict({k: v.float() for k, v in state.items()})
        evf, tok = new_evf(sam, evf_dir, args.vocab_size)
    else:
        evf = load_trainable_evf(evf_dir)
        check_same_encoder(evf, root / "sam_demo.pth")
        tok = TextTokenizer.from_pretrained(evf_dir)
        torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    train_text(evf, tok, rng, steps=args.steps, lr=args.lr, warmup=args.warmup,
               images=args.images, prompts=args.prompts, wide=args.wide,
               log_path=root / "train_log.jsonl", log_every=args.log_every, quiet=args.quiet,
               stage="evf" if args.new else "text", pool=args.pool,
               distinct=args.distinct_targets, grounding=args.grounding)
    minutes = (time.perf_counter() - t0) / 60
    save_evf(evf, evf_dir, tokenizer=tok.tokenizer if args.new else None, dtype=torch.float16)
    summary = {"text_minutes": round(minutes, 2),
               "evf_bytes": sum(f.stat().st_size for f in evf_dir.rglob("*") if f.is_file()),
               "args": vars(args)}
    # one entry per pass (passes without --new): earlier passes' entries are kept
    path = root / "text_summary.json"
    passes = json.loads(path.read_text()) if path.is_file() and not args.new else []
    path.write_text(json.dumps([*passes, summary], indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "args"}))
    return summary


if __name__ == "__main__":
    main()
