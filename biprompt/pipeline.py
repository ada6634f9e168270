"""BiPromptPipeline: one SAM embedding per image feeds both SAM's point decoder and EVF-SAM's text
decoder; the candidate that agrees best with the text mask wins.

    pipe = BiPromptPipeline.from_pretrained("sam_vit_h_4b8939.pth", "path/to/evf-sam")
    emb = pipe.embed(image)                      # one encoder pass
    res = pipe.segment(emb, [[x, y]], text="the dog on the left")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biprompt.errors import InvalidImageError, InvalidPromptError, ModelConfigError
from biprompt.factory import (
    LoadedSam,
    LoadedText,
    load_sam,
    load_text_model,
    random_text_model,
    read_profile,
)
from biprompt.images import DEFAULT_MAX_PIXELS, to_rgb_array
from biprompt.models.decoding import upscale_logits
from biprompt.models.fast_attention import set_fast_attention
from biprompt.preprocess import (
    beit3_input,
    sam_normalize_pad,
    sam_resize,
    transform_boxes,
    transform_coords,
)
from biprompt.prompts import Prompt, make_prompt
from biprompt.selection import DEFAULT_AGREEMENT_THRESHOLD, select
from biprompt.types import ImageEmbedding, PointCandidates, SegmentResult

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelConfigError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return _DTYPES[dtype]


class _Released(torch.nn.Module):
    """Stands in for a released image encoder: keeps `img_size`, refuses to run."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, *_):
        raise RuntimeError("this pipeline's image encoder was released")


