"""The text-mask engine: BEiT-3 fuses an image's 224x224 view with a referring expression, EVF's
SAM prompt encoder and mask decoder draw the mask on the shared SAM embedding.

Loads EVF-SAM without its image encoder (those keys are never read). To check that the text model
fits the SAM whose embeddings it will read, it reads SAM's shapes and one small tensor (the patch
embedding), never SAM's weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from biprompt.engines.base import Placement, param_bytes
from biprompt.errors import InvalidImageError, ModelConfigError
from biprompt.factory import LoadedText, SamSource, load_text, open_sam
from biprompt.models.decoding import upscale_logits
from biprompt.models.sam import SamSpec
from biprompt.profile import ModelProfile
from biprompt.types import ImageEmbedding

log = logging.getLogger(__name__)


def check_pairing(sam_spec: SamSpec, sam_probe: torch.Tensor | None, text: LoadedText) -> None:
    """The text model must have been trained on embeddings of this SAM: same shapes, and (where
    both are known) the same encoder weights, else a warning."""
    ts = text.config.sam_spec
    if (ts.encoder_dim, ts.encoder_depth, ts.img_size, ts.patch_size, ts.prompt_dim) != (
        sam_spec.encoder_dim, sam_spec.encoder_depth, sam_spec.img_size, sam_spec.patch_size,
        sam_spec.prompt_dim,
    ):
        raise ModelConfigError(
            f"the text model was trained on {ts.name} SAM embeddings (sam_scale "
            f"{text.config.sam_scale!r}) but the pipeline's SAM is {sam_spec.name}: pair "
            "SAM and EVF-SAM checkpoints of the same scale"
        )
    if text.encoder_probe is not None and sam_probe is not None:
        if not torch.allclose(sam_probe, text.encoder_probe, rtol=1e-2, atol=1e-3):
            log.warning("EVF-SAM's image encoder weights differ from the SAM checkpoint's: "
                        "its text masks will be computed on another encoder's embedding")


class TextMaskEngine:
    """EVF-SAM as torch modules (any device and dtype); the exported CPU backends
    (`biprompt.engines.exported_text`) replace `_prompt`, BEiT-3's fusion and the projection to
    a SAM prompt token (nearly all of the text model's time)."""

    role = "text"
    backend = "torch"

    def __init__(self, text: LoadedText, sam_spec: SamSpec, sam_model_id: str, *,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
        self.place = Placement(device, dtype)
        self.sam_spec, self.sam_model_id = sam_spec, sam_model_id
        self.tokenizer, self.config, self.model_id = text.tokenizer, text.config, text.model_id
        self.model = text.model.to(self.place.device, self.place.dtype).eval()
        self.model.visual_model.prompt_encoder.float()
        self.backend_choice: dict | None = None  # set by `auto` backend selection

    def describe(self) -> dict:
        """The backend and how it was chosen (`auto`: every backend's timing)."""
        return {"backend": self.backend, "backend_choice": self.backend_choice}

    def _prompt(self, beit: torch.Tensor, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """BEiT-3 over (224x224 view, tokens) pairs -> Bx1xC SAM prompt tokens."""
        return self.model.text_prompt(beit, ids, padding)

    @classmethod
    def from_profile(cls, profile: ModelProfile | dict | str | None = None,
                     sam: SamSource | None = None, **options) -> TextMaskEngine:
        """EVF-SAM without its image encoder; SAM's shapes and patch embedding for the check."""
        p = ModelProfile.load(profile)
        if p.text is None:
            raise ModelConfigError(f"profile {p.name!r} has no text_model")
        sam = sam or open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
        options = {"device": p.device, "dtype": p.dtype, **options}
        place = Placement(options["device"], options["dtype"])
        text = load_text(p.text, sam.spec, place.dtype)
        check_pairing(sam.spec, sam.probe(), text)
        return cls(text, sam.spec, sam.model_id, **options)

    def weights(self) -> dict[str, int]:
        vm = self.model.visual_model
        return {"evf.beit3": param_bytes(self.model.mm_extractor),
                "evf.text_hidden_fcs": param_bytes(self.model.text_hidden_fcs),
                "evf.prompt_encoder": param_bytes(vm.prompt_encoder),
                "evf.mask_decoder": param_bytes(vm.mask_decoder),
                "evf.image_encoder": param_bytes(vm.image_encoder)}

    def validate(self, text: object) -> str:
        """The stripped expression, or InvalidPromptError (empty, too long, too many tokens)."""
        return self.tokenizer.validate(text)

    @torch.no_grad()
    def text_masks(self, embeddings: Sequence[ImageEmbedding], texts: Sequence[str]) -> list[np.ndarray]:
        """EVF-SAM's mask for each (embedding i, text i) pair, in one batched call. HxW bool each."""
        if len(embeddings) != len(texts):
            raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} texts")
        if not texts:
            return []
        for e in embeddings:
            if e.model_id != self.sam_model_id:
                raise InvalidImageError(f"embedding was made by {e.model_id}; this text model "
                                        f"reads {self.sam_model_id} embeddings")
            if e.beit_image is None:
                raise InvalidImageError("embedding has no text-model view: re-embed the image "
                                        "with a profile that has a text model")
        dev, dtype = self.place.device, self.place.dtype
        ids, padding = self.tokenizer(texts)
        beit = torch.cat([e.beit_image for e in embeddings]).to(dev, dtype)
        image = torch.cat([e.embedding for e in embeddings]).to(dev, dtype)
        prompt = self._prompt(beit, ids.to(dev), padding.to(dev))
        low_res = self.model.decode(image, prompt.to(dev, dtype)).float()
        return [
            (upscale_logits(low_res[i : i + 1], self.sam_spec.img_size, e.input_size,
                            e.original_size)[0, 0] > 0).cpu().numpy()
            for i, e in enumerate(embeddings)
        ]

    def dummy(self) -> tuple[ImageEmbedding, str]:
        """A zero embedding of a full-size square image and a one-word expression."""
        g, side = self.sam_spec.embedding_size, self.sam_spec.img_size
        s = self.config.beit3_spec.img_size
        emb = ImageEmbedding(torch.zeros(1, self.sam_spec.prompt_dim, g, g), (side, side),
                             (side, side), self.sam_model_id, torch.zeros(1, 3, s, s))
        word = next(iter(self.tokenizer.tokenizer.get_vocab()), "a").strip("\u2581") or "a"
        return emb, word if word.isalpha() else "a"

    def warmup(self) -> None:
        emb, word = self.dummy()
        self.text_masks([emb], [word])

    def time_once(self) -> float:
        """Ms of one text mask (the `auto` backend's measure)."""
        emb, word = self.dummy()
        t = time.perf_counter()
        self.text_masks([emb], [word])
        return (time.perf_counter() - t) * 1000.0
