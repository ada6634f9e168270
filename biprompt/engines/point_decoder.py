"""The point-decoder engine: SAM's prompt encoder and mask decoder -> three candidates a prompt.

Loads only `prompt_encoder.*` and `mask_decoder.*` from the SAM checkpoint (about 4 M parameters
for every official variant): a decoder replica never holds the image encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder

from biprompt.engines.base import Placement, param_bytes
from biprompt.errors import InvalidImageError, InvalidPromptError
from biprompt.factory import load_sam_part, open_sam
from biprompt.models.decoding import upscale_logits
from biprompt.models.sam import SamSpec
from biprompt.preprocess import transform_boxes, transform_coords
from biprompt.profile import ModelProfile
from biprompt.prompts import Prompt
from biprompt.types import ImageEmbedding, PointCandidates

MASK_THRESHOLD = 0.0  # segment-anything's Sam.mask_threshold


class PointDecoderEngine:
    role = "points"

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, spec: SamSpec,
                 model_id: str, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None):
        self.place = Placement(device, dtype)
        self.spec, self.model_id = spec, model_id
        # NOTE: the prompt encoder stays float32 (tiny, and SAM builds float32 padding points
        # internally); its outputs are cast to the model dtype.
        self.prompt_encoder = prompt_encoder.to(self.place.device, torch.float32).eval()
        self.mask_decoder = mask_decoder.to(self.place.device, self.place.dtype).eval()

    @classmethod
    def from_profile(cls, profile: ModelProfile | dict | str | None = None,
                     **options) -> PointDecoderEngine:
        p = ModelProfile.load(profile)
        src = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
        options = {"device": p.device, "dtype": p.dtype, **options}
        dtype = Placement(options["device"], options["dtype"]).dtype
        return cls(load_sam_part(src, "prompt_encoder"), load_sam_part(src, "mask_decoder", dtype),
                   src.spec, src.model_id, **options)

    def weights(self) -> dict[str, int]:
        return {"sam.prompt_encoder": param_bytes(self.prompt_encoder),
                "sam.mask_decoder": param_bytes(self.mask_decoder)}

    def check(self, emb: ImageEmbedding) -> None:
        if emb.model_id != self.model_id:
            raise InvalidImageError(
                f"embedding was made by {emb.model_id}, this decoder runs {self.model_id}")

    @torch.no_grad()
    def decode_points(self, emb: ImageEmbedding, prompts: Sequence[Prompt]) -> list[PointCandidates]:
        """SAM's candidates for each prompt on one image (three, or one for a single-mask prompt),
        one batched decoder call per Prompt.group_key."""
        self.check(emb)
        dev, dtype = self.place.device, self.place.dtype
        results: list[PointCandidates | None] = [None] * len(prompts)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.group_key, []).append(i)
        image = emb.embedding.to(dev, dtype)
        size = self.spec.img_size
        for (n, has_box, has_mask, multimask), idx in groups.items():
            points = boxes = masks_in = None
            if n:
                coords = np.stack([transform_coords(prompts[i].points, emb.original_size, size)
                                   for i in idx])
                labels = np.stack([prompts[i].labels for i in idx])
                points = (torch.as_tensor(coords, dtype=torch.float, device=dev),
                          torch.as_tensor(labels, dtype=torch.int, device=dev))
            if has_box:
                b = np.concatenate([transform_boxes(prompts[i].box[None], emb.original_size, size)
                                    for i in idx])
                boxes = torch.as_tensor(b, dtype=torch.float, device=dev)
            if has_mask:
                masks_in = torch.as_tensor(np.stack([self._mask_input(prompts[i]) for i in idx]),
                                           dtype=torch.float, device=dev)[:, None]
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks_in)
            low_res, scores = self.mask_decoder(
                image_embeddings=image,
                image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
                sparse_prompt_embeddings=sparse.to(dtype),
                dense_prompt_embeddings=dense.to(dtype),
                multimask_output=multimask,
            )
            masks = upscale_logits(low_res.float(), size, emb.input_size, emb.original_size)
            masks = (masks > MASK_THRESHOLD).cpu().numpy()
            scores_np = scores.float().cpu().numpy()
            low_np = low_res.float().cpu().numpy()
            for j, i in enumerate(idx):
                results[i] = PointCandidates(masks[j], scores_np[j], low_np[j])
        return results  # type: ignore[return-value]

    @property
    def logits_size(self) -> int:
        """L of the LxL low-res logits this decoder returns and takes as mask_input (4x the
        embedding grid: 256 for the official models)."""
        return 4 * self.spec.embedding_size

    def _mask_input(self, prompt: Prompt) -> np.ndarray:
        m = prompt.mask_input
        if m.shape != (self.logits_size, self.logits_size):
            raise InvalidPromptError(
                f"mask_input is {m.shape[0]}x{m.shape[1]}; this model takes "
                f"{self.logits_size}x{self.logits_size} low-res logits (send back the logits, or "
                "the logits_id, of an earlier answer from this server)")
        return m

    def warmup(self) -> None:
        g = self.spec.embedding_size
        side = self.spec.img_size
        emb = ImageEmbedding(torch.zeros(1, self.spec.prompt_dim, g, g), (side, side),
                             (side, side), self.model_id)
        self.decode_points(emb, [Prompt(np.array([[side / 2, side / 2]]), np.array([1]))])