class BiPromptPipeline:
    def __init__(
        self,
        sam: LoadedSam,
        text: LoadedText | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | None = None,
        fast_encoder: bool = True,
    ):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.spec = sam.spec
        # NOTE: prompt encoders stay float32 (tiny, and SAM's builds float32 padding points
        # internally); their outputs are cast to the model dtype.
        self.sam = sam.model.to(self.device, self.dtype).eval()
        # The encoder's fast attention path (biprompt.models.fast_attention): the same weights,
        # embeddings within float rounding of segment-anything's forward, 2-3x faster on CPU.
        # fast_encoder=False (profile: sam.fast_encoder: false) restores the reference forward.
        # NOTE: like .to() above, this switches the caller's model in place.
        set_fast_attention(self.sam.image_encoder, fast_encoder)
        self.fast_encoder = fast_encoder
        self.sam.prompt_encoder.float()
        self.sam_model_id = sam.model_id
        self.text = text
        if text is not None:
            self._check_text_model(sam, text)
            text.model.to(self.device, self.dtype).eval()
            text.model.visual_model.prompt_encoder.float()
        self.agreement_threshold = agreement_threshold
        self.max_pixels = max_pixels
        self.name = name or self.sam_model_id
        self.roles: tuple[str, ...] = self.ROLES

    @staticmethod
    def _check_text_model(sam: LoadedSam, text: LoadedText) -> None:
        ts = text.config.sam_spec
        if (ts.encoder_dim, ts.encoder_depth, ts.img_size, ts.patch_size, ts.prompt_dim) != (
            sam.spec.encoder_dim, sam.spec.encoder_depth, sam.spec.img_size, sam.spec.patch_size,
            sam.spec.prompt_dim,
        ):
            raise ModelConfigError(
                f"the text model was trained on {ts.name} SAM embeddings (sam_scale "
                f"{text.config.sam_scale!r}) but the pipeline's SAM is {sam.spec.name}: pair "
                "SAM and EVF-SAM checkpoints of the same scale"
            )
        if text.encoder_probe is not None:
            ours = sam.model.image_encoder.patch_embed.proj.weight.detach().float().cpu()
            if not torch.allclose(ours, text.encoder_probe, rtol=1e-2, atol=1e-3):
                log.warning("EVF-SAM's image encoder weights differ from the SAM checkpoint's: "
                            "its text masks will be computed on another encoder's embedding")

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        sam_checkpoint: str | Path | None,
        evf_checkpoint: str | Path | None = None,
        *,
        sam_variant: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        **options,
    ) -> BiPromptPipeline:
        """SAM from a `.pth` (path / official name / URL) or an EVF-SAM directory's visual_model;
        the text model from an EVF-SAM directory or hub id. `evf_checkpoint=None`: point only."""
        limits = {k: options.pop(k) for k in ("max_tokens", "max_chars") if k in options}
        sam = load_sam(sam_checkpoint, sam_variant)
        text = load_text_model(evf_checkpoint, **limits) if evf_checkpoint is not None else None
        return cls(sam, text, device=device, dtype=dtype, **options)

    @classmethod
    def from_config(cls, path: str | Path, **overrides) -> BiPromptPipeline:
        """From a model profile YAML (configs/models/*.yaml)."""
        return cls.from_profile(read_profile(path), **overrides)

    @classmethod
    def from_profile(cls, profile: dict, **overrides) -> BiPromptPipeline:
        sam_cfg = profile.get("sam") or {}
        text_cfg = profile.get("text_model")
        limits = profile.get("text_limits") or {}
        sam = load_sam(sam_cfg.get("checkpoint"), sam_cfg.get("variant"), sam_cfg.get("seed", 0))
        text = None
        if text_cfg:
            if text_cfg.get("checkpoint"):
                text = load_text_model(text_cfg["checkpoint"], **limits)
            elif text_cfg.get("random"):
                text = random_text_model(sam.spec, seed=text_cfg.get("seed", 0), **limits)
            else:
                raise ModelConfigError("text_model needs a checkpoint, or random: true")
        sel = profile.get("selection") or {}
        options = {
            "device": profile.get("device", "cpu"),
            "dtype": profile.get("dtype"),
            "agreement_threshold": sel.get("agreement_threshold", DEFAULT_AGREEMENT_THRESHOLD),
            "name": profile.get("name"),
            "fast_encoder": bool(sam_cfg.get("fast_encoder", True)),
            **overrides,
        }
        return cls(sam, text, **options)

    ROLES = ("encoder", "points", "text")

    def release(self, keep: Sequence[str]) -> BiPromptPipeline:
        """Free the weights a single-role process never uses (a serving replica runs one role):
        'encoder' = SAM's image encoder, 'points' = SAM's prompt encoder and mask decoder,
        'text' = BEiT-3 and EVF's decoder. The text config stays: embeddings need its image size."""
        unknown = set(keep) - set(self.ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; use {self.ROLES}")
        if "encoder" not in keep:  # postprocess_masks still reads the encoder's img_size
            self.sam.image_encoder = _Released(self.spec.img_size)
        if "points" not in keep:
            self.sam.prompt_encoder = self.sam.mask_decoder = None
        if "text" not in keep and self.text is not None:
            self.text.model = None
        self.roles = tuple(keep)
        return self

    def _require(self, role: str) -> None:
        if role not in self.roles:
            raise RuntimeError(f"this pipeline was released to {self.roles}; it can't run {role!r}")

    @property
    def model_ids(self) -> dict[str, str | None]:
        return {"sam": self.sam_model_id, "text": self.text.model_id if self.text else None}

    # --- encoder ----------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, image) -> ImageEmbedding:
        """One SAM encoder pass. `image`: path, bytes, PIL image or HxWx3 uint8 array."""
        return self.embed_batch([image])[0]

    @torch.no_grad()
    def embed_batch(self, images: Sequence) -> list[ImageEmbedding]:
        """Encode several images in one encoder call (they are padded to the same square)."""
        if not images:
            return []
        self._require("encoder")
        rgbs = [to_rgb_array(im, self.max_pixels)[0] for im in images]
        size = self.spec.img_size
        resized = [sam_resize(rgb, size) for rgb in rgbs]
        batch = torch.cat([sam_normalize_pad(x, size) for x in resized])
        feats = self.sam.image_encoder(batch.to(self.device, self.dtype))
        out = []
        for i, (rgb, x) in enumerate(zip(rgbs, resized, strict=False)):
            beit = None
            if self.text is not None:
                beit = beit3_input(rgb, self.text.config.beit3_spec.img_size)
            out.append(ImageEmbedding(
                embedding=feats[i : i + 1],
                original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
                input_size=(int(x.shape[-2]), int(x.shape[-1])),
                model_id=self.sam_model_id,
                beit_image=beit,
            ))
        return out

    def _embedding(self, image_or_embedding) -> ImageEmbedding:
        if isinstance(image_or_embedding, ImageEmbedding):
            emb = image_or_embedding
            if emb.model_id != self.sam_model_id:
                raise InvalidImageError(
                    f"embedding was made by {emb.model_id}, this pipeline runs {self.sam_model_id}"
                )
            return emb
        return self.embed(image_or_embedding)

    # --- point path -------------------------------------------------------------------------

    @torch.no_grad()
    def decode_points(self, emb: ImageEmbedding, prompts: Sequence[Prompt]) -> list[PointCandidates]:
        """SAM's three candidates for each prompt, batched per (number of points, has box)."""
        self._require("points")
        results: list[PointCandidates | None] = [None] * len(prompts)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.group_key, []).append(i)
        image = emb.embedding.to(self.device, self.dtype)
        size = self.spec.img_size
        for (n, has_box), idx in groups.items():
            points = boxes = None
            if n:
                coords = np.stack([transform_coords(prompts[i].points, emb.original_size, size)
                                   for i in idx])
                labels = np.stack([prompts[i].labels for i in idx])
                points = (torch.as_tensor(coords, dtype=torch.float, device=self.device),
                          torch.as_tensor(labels, dtype=torch.int, device=self.device))
            if has_box:
                b = np.concatenate([transform_boxes(prompts[i].box[None], emb.original_size, size)
                                    for i in idx])
                boxes = torch.as_tensor(b, dtype=torch.float, device=self.device)
            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, scores = self.sam.mask_decoder(
                image_embeddings=image,
                image_pe=self.sam.prompt_encoder.get_dense_pe().to(self.dtype),
                sparse_prompt_embeddings=sparse.to(self.dtype),
                dense_prompt_embeddings=dense.to(self.dtype),
                multimask_output=True,
            )
            masks = self.sam.postprocess_masks(low_res.float(), emb.input_size, emb.original_size)
            masks = (masks > self.sam.mask_threshold).cpu().numpy()
            scores_np = scores.float().cpu().numpy()
            low_np = low_res.float().cpu().numpy()
            for j, i in enumerate(idx):
                results[i] = PointCandidates(masks[j], scores_np[j], low_np[j])
        return results  # type: ignore[return-value]

    # --- text path --------------------------------------------------------------------------

    @torch.no_grad()
    def text_masks(self, embeddings: Sequence[ImageEmbedding], texts: Sequence[str]) -> list[np.ndarray]:
        """EVF-SAM's mask for each (embedding i, text i) pair, in one batched call. HxW bool each."""
        if len(embeddings) != len(texts):
            raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} texts")
        if not texts:
            return []
        if self.text is None:
            raise InvalidPromptError("this pipeline has no text model: it serves point prompts only")
        self._require("text")
        for e in embeddings:
            if e.beit_image is None:
                raise InvalidImageError("embedding has no text-model view: re-embed the image "
                                        "with a pipeline that has a text model")
        ids, padding = self.text.tokenizer(texts)
        beit = torch.cat([e.beit_image for e in embeddings]).to(self.device, self.dtype)
        image = torch.cat([e.embedding for e in embeddings]).to(self.device, self.dtype)
        prompt = self.text.model.text_prompt(beit, ids.to(self.device), padding.to(self.device))
        low_res = self.text.model.decode(image, prompt).float()
        return [
            (upscale_logits(low_res[i : i + 1], self.spec.img_size, e.input_size,
                            e.original_size)[0, 0] > 0).cpu().numpy()
            for i, e in enumerate(embeddings)
        ]

    # --- both -------------------------------------------------------------------------------

    def segment(self, image_or_embedding, points=None, labels=None, *, text: str | None = None,
                mode: str = "biprompt", box=None) -> SegmentResult:
        """Segment one object. points: [[x, y], ...] in original-image pixels; labels: 1/0 each
        (default all 1); text: a referring expression; mode: biprompt | point | text."""
        emb = self._embedding(image_or_embedding)
        prompt = make_prompt(emb.original_size, points, labels, box=box, text=text, mode=mode)
        return self.segment_batch(emb, [prompt])[0]

    def segment_batch(self, image_or_embedding, prompts: Sequence[Prompt | dict]) -> list[SegmentResult]:
        """Many prompts on one image (e.g. one point per instance): one encoder pass, one batched
        decoder call per prompt shape, one batched text-model call over the distinct texts."""
        emb = self._embedding(image_or_embedding)
        ps = [p if isinstance(p, Prompt) else make_prompt(emb.original_size, **p) for p in prompts]
        for p in ps:
            if p.text is not None and p.mode != "point":
                if self.text is None:
                    raise InvalidPromptError(
                        "this pipeline has no text model: use mode 'point' or leave out text")
                self.text.tokenizer.validate(p.text)
        with_points = [i for i, p in enumerate(ps) if len(p.points) or p.box is not None]
        cands = dict(zip(with_points, self.decode_points(emb, [ps[i] for i in with_points]), strict=False))
        # mode 'point' ignores the text: it doesn't pay for the text model
        wants_text = [p.text is not None and p.mode != "point" for p in ps]
        texts = sorted({p.text.strip() for p, w in zip(ps, wants_text, strict=True) if w})
        masks = dict(zip(texts, self.text_masks([emb] * len(texts), texts), strict=True))
        return [self._result(p, cands.get(i), masks[p.text.strip()] if w else None)
                for i, (p, w) in enumerate(zip(ps, wants_text, strict=True))]

    def _result(self, p: Prompt, c: PointCandidates | None, text_mask: np.ndarray | None) -> SegmentResult:
        if c is None:  # text mode without points
            return SegmentResult(text_mask, None, None, text_mask, None, None, "text", None, p.mode)
        sel = select(c.masks, c.scores, text_mask, p.mode, self.agreement_threshold)
        mask = text_mask if p.mode == "text" else c.masks[sel.selected]
        return SegmentResult(mask, c.masks, c.scores, text_mask, sel.text_ious, sel.selected,
                             sel.strategy, sel.agreement, p.mode)
