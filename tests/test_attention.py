"""Attention dispatch: every backend matches the plain-torch reference; the block-causal mask."""

import pytest
import torch
import torch.nn.functional as F
from nextscale.kernels import attention as attention_module
from nextscale.kernels.attention import (
    ENV_BACKEND,
    IntervalMask,
    attention,
    available_backends,
    block_causal_mask,
)
from nextscale.models.infinity.model import block_causal

PATCH_NUMS = (1, 2, 3, 5)  # L = 39: odd lengths and uneven scales


def _qkv(B, H, L, S, c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, L, c, generator=g), dim=-1) * torch.linspace(2.0, 40.0, H).view(1, H, 1, 1)
    k = F.normalize(torch.randn(B, H, S, c, generator=g), dim=-1)
    v = torch.randn(B, H, S, c, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_backends_listed():
    assert {"torch", "sdpa"} <= set(available_backends())


@pytest.mark.parametrize("B,H,L,S,c", [(2, 3, 39, 39, 16), (1, 2, 7, 13, 8), (3, 1, 1, 1, 64), (2, 4, 25, 39, 32)])
def test_sdpa_matches_reference_without_mask(B, H, L, S, c):
    q, k, v = _qkv(B, H, L, S, c)
    ref = attention(q, k, v, backend="torch")
    out = attention(q, k, v, backend="sdpa")
    assert out.shape == (B, H, L, c) and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_matches_reference_with_block_causal_mask():
    L = sum(pn * pn for pn in PATCH_NUMS)
    q, k, v = _qkv(2, 3, L, L, 16, seed=1)
    mask = block_causal_mask(PATCH_NUMS, device=q.device)
    ref = attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(attention(q, k, v, mask, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)
    # a prefix of the mask is the mask of a prefix: scale 0 sees only itself
    torch.testing.assert_close(ref[:, :, :1], attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], backend="torch"))


def test_sdpa_splits_a_prefix_interval_mask_on_the_cpu(monkeypatch):
    """Infinity's block-causal IntervalMask runs as three calls (scales 0-4 masked, 5 and 6 unmasked), to the masked
    result and gradients; intervals not starting at key 0 keep the whole mask."""
    counts = (1, 4, 16, 36, 64, 144, 256)
    L = sum(counts)
    mask = block_causal(list(counts))
    calls = []
    sdpa = attention_module.F.scaled_dot_product_attention
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((q.shape[-2], k.shape[-2], kw["attn_mask"] is not None))
                        or sdpa(q, k, v, **kw))
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, L, L, 8, seed=4))
    out = attention(q, k, v, mask, backend="sdpa")
    assert calls == [(121, 121, True), (144, 265, False), (256, 521, False)]
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q0, k0, v0 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = attention(q0, k0, v0, mask.as_subclass(torch.Tensor), backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, torch.autograd.grad(ref.square().sum(), (q0, k0, v0)), strict=True):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-4)
    calls.clear()
    start, end = mask.bounds
    shifted = IntervalMask(torch.zeros(L, L), torch.ones_like(start), torch.full_like(end, L))
    attention(q0, k0, v0, shifted, backend="sdpa")
    assert calls == [(L, L, True)]


def test_softmax_scale_is_one():
    q, k, v = _qkv(1, 2, 5, 6, 8, seed=2)
    expected = (q @ k.transpose(-2, -1)).softmax(-1) @ v
    for backend in ("torch", "sdpa"):
        torch.testing.assert_close(attention(q, k, v, backend=backend), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_agrees_with_reference():
    q, k, v = _qkv(2, 2, 14, 14, 16, dtype=torch.bfloat16, seed=3)
    mask = block_causal_mask((1, 2, 3), device=q.device)
    ref = attention(q, k, v, mask, backend="torch")
    out = attention(q, k, v, mask, backend="sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_environment_variable_selects_backend(monkeypatch):
    q, k, v = _qkv(1, 2, 5, 5, 8)
    monkeypatch.setenv(ENV_BACKEND, "torch")
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="torch"))
    monkeypatch.setenv(ENV_BACKEND, "no-such-backend")
    with pytest.raises(ValueError, match=r"unknown attention backend 'no-such-backend'.*torch"):
        attention(q, k, v)
    assert torch.equal(attention(q, k, v, backend="sdpa"), attention(q, k, v, backend="sdpa"))  # explicit wins


def test_block_causal_mask():
    mask = block_causal_mask((1, 2, 3))
    L = 1 + 4 + 9
    assert mask.shape == (L, L) and mask.dtype == torch.float32
    level = torch.tensor([0] + [1] * 4 + [2] * 9)
    allowed = level[None, :] <= level[:, None]  # key level <= query level
    assert torch.equal(mask == 0, allowed) and torch.all(mask[~allowed] == float("-inf"))
    assert mask[1:5, 1:5].eq(0).all()  # bidirectional within a scale
    assert mask[0, 1:].eq(float("-inf")).all()
    assert block_causal_mask((1, 2), dtype=torch.bfloat16).dtype == torch.bfloat16
