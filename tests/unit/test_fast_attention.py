"""Fast (augmented-QK SDPA) attention path vs the reference SAM image-encoder attention.

The two paths sum in other orders, so they agree up to float rounding, which depends on the CPU's
kernels: outputs are compared within ``ATOL`` (max-abs), never bit for bit. Bit-exact checks here
compare one path with itself (a copy, a reload, the reference forward after a round trip).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import biprompt  # noqa: F401  (must precede segment_anything: installs torchvision stand-ins)
from biprompt.models.fast_attention import (
    FastAttention,
    fast_attention_enabled,
    set_fast_attention,
)

# isort: split
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

# Max-abs difference allowed between the fast and the reference forward, float32. Measured on a
# 2-core Xeon: at most 4e-6 on outputs of magnitude 4 (tiny encoders), 7e-8 on vit_b attention;
# a wrong bias or padding moves outputs by more than 1e-2 (test_relative_bias_is_exercised).
ATOL = 1e-4


def _randomize_positional(module: torch.nn.Module, std: float = 0.5) -> None:
    """SAM zero-initialises the relative/absolute position params; make them matter."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0.0, std)


def _tiny_encoder(*, use_abs_pos: bool = True, use_rel_pos: bool = True) -> ImageEncoderViT:
    enc = ImageEncoderViT(
        img_size=128,
        patch_size=8,
        embed_dim=96,
        depth=4,
        num_heads=4,
        out_chans=32,
        use_abs_pos=use_abs_pos,
        use_rel_pos=use_rel_pos,
        window_size=4,
        global_attn_indexes=(1, 3),
    )
    _randomize_positional(enc)
    return enc.eval()


@torch.no_grad()
def _ref_and_fast(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    set_fast_attention(module, False)
    ref = module(x)
    set_fast_attention(module, True)
    try:
        fast = module(x)
    finally:
        set_fast_attention(module, False)
    return ref, fast


@pytest.mark.parametrize(
    ("use_abs_pos", "use_rel_pos", "shape"),
    [
        (True, True, (1, 3, 128, 128)),
        (True, True, (2, 3, 128, 128)),
        (False, True, (2, 3, 96, 128)),  # non-square tokens (12x16)
        (False, True, (1, 3, 136, 120)),  # 17x15 tokens: window padding + rel-pos interpolation
        (False, False, (3, 3, 104, 80)),  # no relative positions: plain SDPA
    ],
)
def test_tiny_encoder_matches_reference(use_abs_pos, use_rel_pos, shape):
    torch.manual_seed(0)
    enc = _tiny_encoder(use_abs_pos=use_abs_pos, use_rel_pos=use_rel_pos)
    x = torch.randn(*shape)
    ref, fast = _ref_and_fast(enc, x)
    assert fast.shape == ref.shape == (shape[0], 32, shape[2] // 8, shape[3] // 8)
    assert (fast - ref).abs().max().item() <= ATOL


def test_relative_bias_is_exercised():
    """Guard against a vacuous comparison: the randomised bias must change the output."""
    torch.manual_seed(0)
    enc = _tiny_encoder()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        with_bias = enc(x)
        for blk in enc.blocks:
            blk.attn.rel_pos_h.zero_()
            blk.attn.rel_pos_w.zero_()
        without_bias = enc(x)
    assert (with_bias - without_bias).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    torch.manual_seed(0)
    attn = Attention(96, num_heads=4, use_rel_pos=True, input_size=(8, 8))
    _randomize_positional(attn)
    x = torch.randn(2, 8, 8, 96)
    with torch.no_grad():
        exact = attn(x)
    attn = attn.to(dtype)
    ref, fast = _ref_and_fast(attn, x.to(dtype))
    assert fast.dtype == dtype
    # Both paths round at ~3 significant digits; the fast one must be no worse than the reference.
    ref_err = (ref.float() - exact).abs().max().item()
    fast_err = (fast.float() - exact).abs().max().item()
    assert fast_err <= max(2 * ref_err, 1e-2)


def test_gradients_match():
    torch.manual_seed(0)
    attn = Attention(96, num_heads=4, use_rel_pos=True, input_size=(6, 6))
    _randomize_positional(attn)
    x = torch.randn(2, 6, 6, 96)
    grads = []
    for enabled in (False, True):
        set_fast_attention(attn, enabled)
        attn.zero_grad()
        xi = x.clone().requires_grad_(True)
        (attn(xi) ** 2).sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in attn.parameters()])
    set_fast_attention(attn, False)
    for g_ref, g_fast in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, atol=1e-4, rtol=1e-4)


def test_vit_b_global_attention_block():
    """One global-attention module at vit_b shape: dim 768, 12 heads, 64x64 tokens."""
    torch.manual_seed(0)
    attn = Attention(768, num_heads=12, use_rel_pos=True, input_size=(64, 64)).eval()
    _randomize_positional(attn, std=0.2)
    x = torch.randn(1, 64, 64, 768)
    ref, fast = _ref_and_fast(attn, x)
    assert (fast - ref).abs().max().item() <= ATOL


