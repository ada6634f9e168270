"""Where a model's weights come from, and loading just the part a role needs.

`open_sam` names a SAM checkpoint without reading its weights: its spec (from the shapes), its
model id and a lazy state. `load_sam_part` then reads only one part ("image_encoder", or
"prompt_encoder" + "mask_decoder"). `text_model_info` reads only an EVF-SAM config; `load_text_model`
reads EVF-SAM without its image encoder. `load_sam` (a whole SAM) is for tests and training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from torch import nn

from biprompt.errors import CheckpointError, ModelConfigError
from biprompt.models.beit3 import Beit3Spec
from biprompt.models.checkpoint import LazyState, open_state
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import load_evf, open_hf_weights
from biprompt.models.loading import fix_sam_buffers, materialize
from biprompt.models.sam import (
    SAM_PART_BUILDERS,
    SamSpec,
    build_sam,
    get_sam_spec,
    infer_sam_spec,
    match_variant,
)
from biprompt.profile import ModelProfile, TextModelConfig, read_profile
from biprompt.text import TextTokenizer
from biprompt.weights import resolve_dir, resolve_file

log = logging.getLogger(__name__)

__all__ = ["LoadedSam", "LoadedText", "SamSource", "TextInfo", "load_sam", "load_sam_part",
           "load_text", "load_text_model", "open_sam", "random_text_model", "read_profile",
           "text_model_info"]

# Words of the ShapesRef domain: the tiny profile's tokenizer is trained on these.
TINY_WORDS = ["the", "small", "large", "red", "green", "blue", "yellow", "circle", "square",
              "triangle", "leftmost", "rightmost"]
TINY_BEIT3 = Beit3Spec(embed_dim=32, layers=2, heads=2, ffn_dim=64, img_size=32, patch_size=8,
                       vocab_size=0, max_source_positions=66)
SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
PROBE_KEY = "image_encoder.patch_embed.proj.weight"


# --- SAM ------------------------------------------------------------------------------------


@dataclass
class SamSource:
    """A SAM checkpoint, opened but not read: `state` fetches tensors on first use."""

    spec: SamSpec
    model_id: str
    state: LazyState
    what: str

    def probe(self) -> torch.Tensor:
        """The patch-embedding weights (small): compared with EVF-SAM's own copy."""
        return self.state[PROBE_KEY].detach().float().clone()


def open_sam(source: str | Path | None, variant: str | dict | SamSpec | None = None,
             seed: int = 0) -> SamSource:
    """SAM from an official `.pth` (path, official name or URL), the `visual_model.*` part of an
    EVF-SAM checkpoint (its directory or weights file), or random weights when `source` is None
    (small variants only: the whole random model is built, then parts are taken from it)."""
    if source is None:
        if variant is None:
            raise ModelConfigError("random SAM weights need a variant (e.g. 'tiny')")
        spec = get_sam_spec(variant)
        torch.manual_seed(seed)
        state = build_sam(spec).state_dict()
        return SamSource(spec, f"sam-{spec.name}:random-{seed}", LazyState.of(state),
                         f"random SAM {spec.name}")
    path = Path(str(source)).expanduser()
    if path.is_dir():
        state, name = open_hf_weights(path), f"{path.name}/visual_model"
    else:
        path = resolve_file(source)
        state, name = open_state(path), path.stem
    if any(k.startswith("visual_model.") for k in state.shapes):
        log.warning("using the visual_model of an EVF-SAM checkpoint (%s) as SAM: its prompt "
                    "encoder and mask decoder are EVF's fine-tuned ones", source)
        state = state.sub("visual_model.")
        if not name.endswith("visual_model"):
            name = f"{name}/visual_model"
    spec = get_sam_spec(variant) if variant is not None else match_variant(infer_sam_spec(state))
    return SamSource(spec, f"sam-{spec.name}:{name}", state, f"SAM checkpoint {source}")


def load_sam_part(src: SamSource, part: str, dtype: torch.dtype | None = None) -> nn.Module:
    """One of SAM's modules ("image_encoder", "prompt_encoder", "mask_decoder"), reading only
    its own keys (each checked against the spec), floating weights converted to `dtype`."""
    if part not in SAM_PARTS:
        raise ValueError(f"unknown SAM part {part!r}; use {SAM_PARTS}")
    unknown = sorted({k.split(".", 1)[0] for k in src.state.shapes} - set(SAM_PARTS))
    if unknown:
        raise CheckpointError(f"{src.what} does not fit the model: unexpected key(s) under "
                              f"{unknown[0]!r}")
    build = SAM_PART_BUILDERS[part]
    # the decoder parts are small (about 4 M parameters): built on the CPU, they spare a decoder
    # replica the meta device's machinery
    return materialize(lambda: build(src.spec), src.state.sub(part + "."),
                       f"{src.what} ({part})", dtype=dtype, meta=part == "image_encoder")


@dataclass
class LoadedSam:
    model: Sam
    spec: SamSpec
    model_id: str


def load_sam(source: str | Path | None, variant: str | dict | SamSpec | None = None,
             seed: int = 0) -> LoadedSam:
    """A whole SAM (every part read): for tests, training and tools, not for serving roles."""
    src = open_sam(source, variant, seed)
    model = materialize(lambda: build_sam(src.spec), src.state, src.what,
                        fix_buffers=fix_sam_buffers)
    return LoadedSam(model, src.spec, src.model_id)


# --- EVF-SAM --------------------------------------------------------------------------------


@dataclass
class LoadedText:
    model: EvfSam
    tokenizer: TextTokenizer
    config: EvfConfig
    model_id: str
    encoder_probe: torch.Tensor | None = None


@dataclass(frozen=True)
class TextInfo:
    """What the other roles need to know of the text model, from its config alone."""

    model_id: str
    image_size: int  # BEiT-3's input side: the encoder role prepares this view of each image


def _text_dir(cfg: TextModelConfig, config_only: bool = False) -> Path:
    return resolve_dir(cfg.checkpoint, files=["config.json"] if config_only else None)


def text_model_info(cfg: TextModelConfig | None, sam_spec: SamSpec) -> TextInfo | None:
    """The text model's id and image size without reading its weights."""
    if cfg is None:
        return None
    if cfg.checkpoint:
        directory = _text_dir(cfg, config_only=True)
        config = EvfConfig.from_file(directory / "config.json")
        return TextInfo(f"evf:{directory.name}", config.beit3_spec.img_size)
    return TextInfo(f"evf-{sam_spec.name}:random-{cfg.seed}", TINY_BEIT3.img_size)


def load_text_model(source: str | Path, dtype: torch.dtype | None = None,
                    **limits) -> LoadedText:
    """EVF-SAM from its directory or hub id, without its image encoder; floating weights
    converted to `dtype` as they are read (None: as stored)."""
    directory = resolve_dir(source)
    loaded = load_evf(directory, dtype)
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


def load_text(cfg: TextModelConfig, sam_spec: SamSpec,
              dtype: torch.dtype | None = None) -> LoadedText:
    """The profile's text model: a checkpoint, or random small weights."""
    limits = {"max_tokens": cfg.max_tokens, "max_chars": cfg.max_chars}
    if cfg.checkpoint:
        return load_text_model(cfg.checkpoint, dtype, **limits)
    return random_text_model(sam_spec, seed=cfg.seed, **limits)


def open_profile_sam(profile: ModelProfile) -> SamSource:
    s = profile.sam
    return open_sam(s.checkpoint, s.variant, s.seed)
