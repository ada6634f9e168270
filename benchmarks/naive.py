"""The naive BiPrompt baseline: BiPrompt-SAM as its authors would run it, no serving, no cache.

    .venv/bin/python benchmarks/naive.py --profile configs/models/demo.yaml --requests 3

Per request:
- SAM through segment-anything's own `SamPredictor`: `set_image` (an encoder pass), then
  `predict(point, multimask_output=True)` for the three candidates;
- EVF-SAM as its own inference script runs it: the full model (its own copy of the SAM image
  encoder) encodes the image a second time, BEiT-3 reads the 224x224 view and the tokens, and
  EVF's prompt encoder and mask decoder draw the text mask;
- the candidate with the highest IoU against the text mask (numpy; `np.argmax`, so a tie goes to
  the lowest index). Unlike `biprompt.selection.select` there is no fallback to SAM's top candidate
  when the text mask is empty or agrees poorly: the paper's rule, nothing more.

Both image encoders run the reference attention, whatever the project's default becomes. Inputs
are prepared with the project's own helpers (`biprompt.preprocess`, `biprompt.text`), so they are
the same as `BiPromptPipeline`'s; no computation is shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import biprompt  # noqa: F401  (must precede segment_anything: installs torchvision stand-ins)
from biprompt.errors import ModelConfigError
from biprompt.factory import read_profile
from biprompt.models.evf import EvfConfig, EvfSam
from biprompt.models.evf_loading import read_hf_weights
from biprompt.models.fast_attention import set_fast_attention
from biprompt.models.loading import fix_sam_buffers, materialize
from biprompt.models.sam import build_sam, get_sam_spec, infer_sam_spec, match_variant
from biprompt.preprocess import beit3_input, sam_normalize_pad, sam_resize
from biprompt.text import TextTokenizer
from biprompt.weights import resolve_dir, resolve_file

# isort: split
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

STAGES = ("sam_set_image", "sam_predict", "evf_encoder", "evf_text", "select", "total")


def load_sam_pth(checkpoint: str | Path, variant: str | dict | None = None) -> Sam:
    """segment-anything's own recipe (`build_sam_vit_b(checkpoint)`): build, `torch.load`,
    `load_state_dict`. The variant is read from the shapes when not given."""
    state = torch.load(resolve_file(checkpoint), map_location="cpu", weights_only=True)
    spec = get_sam_spec(variant) if variant is not None else match_variant(infer_sam_spec(state))
    sam = build_sam(spec)
    sam.load_state_dict(state)
    return sam.float().eval()


def load_full_evf(directory: str | Path) -> EvfSam:
    """EVF-SAM with every checkpoint key, its own SAM image encoder included, in float32."""
    directory = resolve_dir(directory)
    config = EvfConfig.from_file(directory / "config.json")
    model = materialize(lambda: EvfSam(config, with_image_encoder=True),
                        read_hf_weights(directory), f"EVF-SAM checkpoint {directory}",
                        fix_buffers=fix_sam_buffers)
    return model.float().eval()


def candidate_ious(candidates: np.ndarray, text_mask: np.ndarray) -> np.ndarray:
    """IoU of each KxHxW bool candidate with the HxW bool text mask (0 when both are empty)."""
    ious = []
    for c in candidates:
        union = np.logical_or(c, text_mask).sum()
        ious.append(np.logical_and(c, text_mask).sum() / union if union else 0.0)
    return np.array(ious, dtype=np.float64)


class NaiveBiPrompt:
    """Two encoder passes per request (SamPredictor's and EVF-SAM's own), nothing reused."""

    def __init__(self, sam_checkpoint: str | Path, evf_checkpoint: str | Path, *,
                 sam_variant: str | dict | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        sam = load_sam_pth(sam_checkpoint, sam_variant).to(self.device)
        self.evf = load_full_evf(evf_checkpoint).to(self.device)
        # NOTE: explicit, so the baseline keeps the reference attention if the default changes.
        set_fast_attention(sam.image_encoder, False)
        set_fast_attention(self.evf.visual_model.image_encoder, False)
        self.predictor = SamPredictor(sam)
        self.tokenizer = TextTokenizer.from_pretrained(resolve_dir(evf_checkpoint))

    @classmethod
    def from_profile(cls, path: str | Path) -> NaiveBiPrompt:
        """From a model profile YAML (configs/models/*.yaml) that names both checkpoints."""
        profile = read_profile(path)
        sam_cfg = profile.get("sam") or {}
        text_cfg = profile.get("text_model") or {}
        if not sam_cfg.get("checkpoint") or not text_cfg.get("checkpoint"):
            raise ModelConfigError(f"{path}: the naive baseline needs sam.checkpoint and "
                                   "text_model.checkpoint (random models are not supported)")
        return cls(sam_cfg["checkpoint"], text_cfg["checkpoint"],
                   sam_variant=sam_cfg.get("variant"), device=profile.get("device", "cpu"))

    @torch.no_grad()
    def _evf_encode(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """EVF-SAM's own SAM encoder pass: 1xCxhxw embedding and the resized (h, w)."""
        size = self.evf.visual_model.image_encoder.img_size
        resized = sam_resize(image, size)
        x = sam_normalize_pad(resized, size).to(self.device)
        return self.evf.visual_model.image_encoder(x), tuple(resized.shape[-2:])

    @torch.no_grad()
    def _evf_text(self, image: np.ndarray, embedding: torch.Tensor,
                  input_size: tuple[int, int], text: str) -> np.ndarray:
        """BEiT-3 on (224x224 view, tokens) -> one prompt token -> EVF's decoder -> HxW bool."""
        vm = self.evf.visual_model
        beit = beit3_input(image, self.evf.config.beit3_spec.img_size).to(self.device)
        ids, padding = self.tokenizer([text])
        out = self.evf.mm_extractor.beit3(visual_tokens=beit, textual_tokens=ids.to(self.device),
                                          text_padding_position=padding.to(self.device))
        feat = self.evf.text_hidden_fcs[0](out["encoder_out"][:, :1, :])
        sparse, dense = vm.prompt_encoder(points=None, boxes=None, masks=None)
        sparse = torch.cat([sparse, feat], dim=1)
        low_res, _ = vm.mask_decoder(image_embeddings=embedding,
                                     image_pe=vm.prompt_encoder.get_dense_pe(),
                                     sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False)
        masks = vm.postprocess_masks(low_res, input_size, image.shape[:2])
        return (masks[0, 0] > vm.mask_threshold).cpu().numpy()

    def segment(self, image: np.ndarray, point: tuple[float, float], text: str) -> dict:
        """image: HxWx3 uint8 RGB; point: (x, y) in image pixels (segment-anything's convention);
        text: a referring expression.

        Returns mask (HxW bool), candidates (3xHxW bool), scores (3,), text_mask (HxW bool),
        text_ious (3,), selected (int) and timings_s (seconds per stage, see STAGES).
        """
        t = {}
        start = time.perf_counter()
        self.predictor.set_image(image)
        t["sam_set_image"] = time.perf_counter()
        candidates, scores, _ = self.predictor.predict(
            point_coords=np.array([point], dtype=np.float64), point_labels=np.array([1]),
            multimask_output=True,
        )
        t["sam_predict"] = time.perf_counter()
        embedding, input_size = self._evf_encode(image)
        t["evf_encoder"] = time.perf_counter()
        text_mask = self._evf_text(image, embedding, input_size, text)
        t["evf_text"] = time.perf_counter()
        ious = candidate_ious(candidates, text_mask)
        selected = int(np.argmax(ious))
        t["select"] = time.perf_counter()
        timings, last = {}, start
        for stage, at in t.items():
            timings[stage], last = at - last, at
        timings["total"] = last - start
        return {"mask": candidates[selected], "candidates": candidates, "scores": scores,
                "text_mask": text_mask, "text_ious": ious, "selected": selected,
                "timings_s": timings}


def main() -> None:
    from biprompt.data.shapes_ref import make_samples

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="configs/models/demo.yaml")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="ShapesRef image side (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    naive = NaiveBiPrompt.from_profile(args.profile)
    runs: dict[str, list[float]] = {s: [] for s in STAGES}
    for s in make_samples(args.requests, args.seed, args.size, args.size):
        out = naive.segment(s.image, s.point_index, s.expression)
        for stage in STAGES:
            runs[stage].append(out["timings_s"][stage])
    print(json.dumps({"profile": args.profile, "threads": torch.get_num_threads(),
                      "requests": args.requests,
                      "median_s": {k: round(statistics.median(v), 4) for k, v in runs.items()}},
                     indent=2))


if __name__ == "__main__":
    main()