def test_toggle_restores_reference_and_keeps_state_dict():
    torch.manual_seed(0)
    enc = _tiny_encoder()
    x = torch.randn(1, 3, 128, 128)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        ref = enc(x)
        assert not fast_attention_enabled(enc)

        set_fast_attention(enc)
        set_fast_attention(enc)  # idempotent
        assert fast_attention_enabled(enc)
        assert all(type(blk.attn) is FastAttention for blk in enc.blocks)
        assert all(isinstance(blk.attn, Attention) for blk in enc.blocks)
        assert list(enc.state_dict()) == list(before)
        fast = enc(x)
        assert (fast - ref).abs().max().item() <= ATOL

        set_fast_attention(enc, enabled=False)
        assert not fast_attention_enabled(enc)
        assert all(type(blk.attn) is Attention for blk in enc.blocks)
        again = enc(x)
    assert torch.equal(again, ref)
    after = enc.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_copy_and_serialisation_keep_the_fast_path():
    torch.manual_seed(0)
    enc = _tiny_encoder()
    set_fast_attention(enc)
    clone = copy.deepcopy(enc)
    buf = io.BytesIO()
    torch.save(enc, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fast_attention_enabled(clone) and fast_attention_enabled(loaded)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        out = enc(x)
        torch.testing.assert_close(clone(x), out, atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), out, atol=0, rtol=0)
    # The state_dict of a fast model loads into a plain reference encoder.
    plain = _tiny_encoder()
    plain.load_state_dict(enc.state_dict(), strict=True)


def test_enabled_flag_and_foreign_subclasses():
    assert not fast_attention_enabled(torch.nn.Linear(2, 2))

    class Custom(Attention):
        pass

    holder = torch.nn.Sequential(Custom(8, num_heads=2))
    with pytest.raises(TypeError):
        set_fast_attention(holder)
    assert type(holder[0]) is Custom


@pytest.mark.slow
def test_vit_b_encoder_matches_reference():
    from segment_anything import build_sam_vit_b

    torch.manual_seed(0)
    enc = build_sam_vit_b().image_encoder.eval()
    _randomize_positional(enc, std=0.2)
    x = torch.randn(1, 3, 1024, 1024)
    ref, fast = _ref_and_fast(enc, x)
    assert fast.shape == ref.shape == (1, 256, 64, 64)
    assert (fast - ref).abs().max().item() <= ATOL


@pytest.mark.parametrize("budget", [10**9, 40_000, 300, 7])
def test_every_bias_blocking_matches_reference(monkeypatch, budget):
    """Small budgets force the other ways of splitting the bias: groups of heads, one head and
    blocks of queries, down to one query row per call."""
    from biprompt.models import fast_attention

    monkeypatch.setattr(fast_attention, "BIAS_ELEMENTS", budget)
    monkeypatch.setattr(fast_attention, "MLP_TOKENS", 37)
    monkeypatch.setattr(fast_attention, "QKV_TOKENS", 53)
    torch.manual_seed(0)
    enc = _tiny_encoder(use_abs_pos=False)
    x = torch.randn(2, 3, 136, 120)  # 17x15 tokens: padded windows, uneven blocks
    ref, fast = _ref_and_fast(enc, x)
    assert (fast - ref).abs().max().item() <= ATOL


def test_pipeline_uses_the_fast_path_by_default_and_can_switch_back():
    from biprompt.factory import LoadedSam
    from biprompt.models.sam import build_sam, get_sam_spec
    from biprompt.pipeline import BiPromptPipeline

    spec = get_sam_spec("tiny")
    torch.manual_seed(0)
    fast = BiPromptPipeline.from_models(LoadedSam(build_sam(spec), spec, "t"))
    assert fast.fast_encoder and fast_attention_enabled(fast.encoder.encoder)
    torch.manual_seed(0)
    ref = BiPromptPipeline.from_models(LoadedSam(build_sam(spec), spec, "t"), fast_encoder=False)
    assert not ref.fast_encoder and not fast_attention_enabled(ref.encoder.encoder)
    img = (torch.rand(90, 70, 3) * 255).to(torch.uint8).numpy()
    diff = (fast.embed(img).embedding - ref.embed(img).embedding).abs().max().item()
    assert diff <= ATOL  # the same model up to float rounding
    profile = {"sam": {"variant": "tiny", "fast_encoder": False}}
    assert not BiPromptPipeline.from_profile(profile).fast_encoder
    assert BiPromptPipeline.from_profile({"sam": {"variant": "tiny"}}).fast_encoder


def test_encoder_without_qkv_bias_matches_reference():
    """Padded windows then hold zeros (no bias to copy), and qkv runs as a plain matmul."""
    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=128, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                          out_chans=16, qkv_bias=False, use_rel_pos=True, window_size=5,
                          global_attn_indexes=(1,))
    _randomize_positional(enc)
    ref, fast = _ref_and_fast(enc.eval(), torch.randn(1, 3, 128, 128))  # 16x16 tokens, pad 4
    assert (fast - ref).abs().max().item() <= ATOL


def test_the_bias_budget_is_the_cache_bound_on_cpu_and_unbounded_elsewhere(monkeypatch):
    from biprompt.models import fast_attention

    assert fast_attention.bias_budget(torch.device("cpu")) == fast_attention.BIAS_ELEMENTS
    assert fast_attention.bias_budget(torch.device("meta")) >= 2**40
    monkeypatch.setitem(fast_attention.BIAS_ELEMENTS_BY_DEVICE, "meta", 1234)
    assert fast_attention.bias_budget(torch.device("meta")) == 1234
