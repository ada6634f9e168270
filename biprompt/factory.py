"""Building the models a pipeline needs: SAM from a checkpoint or at random (tiny), EVF-SAM from a
checkpoint directory or at random, and model profiles (YAML)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from segment_anything.modeling import Sam

from biprompt.errors import ModelConfigError
from biprompt.models.beit3 import Beit3Spec
from biprompt.models.checkpoint import read_state_dict, sub_state
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import load_evf, read_hf_weights
from biprompt.models.loading import fix_sam_buffers, materialize
from biprompt.models.sam import SamSpec, build_sam, get_sam_spec, infer_sam_spec, match_variant
from biprompt.text import TextTokenizer
from biprompt.weights import resolve_dir, resolve_file

log = logging.getLogger(__name__)

# Words of the ShapesRef domain: the tiny profile's tokenizer is trained on these.
TINY_WORDS = ["the", "small", "large", "red", "green", "blue", "yellow", "circle", "square",
              "triangle", "leftmost", "rightmost"]
TINY_BEIT3 = Beit3Spec(embed_dim=32, layers=2, heads=2, ffn_dim=64, img_size=32, patch_size=8,
                       vocab_size=0, max_source_positions=66)


@dataclass
class LoadedSam:
    model: Sam
    spec: SamSpec
    model_id: str


def load_sam(source: str | Path | None, variant: str | dict | SamSpec | None = None,
             seed: int = 0) -> LoadedSam:
    """SAM from an official `.pth` (path, official name or URL), the `visual_model.*` part of an
    EVF-SAM checkpoint (its directory or weights file), or random weights when `source` is None."""
    if source is None:
        if variant is None:
            raise ModelConfigError("random SAM weights need a variant (e.g. 'tiny')")
        spec = get_sam_spec(variant)
        torch.manual_seed(seed)
        return LoadedSam(build_sam(spec), spec, f"sam-{spec.name}:random-{seed}")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        state, name = read_hf_weights(path), f"{path.name}/visual_model"
    else:
        path = resolve_file(source)
        state, name = read_state_dict(path), path.stem
    if any(k.startswith("visual_model.") for k in state):
        log.warning("using the visual_model of an EVF-SAM checkpoint (%s) as SAM: its prompt "
                    "encoder and mask decoder are EVF's fine-tuned ones", source)
        state = sub_state(state, "visual_model.")
        if not name.endswith("visual_model"):
            name = f"{name}/visual_model"
    spec = get_sam_spec(variant) if variant is not None else match_variant(infer_sam_spec(state))
    model = materialize(lambda: build_sam(spec), state, f"SAM checkpoint {source}",
                        fix_buffers=fix_sam_buffers)
    return LoadedSam(model, spec, f"sam-{spec.name}:{name}")


@dataclass
class LoadedText:
    model: EvfSam
    tokenizer: TextTokenizer
    config: EvfConfig
    model_id: str
    encoder_probe: torch.Tensor | None = None


def load_text_model(source: str | Path, **limits) -> LoadedText:
    directory = resolve_dir(source)
    loaded = load_evf(directory)
    tok = TextTokenizer.from_pretrained(directory, **limits)
    if len(tok.tokenizer) > loaded.config.beit3_spec.vocab_size:
        raise ModelConfigError(
            f"tokenizer has {len(tok.tokenizer)} tokens but BEiT-3's vocabulary is "
            f"{loaded.config.beit3_spec.vocab_size}"
        )
    return LoadedText(loaded.model, tok, loaded.config, f"evf:{directory.name}",
                      loaded.encoder_probe)


def random_text_model(sam_spec: SamSpec, beit3: Beit3Spec = TINY_BEIT3, seed: int = 0,
                      **limits) -> LoadedText:
    """A randomly initialised EVF-SAM of small shapes, with a tokenizer trained on TINY_WORDS."""
    import random

    rnd = random.Random(seed)
    sentences = [" ".join(rnd.choices(TINY_WORDS, k=rnd.randint(2, 5))) for _ in range(400)]
    tok = TextTokenizer.train(sentences + TINY_WORDS, vocab_size=48, **limits)
    beit3 = Beit3Spec(**{**beit3.to_dict(), "vocab_size": tok.vocab_size})
    config = EvfConfig(hidden_size=beit3.embed_dim, out_dim=sam_spec.prompt_dim,
                       mm_extractor_scale="custom", sam_scale="custom", torch_dtype="float32",
                       sam_spec=sam_spec, beit3_spec=beit3)
    torch.manual_seed(seed + 1)
    model = EvfSam(config, with_image_encoder=False).eval()
    return LoadedText(model, tok, config, f"evf-{sam_spec.name}:random-{seed}")


def read_profile(path: str | Path) -> dict:
    """A model profile YAML, with checkpoint paths made relative to the file's directory."""
    path = Path(path)
    try:
        profile = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"could not read model profile {path}: {exc}") from None
    for section in ("sam", "text_model"):
        part = profile.get(section) or {}
        ckpt = part.get("checkpoint")
        if isinstance(ckpt, str):
            ckpt = os.path.expandvars(ckpt)
            if "${" in ckpt or ckpt.startswith("$"):
                raise ModelConfigError(
                    f"{path}: {section}.checkpoint is {part['checkpoint']!r} and that "
                    "environment variable is not set"
                )
            if ckpt.startswith("."):
                ckpt = str((path.parent / ckpt).resolve())
            part["checkpoint"] = ckpt
    profile.setdefault("name", path.stem)
    return profile
