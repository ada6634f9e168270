"""Random-weight checkpoints of real shapes, written in the official layouts, for the benchmarks.

    .venv/bin/python benchmarks/checkpoints.py --root /tmp/bench-ckpt

Under `root` this writes a segment-anything `.pth` (`sam_vit_b_random.pth`), an EVF-SAM Hugging
Face directory (`evf_base_random/`: BEiT-3 base, vocabulary 64010, and a sentencepiece tokenizer
trained on ShapesRef-like expressions) whose SAM image encoder is the `.pth`'s own, as EVF-SAM's
frozen encoder is the official SAM's, and a model profile naming both (`vitb.yaml`). The SAM
`.pth` is float32, as SAM's release is; the EVF-SAM directory is float16, as EVF-SAM's release is
(`"torch_dtype": "float16"`). The benchmarks then load them through the project's normal loading
code. A JSON stamp records what was written; a later call with the same arguments reuses the files.

The weights are random: timings only, the masks mean nothing. SAM zero-initialises its absolute and
relative position parameters; they are drawn from N(0, 0.1^2) here, so the attention's relative
position bias does real work. SAM's image-encoder weights are then rounded to the float16 grid
(still stored as float32), so the EVF-SAM directory's float16 copy is the same encoder, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
import yaml

from biprompt.models.beit3 import BEIT3_SCALES, Beit3Spec, get_beit3_spec
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import save_evf
from biprompt.models.sam import SAM_SCALES, SAM_VARIANTS, SamSpec, build_sam, get_sam_spec
from biprompt.text import TextTokenizer

# Bump when anything written changes: a stamp of another version is never reused.
STAMP_VERSION = 2  # 2: the EVF-SAM directory in float16
POSITION_STD = 0.1
TOKENIZER_PIECES = 64  # sentencepiece pieces; BEiT-3's embedding table keeps its own size
AGREEMENT_THRESHOLD = 0.1
EVF_DTYPE = torch.float16  # the official EVF-SAM release's storage dtype

_COLOURS = ("red", "green", "blue", "yellow")
_SHAPES = ("circle", "square", "triangle")
_MODIFIERS = ("", "small", "large", "leftmost", "rightmost")


def shapes_ref_sentences(seed: int, n: int = 400) -> list[str]:
    """`n` expressions of the ShapesRef grammar ("the [small|large|leftmost|rightmost] red
    circle"), seeded."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        words = ["the", rnd.choice(_MODIFIERS), rnd.choice(_COLOURS), rnd.choice(_SHAPES)]
        out.append(" ".join(w for w in words if w))
    return out


def randomize_positions(sam: torch.nn.Module, std: float = POSITION_STD) -> None:
    """Draw SAM's image-encoder `pos_embed` and `rel_pos_*` (zeros in SAM's init) from N(0, std^2),
    in place, from torch's global generator."""
    with torch.no_grad():
        for name, p in sam.image_encoder.named_parameters():
            if name == "pos_embed" or "rel_pos" in name:
                p.normal_(0.0, std)


def round_encoder_to(sam: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round SAM's image-encoder tensors to `dtype`'s grid, in place; their own dtype stays. A copy
    stored in `dtype` then holds exactly the same values."""
    with torch.no_grad():
        for t in sam.image_encoder.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype))


def _sam_scale(spec: SamSpec) -> str:
    """EVF-SAM's name for an official SAM ("base" for vit_b), else "custom"."""
    return next((scale for scale, v in SAM_SCALES.items() if SAM_VARIANTS[v] == spec), "custom")


def _beit3_scale(spec: Beit3Spec) -> str:
    return next((scale for scale, b in BEIT3_SCALES.items() if b == spec), "custom")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _profile_text(name: str, sam_path: Path, sam_spec: SamSpec, evf_dir: Path) -> str:
    variant = sam_spec.name if SAM_VARIANTS.get(sam_spec.name) == sam_spec else sam_spec.to_dict()
    profile = {
        "name": name,
        "sam": {"checkpoint": str(sam_path), "variant": variant},
        "text_model": {"checkpoint": str(evf_dir)},
        "selection": {"agreement_threshold": AGREEMENT_THRESHOLD},
        "device": "cpu",
    }
    header = ("# Written by benchmarks/checkpoints.py: random weights in real shapes, for timings "
              "only.\n")
    return header + yaml.safe_dump(profile, sort_keys=False)


def _write_models(sam_path: Path, evf_dir: Path, sam_spec: SamSpec, beit3: Beit3Spec,
                  seed: int) -> None:
    torch.manual_seed(seed)
    sam = build_sam(sam_spec)
    randomize_positions(sam)
    round_encoder_to(sam, EVF_DTYPE)
    torch.save(sam.state_dict(), sam_path)

    with tempfile.TemporaryDirectory(prefix="biprompt-bench-tok-") as tmp:
        tok = TextTokenizer.train(shapes_ref_sentences(seed), tmp, vocab_size=TOKENIZER_PIECES)
        if beit3.vocab_size < tok.vocab_size:  # small custom specs leave the vocabulary to us
            beit3 = Beit3Spec(**{**beit3.to_dict(), "vocab_size": tok.vocab_size})
        config = EvfConfig(hidden_size=beit3.embed_dim, out_dim=sam_spec.prompt_dim,
                           mm_extractor_scale=_beit3_scale(beit3), sam_scale=_sam_scale(sam_spec),
                           torch_dtype=_dtype_name(EVF_DTYPE), sam_spec=sam_spec, beit3_spec=beit3)
        torch.manual_seed(seed + 1)
        evf = EvfSam(config, with_image_encoder=True).eval()
        # NOTE: EVF-SAM's image encoder is the frozen official SAM's: the two files share it.
        evf.visual_model.image_encoder.load_state_dict(sam.image_encoder.state_dict())
        save_evf(evf, evf_dir, tokenizer=tok.tokenizer, dtype=EVF_DTYPE)


def write_vitb_checkpoints(
    root: str | Path,
    seed: int = 0,
    *,
    sam_variant: str | SamSpec = "vit_b",
    beit3_scale: str | Beit3Spec = "base",
) -> dict:
    """Write (or reuse) a random SAM `.pth`, an EVF-SAM directory sharing its image encoder, and
    a model profile naming both, under `root`.

    sam_variant: a SAM variant name or a SamSpec; beit3_scale: "base" / "large" or a Beit3Spec
    (a custom spec whose vocab_size is below the tokenizer's gets the tokenizer's).
    Returns {"sam", "evf", "profile": Path, "sam_mb", "evf_mb": float, "reused": bool}.
    """
    sam_spec = get_sam_spec(sam_variant)
    beit3 = get_beit3_spec(beit3_scale) if isinstance(beit3_scale, str) else beit3_scale
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    sam_path = root / f"sam_{sam_spec.name}_random.pth"
    evf_dir = root / f"evf_{_beit3_scale(beit3)}_random"
    stem = sam_spec.name.replace("_", "")
    profile_path = root / f"{stem}.yaml"
    stamp_path = root / f"{stem}.stamp.json"
    stamp = {
        "version": STAMP_VERSION,
        "seed": seed,
        "sam_spec": sam_spec.to_dict(),
        "beit3_spec": beit3.to_dict(),
        "position_std": POSITION_STD,
        "tokenizer_pieces": TOKENIZER_PIECES,
        "evf_dtype": _dtype_name(EVF_DTYPE),
    }
    written = [sam_path, evf_dir / "config.json", evf_dir / "model.safetensors",
               evf_dir / "sentencepiece.bpe.model"]
    reused = (stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp
              and all(p.is_file() for p in written))
    if not reused:
        stamp_path.unlink(missing_ok=True)  # a half-written set is never reused
        _write_models(sam_path, evf_dir, sam_spec, beit3, seed)
    _write_if_changed(profile_path, _profile_text(f"{sam_spec.name}-shaped-random", sam_path,
                                                  sam_spec, evf_dir))
    if not reused:
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return {"sam": sam_path, "evf": evf_dir, "profile": profile_path,
            "sam_mb": _mb(sam_path), "evf_mb": _mb(evf_dir), "reused": reused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/bench-ckpt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sam-variant", default="vit_b")
    parser.add_argument("--beit3-scale", default="base")
    args = parser.parse_args()
    out = write_vitb_checkpoints(args.root, args.seed, sam_variant=args.sam_variant,
                                 beit3_scale=args.beit3_scale)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in out.items()}, indent=2))


if __name__ == "__main__":
    main()
