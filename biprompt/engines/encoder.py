"""The image-encoder engine: SAM's ViT over batches of images -> ImageEmbedding each.

Loads only `image_encoder.*` from the SAM checkpoint. It also prepares the text model's view of
each image (BEiT-3's input), whose size it reads from the text model's config alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT

from biprompt.config import DEFAULT_MAX_PIXELS
from biprompt.engines.base import Placement, param_bytes
from biprompt.factory import TextInfo, load_sam_part, open_sam, text_model_info
from biprompt.images import to_rgb_array
from biprompt.models.fast_attention import set_fast_attention
from biprompt.models.sam import SamSpec
from biprompt.preprocess import beit3_input, check_model_input, sam_normalize_pad, sam_resize
from biprompt.profile import ModelProfile
from biprompt.types import ImageEmbedding


class ImageEncoderEngine:
    """SAM's image encoder as a torch module (any device and dtype); the exported CPU backends
    (`biprompt.engines.exported_encoder`) replace `_forward`."""

    role = "encoder"
    backend = "torch"

    def __init__(self, encoder: ImageEncoderViT, spec: SamSpec, model_id: str, *,
                 text: TextInfo | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, fast_encoder: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.place = Placement(device, dtype)
        self.spec, self.model_id, self.text = spec, model_id, text
        self.encoder = encoder.to(self.place.device, self.place.dtype).eval()
        # The fast attention path (biprompt.models.fast_attention): the same weights, embeddings
        # within float rounding of segment-anything's forward, 2-3x faster on CPU.
        # NOTE: switches the module's classes in place.
        set_fast_attention(self.encoder, fast_encoder)
        self.fast_encoder = fast_encoder
        self.max_pixels = max_pixels
        self.backend_choice: dict | None = None  # set by `auto` backend selection

    def describe(self) -> dict:
        """The backend and how it was chosen (`auto`: every backend's timing)."""
        return {"backend": self.backend, "backend_choice": self.backend_choice,
                "fast_encoder": self.fast_encoder}

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS normalised, padded images -> BxCxhxw embeddings."""
        return self.encoder(batch.to(self.place.device, self.place.dtype))

    @classmethod
    def from_profile(cls, profile: ModelProfile | dict | str | None = None,
                     **options) -> ImageEncoderEngine:
        """Reads SAM's image-encoder weights and the text model's config; nothing else."""
        p = ModelProfile.load(profile)
        src = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
        options = {"fast_encoder": p.sam.fast_encoder, "device": p.device, "dtype": p.dtype,
                   **options}
        dtype = Placement(options["device"], options["dtype"]).dtype
        return cls(load_sam_part(src, "image_encoder", dtype), src.spec, src.model_id,
                   text=text_model_info(p.text, src.spec), **options)

    @property
    def device(self) -> torch.device:
        return self.place.device

    def weights(self) -> dict[str, int]:
        return {"sam.image_encoder": param_bytes(self.encoder)}

    @torch.no_grad()
    def embed_batch(self, images: Sequence) -> list[ImageEmbedding]:
        """Encode several images (path, bytes, PIL image or HxWx3 uint8 array each) in one
        encoder call; they are padded to the same square."""
        if not images:
            return []
        return self.embed_rgb([to_rgb_array(im, self.max_pixels)[0] for im in images])

    def check_input(self, original_size: tuple[int, int]) -> None:
        """Raise InvalidImageError (422) for an (h, w) this model cannot take (too small, or too
        thin for SAM's resize); cheap, so callers can sort items out before batching them."""
        check_model_input((int(original_size[0]), int(original_size[1])), self.spec.img_size)

    @torch.no_grad()
    def embed_rgb(self, rgbs: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """HxWx3 uint8 arrays (decoded and size-checked) -> one embedding each. Every image is
        checked (`check_input`) before any is encoded: one the model can't take raises
        InvalidImageError, instead of failing the batch's encoder call with PIL's error."""
        for rgb in rgbs:
            self.check_input(rgb.shape[:2])
        size = self.spec.img_size
        resized = [sam_resize(rgb, size) for rgb in rgbs]
        batch = torch.cat([sam_normalize_pad(x, size) for x in resized])
        feats = self._forward(batch)
        out = []
        for i, (rgb, x) in enumerate(zip(rgbs, resized, strict=True)):
            beit = beit3_input(rgb, self.text.image_size) if self.text is not None else None
            out.append(ImageEmbedding(
                embedding=feats[i : i + 1],
                original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
                input_size=(int(x.shape[-2]), int(x.shape[-1])),
                model_id=self.model_id,
                beit_image=beit,
            ))
        return out

    def warmup(self) -> None:
        """One forward on a blank image, so the first request doesn't pay for lazy init."""
        self.embed_rgb([np.zeros((self.spec.patch_size * 2,) * 2 + (3,), dtype=np.uint8)])

    def time_once(self) -> float:
        """Ms of one full-size forward (the `auto` backend's measure)."""
        batch = torch.zeros(1, 3, self.spec.img_size, self.spec.img_size)
        t = time.perf_counter()
        with torch.no_grad():
            self._forward(batch)
        return (time.perf_counter() - t) * 1000.0
