"""The point-decoder engine: SAM's prompt encoder and mask decoder -> three candidates a prompt.

Loads only `prompt_encoder.*` and `mask_decoder.*` from the SAM checkpoint (about 4 M parameters
for every official variant): a decoder replica never holds the image encoder.

`PointDecoderBase` holds what every backend shares (grouping prompts, their coordinates in the
model's frame, the batching choice, the upscaling to the original size); `PointDecoderEngine` runs
SAM's own torch modules, `biprompt.engines.onnx_decoder` the same graph in ONNX Runtime.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder

from biprompt.engines.base import Placement, param_bytes
from biprompt.errors import InvalidImageError, InvalidPromptError, ModelConfigError
from biprompt.factory import load_sam_part, open_sam
from biprompt.models.decoding import upscale_logits
from biprompt.models.sam import SamSpec
from biprompt.preprocess import transform_boxes, transform_coords
from biprompt.profile import ModelProfile
from biprompt.prompts import Prompt
from biprompt.types import ImageEmbedding, PointCandidates

MASK_THRESHOLD = 0.0  # segment-anything's Sam.mask_threshold
BATCHING_MODES = ("auto", "batched", "looped")
BATCH_PROBE_PROMPTS = 16  # the serving deployment's max_batch_size
# alternating rounds of the batching measure, the fastest of each kept: one round let a single
# noisy call decide (vit_b, make bench at a98aef6: batched chosen at 532 ms where 16 single calls
# took 464)
BATCHING_ROUNDS = 3


@dataclass
class GroupInputs:
    """The prompts of one Prompt.group_key, in the model's input frame (B prompts).

    coords: BxNx2 float32 (None: no points); labels: BxN int64; boxes: Bx4 XYXY float32 (None: no
    box); mask_input: Bx1xLxL float32 low-res logits (None: SAM's no-mask embedding)."""

    coords: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray | None
    mask_input: np.ndarray | None
    multimask: bool

    def __len__(self) -> int:
        for x in (self.coords, self.boxes, self.mask_input):
            if x is not None:
                return len(x)
        return 0


@dataclass
class BatchingChoice:
    """One batched decoder call for a group of prompts, or a loop of single calls: whichever
    `measure_batching` found faster on this engine (backend and device). Until measured: batched."""

    batched: bool = True
    measured: bool = False
    prompts: int = 0  # group size measured
    batched_ms: float | None = None
    looped_ms: float | None = None

    def as_dict(self) -> dict:
        return {"mode": "batched" if self.batched else "looped", "measured": self.measured,
                "prompts": self.prompts, "batched_ms": self.batched_ms,
                "looped_ms": self.looped_ms}


class PointDecoderBase:
    """Prompts -> PointCandidates for every backend; a subclass supplies `_image` (the embedding
    as its runtime takes it) and `_run` (one decoder call on a GroupInputs)."""

    role = "points"
    backend = "?"

    def __init__(self, spec: SamSpec, model_id: str, batching: str = "auto"):
        if batching not in BATCHING_MODES:
            raise ModelConfigError(f"unknown decoder batching {batching!r}; use {BATCHING_MODES}")
        self.spec, self.model_id = spec, model_id
        self.batching_mode = batching
        self.batching = BatchingChoice(batched=batching != "looped")
        self.backend_choice: dict | None = None  # set by `auto` backend selection

    def check(self, emb: ImageEmbedding) -> None:
        if emb.model_id != self.model_id:
            raise InvalidImageError(
                f"embedding was made by {emb.model_id}, this decoder runs {self.model_id}")

    def describe(self) -> dict:
        """The backend, how it was chosen (`auto`: both timings) and the batching choice."""
        return {"backend": self.backend, "backend_choice": self.backend_choice,
                "batching": self.batching.as_dict()}

    @torch.no_grad()
    def decode_points(self, emb: ImageEmbedding, prompts: Sequence[Prompt]) -> list[PointCandidates]:
        """SAM's candidates for each prompt on one image (three, or one for a single-mask prompt):
        per Prompt.group_key, one batched decoder call or a loop of single calls (`batching`)."""
        self.check(emb)
        results: list[PointCandidates | None] = [None] * len(prompts)
        groups: dict[tuple[int, bool, bool, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p.group_key, []).append(i)
        image = self._image(emb)
        for idx in groups.values():
            chunks = [idx] if self.batching.batched else [[i] for i in idx]
            for chunk in chunks:
                group = [prompts[i] for i in chunk]
                low_res, scores = self._run(image, self._inputs(emb, group))
                masks = upscale_logits(low_res.float(), self.spec.img_size, emb.input_size,
                                       emb.original_size)
                masks = (masks > MASK_THRESHOLD).cpu().numpy()
                scores_np = scores.float().cpu().numpy()
                low_np = low_res.float().cpu().numpy()
                for j, i in enumerate(chunk):
                    results[i] = PointCandidates(masks[j], scores_np[j], low_np[j])
        return results  # type: ignore[return-value]

    def _inputs(self, emb: ImageEmbedding, group: Sequence[Prompt]) -> GroupInputs:
        size, first = self.spec.img_size, group[0]
        coords = labels = boxes = masks = None
        if len(first.points):
            coords = np.stack([transform_coords(p.points, emb.original_size, size)
                               for p in group]).astype(np.float32)
            labels = np.stack([p.labels for p in group]).astype(np.int64)
        if first.box is not None:
            boxes = np.concatenate([transform_boxes(p.box[None], emb.original_size, size)
                                    for p in group]).astype(np.float32)
        if first.mask_input is not None:
            masks = np.stack([self._mask_input(p) for p in group]).astype(np.float32)[:, None]
        return GroupInputs(coords, labels, boxes, masks, first.multimask)

    def _image(self, emb: ImageEmbedding):
        raise NotImplementedError

    def _run(self, image, inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits BxKxLxL and predicted IoUs BxK (K = 3 multimask, else 1)."""
        raise NotImplementedError

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

    def dummy(self, n: int = 1) -> tuple[ImageEmbedding, list[Prompt]]:
        """A zero embedding of a full-size square image and `n` one-point multimask prompts."""
        g, side = self.spec.embedding_size, self.spec.img_size
        emb = ImageEmbedding(torch.zeros(1, self.spec.prompt_dim, g, g), (side, side),
                             (side, side), self.model_id)
        xs = np.linspace(side * 0.1, side * 0.9, n)
        return emb, [Prompt(np.array([[x, side - x]]), np.array([1])) for x in xs]

    def warmup(self) -> None:
        """One decode; then, in `auto` batching, the batched-or-looped measurement."""
        self.decode_points(*self.dummy())
        if self.batching_mode == "auto" and not self.batching.measured:
            self.measure_batching()

    def measure_batching(self, n: int = BATCH_PROBE_PROMPTS,
                         rounds: int = BATCHING_ROUNDS) -> BatchingChoice:
        """Time `n` one-point prompts on one image as one batched call and as `n` single calls
        (after one untimed batched call; `rounds` alternating rounds, the fastest of each), and
        keep the faster for groups of more than one prompt."""
        emb, prompts = self.dummy(n)
        times: dict[bool, list[float]] = {True: [], False: []}
        self.batching.batched = True
        self.decode_points(emb, prompts)
        for _ in range(rounds):
            for batched in (True, False):
                self.batching.batched = batched
                t = time.perf_counter()
                self.decode_points(emb, prompts)
                times[batched].append((time.perf_counter() - t) * 1000.0)
        b, lo = min(times[True]), min(times[False])
        self.batching = BatchingChoice(batched=b <= lo, measured=True, prompts=n,
                                       batched_ms=round(b, 2), looped_ms=round(lo, 2))
        return self.batching

    def time_once(self) -> float:
        """Ms of one one-point, three-mask decode (the `auto` backend's measure)."""
        return self.time_decode(rounds=1)

    def time_decode(self, rounds: int = 3) -> float:
        """Median ms of a one-point, three-mask decode (the `auto` backend's measure)."""
        emb, prompts = self.dummy()
        out = []
        for _ in range(rounds):
            t = time.perf_counter()
            self.decode_points(emb, prompts)
            out.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(out)


class PointDecoderEngine(PointDecoderBase):
    """SAM's prompt encoder and mask decoder as torch modules (any device and dtype)."""

    backend = "torch"

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, spec: SamSpec,
                 model_id: str, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, batching: str = "auto"):
        super().__init__(spec, model_id, batching)
        self.place = Placement(device, dtype)
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

    def _image(self, emb: ImageEmbedding) -> torch.Tensor:
        return emb.embedding.to(self.place.device, self.place.dtype)

    def _run(self, image: torch.Tensor, inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dtype = self.place.device, self.place.dtype

        def tensor(x: np.ndarray | None, kind=torch.float):
            return None if x is None else torch.as_tensor(x, dtype=kind, device=dev)

        points = None
        if inputs.coords is not None:
            points = (tensor(inputs.coords), tensor(inputs.labels, torch.int))
        sparse, dense = self.prompt_encoder(points=points, boxes=tensor(inputs.boxes),
                                            masks=tensor(inputs.mask_input))
        return self.mask_decoder(
            image_embeddings=image,
            image_pe=self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_prompt_embeddings=sparse.to(dtype),
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=inputs.multimask,
        )
