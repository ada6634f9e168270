"""EVF-SAM's published inference steps, spelled out with a full model's own modules (its own SAM
image encoder, reference attention): the text-mask logits our pipeline is checked against."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import biprompt  # noqa: F401  (must precede segment_anything: installs torchvision stand-ins)

# isort: split
from segment_anything.utils.transforms import ResizeLongestSide


@torch.no_grad()
def evf_reference_logits(evf, tokenizer, image: np.ndarray, text: str) -> np.ndarray:
    """HxW float logits of EVF-SAM's mask for `text` on `image` (HxWx3 uint8); the mask is > 0.

    `evf`: an EvfSam with its image encoder; `tokenizer`: a biprompt TextTokenizer."""
    vm = evf.visual_model
    size = vm.image_encoder.img_size
    x = torch.as_tensor(ResizeLongestSide(size).apply_image(image)).permute(2, 0, 1)[None]
    resize = tuple(x.shape[-2:])
    images = vm.preprocess(x.float())
    beit = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    s = evf.config.beit3_spec.img_size
    beit = F.interpolate(beit, (s, s), mode="bicubic", align_corners=False, antialias=False)
    beit = (beit - 0.5) / 0.5
    ids = tokenizer.tokenizer(text, return_tensors="pt")["input_ids"]
    emb = vm.image_encoder(images)
    out = evf.mm_extractor.beit3(visual_tokens=beit, textual_tokens=ids,
                                 text_padding_position=torch.zeros_like(ids))
    feat = evf.text_hidden_fcs[0](out["encoder_out"][:, :1, ...])
    sparse, dense = vm.prompt_encoder(points=None, boxes=None, masks=None)
    sparse = torch.cat([sparse, feat], dim=1)
    low, _ = vm.mask_decoder(image_embeddings=emb, image_pe=vm.prompt_encoder.get_dense_pe(),
                             sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                             multimask_output=False)
    return vm.postprocess_masks(low, resize, image.shape[:2])[0, 0].numpy()
