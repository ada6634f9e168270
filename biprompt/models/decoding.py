"""SAM mask decoding for batches of (image embedding, prompt) pairs.

`MaskDecoder.forward` repeats ONE image embedding for every prompt. Serving and training need B
different embeddings with one prompt each, so `decode_pairs` runs the decoder's own submodules with
the embeddings already paired, doing the same arithmetic as `MaskDecoder.predict_masks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder


def decode_pairs(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode B prompts against B image embeddings (prompt i with embedding i).

    image_embeddings: BxCxhxw; image_pe: 1xCxhxw; sparse: BxNxC; dense: BxCxhxw.
    Returns low-res mask logits Bx{3|1}x4hx4w and predicted IoUs Bx{3|1}.
    """
    masks, iou_pred = decode_all(decoder, image_embeddings, image_pe, sparse, dense)
    sl = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sl], iou_pred[:, sl]


def decode_all(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_pairs` with every output token's mask: Bx4x4hx4w logits and Bx4 IoUs, the single
    mask first, then the three candidates. SAM's decoder computes all four in one pass whichever
    it returns, so a caller that needs both outputs (training) decodes once."""
    b = sparse.shape[0]
    if image_embeddings.shape[0] != b:
        raise ValueError(f"{image_embeddings.shape[0]} embeddings for {b} prompts")
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    _, uc, uh, uw = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, uc, uh * uw)).view(b, -1, uh, uw)
    return masks, decoder.iou_prediction_head(iou_token_out)


def upscale_logits(
    low_res: torch.Tensor,
    img_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> torch.Tensor:
    """BxKxhxw logits -> BxKxHxW at the original size (Sam.postprocess_masks' arithmetic)."""
    x = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
