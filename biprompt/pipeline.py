"""BiPromptPipeline: one SAM embedding per image feeds both SAM's point decoder and EVF-SAM's text
decoder; the candidate that agrees best with the text mask wins.

    pipe = BiPromptPipeline.from_pretrained("sam_vit_h_4b8939.pth", "path/to/evf-sam")
    emb = pipe.embed(image)                      # one encoder pass
    res = pipe.segment(emb, [[x, y]], text="the dog on the left")

A small composer of the three role engines (biprompt.engines): the image encoder, the point
decoder and the text-mask model, joined by biprompt.join. A serving replica builds one engine; this
class builds all three, in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from biprompt.arbiter import Arbiter
from biprompt.config import DEFAULT_AGREEMENT_THRESHOLD, DEFAULT_MAX_PIXELS
from biprompt.engines import (
    ImageEncoderEngine,
    PointDecoderEngine,
    TextMaskEngine,
    encoder_for,
    point_decoder_for,
    text_mask_for,
)
from biprompt.engines.base import resolve_dtype
from biprompt.engines.reference_mask import Reference, ReferenceMaskEngine
from biprompt.engines.text_mask import check_pairing
from biprompt.errors import InvalidImageError, InvalidPromptError
from biprompt.factory import (
    LoadedSam,
    LoadedText,
    TextInfo,
    open_sam,
)
from biprompt.join import join
from biprompt.profile import ModelProfile, SamConfig, TextModelConfig
from biprompt.prompts import Prompt, make_prompt
from biprompt.selection import DEFAULT_RULE, RULES
from biprompt.types import ImageEmbedding, PointCandidates, SegmentResult

__all__ = ["BiPromptPipeline", "resolve_dtype"]

log = logging.getLogger(__name__)


class BiPromptPipeline:
    def __init__(
        self,
        encoder: ImageEncoderEngine,
        decoder: PointDecoderEngine,
        text: TextMaskEngine | None = None,
        *,
        reference: ReferenceMaskEngine | None = None,
        agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
        rule: str = DEFAULT_RULE,
        weights: dict[str, float] | None = None,
        arbiter: Arbiter | None = None,
        name: str | None = None,
    ):
        if decoder.model_id != encoder.model_id or any(
                e is not None and e.sam_model_id != encoder.model_id for e in (text, reference)):
            raise ValueError("the engines were built from different SAM checkpoints")
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; use one of {RULES}")
        if rule == "arbiter" and arbiter is None:
            raise ValueError("the arbiter rule needs an arbiter (biprompt.arbiter.Arbiter)")
        self.encoder, self.decoder, self.text = encoder, decoder, text
        self.reference = reference
        self.agreement_threshold, self.rule = agreement_threshold, rule
        self.expert_weights = dict(weights or {})
        self.arbiter = arbiter
        self.name = name or encoder.model_id
        if arbiter is not None and arbiter.mismatches(self.model_ids):
            log.warning("the selection arbiter %s was fit for other %s models than these: "
                        "refit it (python -m biprompt.train.arbiter)", arbiter.path or "",
                        " and ".join(arbiter.mismatches(self.model_ids)))

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_profile(cls, profile: ModelProfile | dict | str | Path | None, *,
                     device: str | None = None, dtype: str | torch.dtype | None = None,
                     agreement_threshold: float | None = None, name: str | None = None,
                     fast_encoder: bool | None = None, backends: dict[str, str] | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, **runtime) -> BiPromptPipeline:
        """The three engines from one model profile (a ModelProfile, a dict or a YAML path),
        each on the profile's backend for its role; keyword arguments override the profile's
        values (`backends`: {role: backend} for the roles named; `runtime`: threads, cache_dir
        for the CPU runtimes)."""
        p = ModelProfile.load(profile).with_options(
            device=device, dtype=dtype, agreement_threshold=agreement_threshold, name=name,
            fast_encoder=fast_encoder, backends=backends)
        sam = open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
        place = {"device": p.device, "dtype": p.dtype}
        text = (text_mask_for(p, sam, p.backends.text, **place, **runtime)
                if p.text is not None else None)
        info = TextInfo(text.model_id, text.config.beit3_spec.img_size) if text else None
        encoder = encoder_for(sam, info, p.backends.encoder, fast_encoder=p.sam.fast_encoder,
                              max_pixels=max_pixels, **place, **runtime)
        decoder = point_decoder_for(sam, p.backends.points, **place, **runtime)
        reference = (ReferenceMaskEngine.from_profile(p, sam, **place)
                     if p.reference is not None else None)
        return cls(encoder, decoder, text, reference=reference,
                   agreement_threshold=p.agreement_threshold, rule=p.selection_rule,
                   weights=p.selection_weights, arbiter=p.selection_arbiter, name=p.name)

    @classmethod
    def from_config(cls, path: str | Path, **overrides) -> BiPromptPipeline:
        """From a model profile YAML (configs/models/*.yaml)."""
        return cls.from_profile(Path(path), **overrides)

    @classmethod
    def from_pretrained(
        cls,
        sam_checkpoint: str | Path | None,
        evf_checkpoint: str | Path | None = None,
        *,
        sam_variant: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_tokens: int | None = None,
        max_chars: int | None = None,
        **options,
    ) -> BiPromptPipeline:
        """SAM from a `.pth` (path / official name / URL) or an EVF-SAM directory's visual_model;
        the text model from an EVF-SAM directory or hub id. `evf_checkpoint=None`: point only."""
        text = None
        if evf_checkpoint is not None:
            limits = {k: v for k, v in (("max_tokens", max_tokens), ("max_chars", max_chars))
                      if v is not None}
            text = TextModelConfig(checkpoint=str(evf_checkpoint), **limits)
        sam = SamConfig(checkpoint=None if sam_checkpoint is None else str(sam_checkpoint),
                        variant=sam_variant)
        p = ModelProfile(name=options.pop("name", None), sam=sam, text=text, device=device,
                         dtype=dtype)
        return cls.from_profile(p, **options)

    @classmethod
    def from_models(cls, sam: LoadedSam, text: LoadedText | None = None, *,
                    device: str = "cpu", dtype: str | torch.dtype | None = None,
                    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
                    name: str | None = None, fast_encoder: bool = True,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> BiPromptPipeline:
        """From models already in memory (tests, training). NOTE: the engines take the modules
        themselves (moved to the device and dtype in place), not copies."""
        m = sam.model
        if text is not None:
            check_pairing(sam.spec, m.image_encoder.patch_embed.proj.weight.detach().float().cpu(),
                          text)
        text_engine = (TextMaskEngine(text, sam.spec, sam.model_id, device=device, dtype=dtype)
                       if text is not None else None)
        info = (TextInfo(text.model_id, text.config.beit3_spec.img_size)
                if text is not None else None)
        encoder = ImageEncoderEngine(m.image_encoder, sam.spec, sam.model_id, text=info,
                                     device=device, dtype=dtype, fast_encoder=fast_encoder,
                                     max_pixels=max_pixels)
        decoder = PointDecoderEngine(m.prompt_encoder, m.mask_decoder, sam.spec, sam.model_id,
                                     device=device, dtype=dtype)
        return cls(encoder, decoder, text_engine, agreement_threshold=agreement_threshold,
                   name=name)

    # --- what it holds ----------------------------------------------------------------------

    @property
    def spec(self):
        return self.encoder.spec

    @property
    def sam_model_id(self) -> str:
        return self.encoder.model_id

    @property
    def model_ids(self) -> dict[str, str | None]:
        return {"sam": self.encoder.model_id, "text": self.text.model_id if self.text else None,
                "reference": self.reference.model_id if self.reference else None}

    @property
    def device(self) -> torch.device:
        return self.encoder.place.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.place.dtype

    @property
    def fast_encoder(self) -> bool:
        return self.encoder.fast_encoder

    @property
    def max_pixels(self) -> int:
        return self.encoder.max_pixels

    def weights(self) -> dict[str, int]:
        """Bytes of parameters held, by model part."""
        out = {**self.encoder.weights(), **self.decoder.weights()}
        if self.text is not None:
            out.update(self.text.weights())
        if self.reference is not None:
            out.update(self.reference.weights())
        return out

    # --- encoder ----------------------------------------------------------------------------

    def embed(self, image) -> ImageEmbedding:
        """One SAM encoder pass. `image`: path, bytes, PIL image or HxWx3 uint8 array."""
        return self.encoder.embed_batch([image])[0]

    def embed_batch(self, images: Sequence) -> list[ImageEmbedding]:
        """Encode several images in one encoder call (they are padded to the same square)."""
        return self.encoder.embed_batch(images)

    def _embedding(self, image_or_embedding) -> ImageEmbedding:
        if isinstance(image_or_embedding, ImageEmbedding):
            emb = image_or_embedding
            if emb.model_id != self.sam_model_id:
                raise InvalidImageError(
                    f"embedding was made by {emb.model_id}, this pipeline runs {self.sam_model_id}"
                )
            return emb
        return self.embed(image_or_embedding)

    # --- the two paths ----------------------------------------------------------------------

    def decode_points(self, emb: ImageEmbedding, prompts: Sequence[Prompt]) -> list[PointCandidates]:
        """SAM's three candidates for each prompt, batched per (number of points, has box)."""
        return self.decoder.decode_points(emb, prompts)

    def text_masks(self, embeddings: Sequence[ImageEmbedding], texts: Sequence[str]) -> list[np.ndarray]:
        """EVF-SAM's mask for each (embedding i, text i) pair, in one batched call. HxW bool each."""
        if len(embeddings) != len(texts):
            raise ValueError(f"{len(embeddings)} embeddings for {len(texts)} texts")
        if not texts:
            return []
        return self._text().text_masks(embeddings, texts)

    def _text(self) -> TextMaskEngine:
        if self.text is None:
            raise InvalidPromptError("this pipeline has no text model: it serves point prompts only")
        return self.text

    def _reference(self) -> ReferenceMaskEngine:
        if self.reference is None:
            raise InvalidPromptError("this pipeline has no reference model: add a "
                                     "reference_model to its profile")
        return self.reference

    def encode_reference(self, image_or_embedding, *, mask=None, points=None, labels=None,
                         box=None) -> Reference:
        """A reference ("segment things like this one"): an image (or its embedding) and one
        annotated object on it, as an HxW bool `mask`, or `points`/`labels` and/or a `box` that
        SAM turns into the mask. Encode once, pass to every later `segment(reference=...)`."""
        emb = self._embedding(image_or_embedding)
        return self._reference().encode_reference(emb, mask=mask, points=points, labels=labels,
                                                  box=box)

    def reference_masks(self, embeddings: Sequence[ImageEmbedding],
                        references: Sequence[Reference]) -> list[np.ndarray]:
        """The reference expert's mask for each (target embedding i, reference i), batched."""
        return self._reference().reference_masks(embeddings, [r.features for r in references])

    # --- all of them --------------------------------------------------------------------------

    def segment(self, image_or_embedding, points=None, labels=None, *, text: str | None = None,
                mode: str = "biprompt", box=None, mask_input=None,
                multimask: bool | None = None, reference: Reference | None = None) -> SegmentResult:
        """Segment one object. points: [[x, y], ...] in original-image pixels; labels: 1/0 each
        (default all 1); text: a referring expression; reference: from `encode_reference`;
        mode: biprompt | point | text | reference. Every expert given votes on SAM's candidates.

        Refinement: pass the previous answer's `low_res_logits` as `mask_input` with every
        click so far (positive 1, negative 0); no encoder pass, the embedding is reused.
        multimask: None lets biprompt.prompts.refinement_multimask decide."""
        emb = self._embedding(image_or_embedding)
        prompt = make_prompt(emb.original_size, points, labels, box=box, text=text, mode=mode,
                             mask_input=mask_input, multimask=multimask)
        return self.segment_batch(emb, [prompt], reference=reference)[0]

    def segment_batch(self, image_or_embedding, prompts: Sequence[Prompt | dict], *,
                      reference: Reference | None = None) -> list[SegmentResult]:
        """Many prompts on one image (e.g. one point per instance): one encoder pass, one batched
        decoder call per prompt shape, one batched text-model call over the distinct texts, one
        reference-expert call (`reference` votes on every prompt but point-mode ones)."""
        emb = self._embedding(image_or_embedding)
        ps = [p if isinstance(p, Prompt) else make_prompt(emb.original_size, **p) for p in prompts]
        for p in ps:
            if p.mode == "reference" and reference is None:
                raise InvalidPromptError("mode 'reference' needs a reference")
        ref_mask = None
        if reference is not None and any(p.mode != "point" for p in ps):
            ref_mask = self.reference_masks([emb], [reference])[0]
        # mode 'point' ignores the text: it doesn't pay for the text model
        wants_text = [p.text is not None and p.mode != "point" for p in ps]
        for p, w in zip(ps, wants_text, strict=True):
            if w:
                self._text().validate(p.text)
        with_points = [i for i, p in enumerate(ps) if len(p.points) or p.box is not None]
        cands = dict(zip(with_points, self.decode_points(emb, [ps[i] for i in with_points]),
                         strict=True))
        texts = sorted({p.text.strip() for p, w in zip(ps, wants_text, strict=True) if w})
        masks = dict(zip(texts, self.text_masks([emb] * len(texts), texts), strict=True))
        return [join(cands.get(i), {"text": masks[p.text.strip()] if w else None,
                                    "reference": ref_mask if p.mode != "point" else None},
                     p.mode, self.agreement_threshold, self.rule, self.expert_weights,
                     self.arbiter)
                for i, (p, w) in enumerate(zip(ps, wants_text, strict=True))]
