"""The reference-mask engine: "segment things like this one". A reference image's SAM embedding and
an annotation of one object on it (a mask; or points or a box, turned into a mask by SAM) become
`ReferenceFeatures` once; every target image's SAM embedding then gets the expert's mask from
them (biprompt.models.vrp, VRP-SAM style, through its own fine-tuned copy of SAM's mask decoder, or SAM's own, frozen).

Loads the VRP checkpoint and SAM's `prompt_encoder.*` and `mask_decoder.*` (never the image
encoder; SAM's decoder turns a point or box annotation into the reference mask): a reference
replica holds about twice the point decoder's weights plus the VRP encoder's.
Torch only: the model is small next to the decoder it drives.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biprompt.cache import CacheFormatError, pack, unpack
from biprompt.engines.base import Placement, param_bytes
from biprompt.engines.point_decoder import PointDecoderEngine
from biprompt.errors import InvalidImageError, InvalidPromptError, ModelConfigError
from biprompt.factory import SamSource, load_sam_part, open_sam
from biprompt.models.decoding import decode_pairs, upscale_logits
from biprompt.models.sam import SamSpec
from biprompt.models.vrp import ReferenceFeatures, VrpConfig, VrpEncoder, load_vrp, probe_digest
from biprompt.profile import ModelProfile, ReferenceModelConfig
from biprompt.prompts import make_prompt
from biprompt.types import ImageEmbedding

log = logging.getLogger(__name__)

RANDOM_VRP = dict(hidden_dim=32, num_queries=4, num_heads=2, ffn_dim=64)  # the tiny profile's


def load_reference_model(cfg: ReferenceModelConfig, spec: SamSpec,
                         dtype: torch.dtype | None = None) -> tuple[VrpEncoder, str]:
    """The profile's reference model (a checkpoint directory, or small random weights) and its
    model id (the directory's name and its weights' digest: part of every cache key)."""
    if cfg.random:
        torch.manual_seed(cfg.seed)
        return (VrpEncoder(VrpConfig(embed_dim=spec.prompt_dim, **RANDOM_VRP)).eval(),
                reference_model_id(cfg, spec))
    if not cfg.checkpoint:
        raise ModelConfigError("reference_model needs a checkpoint, or random: true")
    return load_vrp(Path(cfg.checkpoint).expanduser(), dtype), reference_model_id(cfg, spec)


def reference_model_id(cfg: ReferenceModelConfig, spec: SamSpec) -> str:
    """The reference model's id without loading it (the Ingress names cache keys with it)."""
    if cfg.random:
        return f"vrp-{spec.name}:random-{cfg.seed}"
    directory = Path(str(cfg.checkpoint)).expanduser()
    digest = hashlib.sha256()
    for f in sorted(directory.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"):
            digest.update(f.read_bytes())
    return f"vrp-{spec.name}:{directory.name}:{digest.hexdigest()[:12]}"


def check_reference_pairing(vrp: VrpEncoder, spec: SamSpec, probe: torch.Tensor | None) -> None:
    c = vrp.config
    if c.embed_dim != spec.prompt_dim:
        raise ModelConfigError(f"the reference model reads {c.embed_dim}-channel SAM embeddings; "
                               f"the pipeline's SAM ({spec.name}) makes {spec.prompt_dim}: pair "
                               "it with the SAM it was trained on")
    if c.sam_probe and probe is not None and probe_digest(probe) != c.sam_probe:
        log.warning("the reference model was trained on another SAM (%s): its masks will be "
                    "computed on this SAM's embeddings and decoder", c.sam_model)


@dataclass
class Reference:
    """One encoded reference: its features, the annotation mask it was built from (original
    size, HxW bool) and a key naming (reference image, annotation)."""

    features: ReferenceFeatures
    mask: np.ndarray
    key: str | None = None


def annotation_key(image_id: str, kind: str, payload: bytes) -> str:
    """A cache key for (reference image, annotation): kind is mask | points | box."""
    return hashlib.sha256(image_id.encode() + b"|" + kind.encode() + b"|" + payload).hexdigest()[:32]


def features_to_bytes(f: ReferenceFeatures, model_id: str) -> bytes:
    """One reference's features as a cache value (biprompt.cache's format; float16)."""
    return pack("reference", {
        "queries": f.queries.detach().cpu().half().numpy(),
        "prototype": f.prototype.detach().cpu().half().numpy(),
        "fg": f.fg.detach().cpu().half().numpy(),
        "fg_valid": f.fg_valid.cpu().numpy().astype(np.uint8)}, model_id=model_id)


def features_from_bytes(blob: bytes, model_id: str | None = None) -> ReferenceFeatures:
    """Raises CacheFormatError (not such a value, or another reference model's)."""
    header, a = unpack(blob, "reference")
    if model_id is not None and header.get("model_id") != model_id:
        raise CacheFormatError(f"made by {header.get('model_id')}, want {model_id}")
    try:
        return ReferenceFeatures(torch.from_numpy(a["queries"]).float(),
                                 torch.from_numpy(a["prototype"]).float(),
                                 torch.from_numpy(a["fg"]).float(),
                                 torch.from_numpy(a["fg_valid"]).bool())
    except KeyError as exc:
        raise CacheFormatError(f"reference features without {exc}") from None


class ReferenceMaskEngine:
    role = "reference"
    backend = "torch"

    def __init__(self, vrp: VrpEncoder, prompt_encoder, mask_decoder, spec: SamSpec,
                 sam_model_id: str, *, model_id: str | None = None,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None):
        self.place = Placement(device, dtype)
        self.spec, self.sam_model_id = spec, sam_model_id
        self.vrp = vrp.to(self.place.device, self.place.dtype).eval()
        # SAM's decoder turns a point or box annotation into the reference mask, and draws the
        # target mask from the VRP prompt tokens
        self.decoder = PointDecoderEngine(prompt_encoder, mask_decoder, spec, sam_model_id,
                                          device=device, dtype=dtype, batching="batched")
        self.model_id = model_id or f"vrp:{sam_model_id}:{vrp.config.num_queries}q"

    @classmethod
    def from_profile(cls, profile: ModelProfile | dict | str | None = None,
                     sam: SamSource | None = None, **options) -> ReferenceMaskEngine:
        p = ModelProfile.load(profile)
        if p.reference is None:
            raise ModelConfigError(f"profile {p.name!r} has no reference_model")
        sam = sam or open_sam(p.sam.checkpoint, p.sam.variant, p.sam.seed)
        options = {"device": p.device, "dtype": p.dtype, **options}
        dtype = Placement(options["device"], options["dtype"]).dtype
        vrp, model_id = load_reference_model(p.reference, sam.spec, dtype)
        check_reference_pairing(vrp, sam.spec, sam.probe())
        return cls(vrp, load_sam_part(sam, "prompt_encoder"),
                   load_sam_part(sam, "mask_decoder", dtype), sam.spec, sam.model_id,
                   model_id=model_id, **options)

    def describe(self) -> dict:
        return {"backend": self.backend, "model_id": self.model_id}

    def weights(self) -> dict[str, int]:
        return {"vrp": param_bytes(self.vrp), **{f"reference.{k}": v
                                                 for k, v in self.decoder.weights().items()}}

    def _check(self, emb: ImageEmbedding) -> None:
        if emb.model_id != self.sam_model_id:
            raise InvalidImageError(f"embedding was made by {emb.model_id}; this reference model "
                                    f"reads {self.sam_model_id} embeddings")

    # --- the annotation -------------------------------------------------------------------

    def annotation_mask(self, emb: ImageEmbedding, *, mask=None, points=None, labels=None,
                        box=None) -> np.ndarray:
        """The reference object as an HxW bool mask at the reference image's size: `mask`
        as given, else SAM's mask for the points or the box (its top candidate)."""
        if (mask is None) == (points is None and box is None):
            raise InvalidPromptError("a reference needs one annotation: a mask, or points "
                                     "and/or a box")
        h, w = emb.original_size
        if mask is not None:
            m = np.asarray(mask)
            if m.shape != (h, w):
                raise InvalidPromptError(f"the reference mask is {m.shape[1]}x{m.shape[0]}; the "
                                         f"reference image is {w}x{h}")
            m = m.astype(bool)
            if not m.any():
                raise InvalidPromptError("the reference mask is empty: annotate the object")
            return m
        self._check(emb)
        prompt = make_prompt((h, w), points, labels, box=box, mode="point",
                             multimask=box is None)
        cand = self.decoder.decode_points(emb, [prompt])[0]
        out = cand.masks[int(np.argmax(cand.scores))]
        if not out.any():
            raise InvalidPromptError("SAM found no object at the reference annotation: give a "
                                     "mask, or a point on the object")
        return out

    def _grid(self, emb: ImageEmbedding, mask: np.ndarray) -> torch.Tensor:
        """1x1xgxg: the mask's area fraction per embedding cell, in the padded model frame."""
        ih, iw = emb.input_size
        s, g = self.spec.img_size, self.spec.embedding_size
        m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        m = F.interpolate(m, (ih, iw), mode="bilinear", align_corners=False, antialias=True)
        m = F.pad(m, (0, s - iw, 0, s - ih))
        return F.adaptive_avg_pool2d(m, g)

    # --- batched calls --------------------------------------------------------------------

    @torch.no_grad()
    def reference_features(self, embeddings: Sequence[ImageEmbedding],
                           masks: Sequence[np.ndarray]) -> list[ReferenceFeatures]:
        """The reference stage for each (reference embedding i, annotation mask i), batched."""
        if len(embeddings) != len(masks):
            raise ValueError(f"{len(embeddings)} embeddings for {len(masks)} masks")
        if not masks:
            return []
        for e in embeddings:
            self._check(e)
        dev, dtype = self.place.device, self.place.dtype
        emb = torch.cat([e.embedding for e in embeddings]).to(dev, dtype)
        grid = torch.cat([self._grid(e, m) for e, m in zip(embeddings, masks, strict=True)])
        pe = self.decoder.prompt_encoder.get_dense_pe().to(dev, dtype)
        f = self.vrp.reference(emb, grid.to(dev, dtype), pe)
        return [ReferenceFeatures(x.queries.float().cpu(), x.prototype.float().cpu(),
                                  x.fg.float().cpu(), x.fg_valid.cpu()) for x in f.split()]

    def encode_reference(self, emb: ImageEmbedding, key: str | None = None, **annotation) -> Reference:
        """One reference, from its embedding and its annotation (mask=, points=/labels=, box=)."""
        mask = self.annotation_mask(emb, **annotation)
        return Reference(self.reference_features([emb], [mask])[0], mask, key)

    @torch.no_grad()
    def reference_masks(self, targets: Sequence[ImageEmbedding],
                        references: Sequence[ReferenceFeatures]) -> list[np.ndarray]:
        """The expert's HxW bool mask for each (target embedding i, reference i), batched."""
        if len(targets) != len(references):
            raise ValueError(f"{len(targets)} targets for {len(references)} references")
        if not targets:
            return []
        for e in targets:
            self._check(e)
        dev, dtype = self.place.device, self.place.dtype
        image = torch.cat([e.embedding for e in targets]).to(dev, dtype)
        ref = ReferenceFeatures.cat(list(references))
        ref = ReferenceFeatures(ref.queries.to(dev, dtype), ref.prototype.to(dev, dtype),
                                ref.fg.to(dev, dtype), ref.fg_valid.to(dev))
        pe_mod = self.decoder.prompt_encoder
        pe = pe_mod.get_dense_pe().to(dev, dtype)
        tokens = self.vrp.target(image, ref, pe)
        b = tokens.shape[0]
        h, w = pe_mod.image_embedding_size
        dense = pe_mod.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, h, w).to(dtype)
        decoder = self.vrp.mask_decoder or self.decoder.mask_decoder
        low_res, _ = decode_pairs(decoder, image, pe, tokens, dense, multimask_output=False)
        low_res = low_res.float()
        return [(upscale_logits(low_res[i:i + 1], self.spec.img_size, e.input_size,
                                e.original_size)[0, 0] > 0).cpu().numpy()
                for i, e in enumerate(targets)]

    # --- probes ---------------------------------------------------------------------------

    def dummy(self) -> tuple[ImageEmbedding, np.ndarray]:
        g, side = self.spec.embedding_size, self.spec.img_size
        emb = ImageEmbedding(torch.zeros(1, self.spec.prompt_dim, g, g), (side, side),
                             (side, side), self.sam_model_id)
        mask = np.zeros((side, side), dtype=bool)
        mask[side // 4: side // 2, side // 4: side // 2] = True
        return emb, mask

    def warmup(self) -> None:
        emb, mask = self.dummy()
        self.reference_masks([emb], self.reference_features([emb], [mask]))

    def time_once(self) -> float:
        emb, mask = self.dummy()
        f = self.reference_features([emb], [mask])
        t = time.perf_counter()
        self.reference_masks([emb], f)
        return (time.perf_counter() - t) * 1000.0
