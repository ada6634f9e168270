"""Loading an EVF-SAM checkpoint directory in the Hugging Face layout, unchanged:
config.json, model.safetensors or pytorch_model.bin (or their sharded index), tokenizer files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from biprompt.errors import CheckpointError
from biprompt.models.checkpoint import LazyState, check_keys, expected_shapes, open_state
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.loading import fix_sam_buffers, materialize

ENCODER_PREFIX = "visual_model.image_encoder."


def weights_file_names(directory: Path) -> list[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / f for f in sorted(set(weight_map.values()))]
    raise CheckpointError(
        f"no weights in {directory}: expected model.safetensors or pytorch_model.bin "
        "(or a sharded *.index.json)"
    )


def open_hf_weights(directory: Path) -> LazyState:
    """Every tensor of the directory's weights (all shards), read on first use."""
    return LazyState.union(open_state(f) for f in weights_file_names(Path(directory)))


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    state = open_hf_weights(directory)
    return {k: state[k] for k in state}


@dataclass
class LoadedEvf:
    model: EvfSam  # without its image encoder
    config: EvfConfig
    encoder_probe: torch.Tensor  # EVF's own patch-embedding weights, to compare with the SAM used


def load_evf(directory: str | Path, dtype: torch.dtype | None = None) -> LoadedEvf:
    """Check every key's shape against the full EVF-SAM layout, then read all but the image
    encoder (the pipeline's SAM embedding replaces it): its weights are never read, except the
    patch embedding kept as a probe."""
    directory = Path(directory)
    config = EvfConfig.from_file(directory / "config.json")
    state = open_hf_weights(directory)
    with torch.device("meta"):
        full = EvfSam(config, with_image_encoder=True)
    check_keys(expected_shapes(full), state, f"EVF-SAM checkpoint {directory}")
    probe = state[ENCODER_PREFIX + "patch_embed.proj.weight"].float().clone()
    kept = state.without(ENCODER_PREFIX)
    model = materialize(
        lambda: EvfSam(config, with_image_encoder=False), kept,
        f"EVF-SAM checkpoint {directory}", fix_buffers=fix_sam_buffers, dtype=dtype,
    )
    return LoadedEvf(model, config, probe)


def save_evf(model: EvfSam, directory: str | Path, tokenizer=None, safetensors: bool = True,
             dtype: torch.dtype | None = None) -> Path:
    """Write `model` (with its image encoder) in the Hugging Face layout EVF-SAM publishes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, directory / "pytorch_model.bin")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
