"""Parity of the Triton kernels (kernels/triton_*.py) with the torch references, and the 'triton' dispatch.

How to run: Triton is in the test bed's venv (CI runs the suite with it)::

    .testbed/venv/bin/python -m pytest tests/test_triton_kernels.py -q

Without Triton (e.g. the system python) the module is skipped. It sets ``TRITON_INTERPRET=1`` (unless the
variable is already set) before Triton is first imported, so the kernels run in Triton's interpreter on CPU
tensors. With ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the compiled kernels on the GPU
(bench/kernels_gpu.py checks parity there too, at realistic sizes, and times the kernels).

Each kernel writes into an output POISONED beforehand (NaN, or -1 for indices), so an element it fails to
write fails the test. Inputs are freshly drawn for every case (seeded per case, so a failure reproduces).

Tolerances, on ``rel_err = max|out - ref| / max|ref|`` against the torch reference (fp32 arithmetic, result
rounded to the dtype): fp32 1e-5, fp16 2e-3, bf16 1.6e-2 -- a little under one ulp of the output dtype at
``max|ref|`` plus the rounding of the softmax probabilities to the input dtype before ``P @ V`` (as in
FlashAttention). Observed in the interpreter: fp32 <= 1e-6, fp16 <= 6e-4, bf16 <= 6e-3. Nearest-code indices
must be equal, except where two codes are within 1e-5 (relative) of each other's distance (a near tie that
summation order may decide either way).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton (see the module docstring)

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip(
    "triton",
    reason="Triton is not installed here; run with the test bed's venv: "
    ".testbed/venv/bin/python -m pytest tests/test_triton_kernels.py",
)

from nextscale.kernels import attention as attention_mod
from nextscale.kernels import quantize as quantize_mod
from nextscale.kernels import ragged, triton_attention, triton_quantize, triton_support, triton_tuning
from nextscale.kernels.attention import IntervalMask, attention_torch, block_causal_mask, scale_row_bounds
from nextscale.kernels.quantize import nearest_code_torch
from nextscale.kernels.triton_attention import (
    INTERPRET,
    attention_triton,
    block_causal_attention,
    interval_attention,
    ragged_attention_triton,
    row_bounds_from_mask,
    scale_step_attention,
    supports,
)
from nextscale.kernels.triton_quantize import nearest_code_triton

if INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def assert_parity(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "unwritten (poisoned) or NaN outputs"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def cos_qkv(B, H, L, S, c, dtype, seed):
    """VAR's attention inputs: l2-normalised q times a per-head scale up to the cap 100, l2-normalised k."""
    g = torch.Generator().manual_seed(seed)
    scale_H = torch.linspace(2.0, 100.0, H) if H > 1 else torch.tensor([30.0])
    q = F.normalize(torch.randn(B, H, L, c, generator=g), dim=-1) * scale_H.view(1, H, 1, 1)
    k = F.normalize(torch.randn(B, H, S, c, generator=g), dim=-1)
    v = torch.randn(B, H, S, c, generator=g)
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (q, k, v))


# ---------------------------------------------------------------------------------------------------------------
# scale-step attention (queries of one scale over the whole cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [64, 128])
@pytest.mark.parametrize("B,H,L,S", [(2, 3, 13, 37), (2, 2, 1, 1), (1, 2, 17, 16)])
def test_scale_step_matches_reference(dtype, c, B, H, L, S):
    """CFG rows (B = 2), lengths not multiples of the 16 x 16 tiles, the first scale (1 query, 1 key)."""
    q, k, v = cos_qkv(B, H, L, S, c, dtype, seed=B * 1000 + L * 10 + S + c)
    out = poisoned(q.shape, dtype)
    assert scale_step_attention(q, k, v, out=out) is out
    assert_parity(out, attention_torch(q, k, v), dtype)


@pytest.mark.parametrize("c", [40, 24])
def test_head_dim_not_a_power_of_two(c):
    q, k, v = cos_qkv(2, 2, 11, 29, c, torch.float32, seed=c)
    assert_parity(scale_step_attention(q, k, v), attention_torch(q, k, v), torch.float32)


def test_strided_views_as_the_model_makes_them():
    """q/k/v are permuted views of one qkv projection (blocks.py); the cache slices a larger buffer."""
    B, L, H, c = 2, 9, 2, 64
    g = torch.Generator().manual_seed(7)
    qkv_3BHLc = torch.randn(B, L, 3, H, c, generator=g).to(DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_3BHLc.unbind(0)
    q, k = F.normalize(q, dim=-1) * 10, F.normalize(k, dim=-1)
    buf_k, buf_v = torch.zeros(B, H, 40, c, device=DEVICE), torch.zeros(B, H, 40, c, device=DEVICE)
    buf_k[:, :, 3 : 3 + L], buf_v[:, :, 3 : 3 + L] = k, v
    k_view, v_view = buf_k[:, :, : 3 + L], buf_v[:, :, : 3 + L]
    assert not q.is_contiguous() and not k_view.is_contiguous()
    out = poisoned(q.shape, q.dtype)
    scale_step_attention(q, k_view, v_view, out=out)
    assert_parity(out, attention_torch(q, k_view, v_view), torch.float32)


def test_tile_sizes_are_free():
    q, k, v = cos_qkv(1, 2, 37, 70, 64, torch.float16, seed=11)
    ref = attention_torch(q, k, v)
    for blocks in [(16, 32), (32, 16), (64, 64)]:
        assert_parity(scale_step_attention(q, k, v, blocks=blocks), ref, torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# block-causal full-sequence attention (teacher forcing, calibration, prefill)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [64, 128])
@pytest.mark.parametrize("patch_nums,L", [((1, 2, 3, 5), 39), ((1, 2, 3, 4, 5, 6), 70)], ids=["L39", "prefix70of91"])
def test_block_causal_matches_masked_reference(dtype, c, patch_nums, L):
    """Query tiles straddling scale boundaries, unmasked interior tiles, and a prefix of the schedule (as
    ``forward_teacher`` uses on the first ``l`` tokens)."""
    q, k, v = cos_qkv(2, 2, L, L, c, dtype, seed=L + c)
    mask_LL = block_causal_mask(patch_nums, device=DEVICE)[:L, :L]
    out = poisoned(q.shape, dtype)
    block_causal_attention(q, k, v, patch_nums, out=out)
    assert_parity(out, attention_torch(q, k, v, mask_LL), dtype)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 64)])
def test_block_causal_other_tiles(blocks):
    patch_nums = (1, 2, 3, 4, 5, 6)
    q, k, v = cos_qkv(1, 3, 91, 91, 64, torch.float32, seed=5)
    ref = attention_torch(q, k, v, block_causal_mask(patch_nums, device=DEVICE))
    assert_parity(block_causal_attention(q, k, v, patch_nums, blocks=blocks), ref, torch.float32)


def test_block_causal_never_loads_skipped_tiles():
    """Keys from the first tile past every query's range are NaN: a kernel that loaded and masked them would
    produce NaN (0 * NaN in P @ V), one that skips them cannot."""
    patch_nums = (1, 2, 3, 5)  # the first 14 queries (scales 0-2) see keys [0, 14) only
    q, k, v = cos_qkv(2, 2, 39, 39, 64, torch.float32, seed=9)
    ref = attention_torch(q, k, v, block_causal_mask(patch_nums, device=DEVICE))[:, :, :14]
    k[:, :, 16:], v[:, :, 16:] = float("nan"), float("nan")  # keys 14, 15 share a 16-tile with the visible ones
    out = block_causal_attention(q[:, :, :14].contiguous(), k, v, patch_nums, blocks=(16, 16))
    assert_parity(out, ref, torch.float32)
    # and before the ranges: queries seeing keys [39, 75) only (block-diagonal) never load keys [0, 32)
    q, k, v = cos_qkv(1, 2, 36, 75, 64, torch.float32, seed=10)
    start, end = torch.full((36,), 39, dtype=torch.int32), torch.full((36,), 75, dtype=torch.int32)
    ref = attention_torch(q, k[:, :, 39:], v[:, :, 39:])
    k[:, :, :32], v[:, :, :32] = float("nan"), float("nan")
    out = interval_attention(q, k, v, start.to(DEVICE), end.to(DEVICE), blocks=(16, 16))
    assert_parity(out, ref, torch.float32)


def test_interval_attention_block_diagonal_and_empty_rows():
    """HMAR's block-diagonal mask (each scale sees itself), plus a query with no key at all (-> zeros)."""
    patch_nums = (1, 2, 3, 5)
    L = sum(p * p for p in patch_nums)
    level = torch.tensor([si for si, p in enumerate(patch_nums) for _ in range(p * p)])
    ends = torch.tensor([sum(p * p for p in patch_nums[: s + 1]) for s in range(len(patch_nums))])
    end_L = ends[level].to(torch.int32)
    start_L = (end_L - torch.tensor([p * p for p in patch_nums])[level]).to(torch.int32)
    start_L[20], end_L[20] = 7, 7  # empty range
    q, k, v = cos_qkv(2, 2, L, L, 64, torch.float32, seed=3)
    allowed_LS = (torch.arange(L) >= start_L[:, None]) & (torch.arange(L) < end_L[:, None])
    mask = torch.zeros(L, L).masked_fill(~allowed_LS, float("-inf")).to(DEVICE)
    ref = attention_torch(q, k, v, mask)
    ref[:, :, 20] = 0.0  # softmax over nothing: the kernels define it as zeros
    out = poisoned(q.shape, q.dtype)
    interval_attention(q, k, v, start_L.to(DEVICE), end_L.to(DEVICE), out=out)
    assert_parity(out, ref, torch.float32)


def test_scale_row_bounds():
    start, end = scale_row_bounds((1, 2, 3))
    assert start.dtype == end.dtype == torch.int32 and start.eq(0).all()
    assert end.tolist() == [1] + [5] * 4 + [14] * 9
    assert scale_row_bounds((1, 2, 3), L=6)[1].tolist() == [1, 5, 5, 5, 5, 14]
    with pytest.raises(ValueError, match="15 queries"):
        scale_row_bounds((1, 2, 3), L=15)


# ---------------------------------------------------------------------------------------------------------------
# ragged (per-head) KV caches in the packed layout

LENGTHS_BH = [[0, 1, 37], [16, 5, 0]]  # empty heads, a single key, a full tile, an odd length over two tiles


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [64, 128])
def test_ragged_matches_reference(dtype, c):
    B, H, L, S = 2, 3, 9, 40
    q, k, v = cos_qkv(B, H, L, S, c, dtype, seed=c + 1)
    k_packed, v_packed, offsets = ragged.pack_kv_prefix(k, v, torch.tensor(LENGTHS_BH), offsets_dtype=torch.int32)
    out = poisoned(q.shape, dtype)
    ragged_attention_triton(q, k_packed, v_packed, offsets, out=out)
    ref = ragged.ragged_attention_torch(q, k_packed, v_packed, offsets)
    assert_parity(out, ref, dtype)
    assert out[0, 0].eq(0).all() and out[1, 2].eq(0).all()  # empty heads
    torch.testing.assert_close(out[0, 1].float(), v[0, 1, :1].float().expand(L, c))  # one key: its value


def test_ragged_int64_offsets_selected_keys_and_dispatch():
    """Keys kept at arbitrary positions (a compression policy's choice), int64 offsets, the dispatch."""
    B, H, L, S = 1, 4, 7, 33
    q, k, v = cos_qkv(B, H, L, S, 64, torch.float32, seed=21)
    g = torch.Generator().manual_seed(22)
    keep_BHS = torch.rand(B, H, S, generator=g) < torch.tensor([0.0, 0.2, 0.7, 1.0]).view(1, H, 1)
    k_packed, v_packed, offsets = ragged.pack_kv(k, v, keep_BHS.to(DEVICE))
    assert offsets.dtype == torch.int64 and int(offsets[-1]) == keep_BHS.sum()
    ref = ragged.ragged_attention_torch(q, k_packed, v_packed, offsets)
    # the reference equals dense attention with the dropped keys masked out (heads with keys)
    mask = torch.zeros(B, H, 1, S).masked_fill(~keep_BHS[:, :, None], float("-inf")).to(DEVICE)
    torch.testing.assert_close(ref[:, 1:], attention_torch(q, k, v, mask)[:, 1:], rtol=1e-5, atol=1e-6)
    out = poisoned(q.shape, q.dtype)
    ragged_attention_triton(q, k_packed, v_packed, offsets, out=out)
    assert_parity(out, ref, torch.float32)
    assert_parity(ragged.ragged_attention(q, k_packed, v_packed, offsets, backend="triton"), ref, torch.float32)
    assert_parity(ragged.ragged_attention(q, k_packed, v_packed, offsets, backend="sdpa"), ref, torch.float32)
    assert "triton" in ragged.available_backends()


def test_ragged_layout_helpers():
    B, H, S, c = 2, 3, 40, 8
    k, v = torch.randn(B, H, S, c), torch.randn(B, H, S, c)
    k_packed, v_packed, offsets = ragged.pack_kv_prefix(k, v, torch.tensor(LENGTHS_BH))
    assert offsets.tolist() == [0, 0, 1, 38, 54, 59, 59] and k_packed.shape == (59, c)
    k_pad, v_pad, valid = ragged.unpack_kv(k_packed, v_packed, offsets, B, H)
    assert k_pad.shape == (B, H, 37, c) and valid.sum(-1).tolist() == LENGTHS_BH
    assert torch.equal(k_pad[valid], k_packed) and torch.equal(v_pad[valid], v_packed)
    assert torch.equal(k_pad[1, 0, :16], k[1, 0, :16]) and k_pad[~valid].eq(0).all()
    for bad in (offsets[:-1], offsets.flip(0), offsets.float()):
        with pytest.raises(ValueError, match="offsets"):
            ragged.check_offsets(bad, B * H, 59)
    with pytest.raises(ValueError, match="offsets"):
        ragged_attention_triton(torch.randn(B, H, 3, c), k_packed, v_packed, offsets[:-1])


def test_ragged_all_heads_empty():
    q = torch.randn(1, 2, 3, 64, device=DEVICE)
    empty = torch.zeros(0, 64, device=DEVICE)
    offsets = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out = poisoned(q.shape, q.dtype)
    assert ragged_attention_triton(q, empty, empty, offsets, out=out).eq(0).all()
    assert ragged.ragged_attention(q, empty, empty, offsets, backend="sdpa").eq(0).all()


# ---------------------------------------------------------------------------------------------------------------
# nearest-code search (distance + argmin fused)


def assert_same_codes(idx, z_NC, codebook_VC):
    ref = nearest_code_torch(z_NC, codebook_VC)
    assert idx.dtype == torch.int64 and idx.shape == ref.shape and idx.min() >= 0
    differ = idx != ref
    if differ.any():  # only near ties may differ: compare the two candidates' fp64 distances
        z, e = z_NC[differ].double(), codebook_VC.double()
        d_ours = (z - e[idx[differ]]).square().sum(1)
        d_ref = (z - e[ref[differ]]).square().sum(1)
        assert torch.allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6), f"{int(differ.sum())} indices differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("N,V,C", [(77, 300, 32), (5, 33, 8), (40, 64, 5)])
def test_nearest_code_matches_reference(dtype, N, V, C):
    g = torch.Generator().manual_seed(N + V + C)
    z = torch.randn(N, C, generator=g).to(dtype=dtype, device=DEVICE)
    codebook = torch.randn(V, C, generator=g).to(DEVICE)
    out = torch.full((N,), -1, dtype=torch.int64, device=DEVICE)
    assert nearest_code_triton(z, codebook, out=out) is out
    assert_same_codes(out, z, codebook)


def test_nearest_code_ties_pick_the_first_index_and_strides_are_free():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(100, 32, generator=g)
    codebook[70] = codebook[3]  # exact duplicate in another codebook tile
    codebook[4] = codebook[3]  # and in the same tile
    z = torch.cat((codebook[3:4] + 1e-3 * torch.randn(1, 32, generator=g), torch.randn(20, 32, generator=g)))
    z_strided = torch.zeros(21, 64)[:, ::2]
    z_strided.copy_(z)
    idx = nearest_code_triton(z_strided.to(DEVICE), codebook.to(DEVICE))
    assert int(idx[0]) == 3
    assert torch.equal(idx.cpu(), nearest_code_torch(z, codebook))
    assert nearest_code_triton(torch.zeros(0, 32, device=DEVICE), codebook.to(DEVICE)).shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# dispatch: the 'triton' backend of kernels.attention / kernels.quantize


def test_attention_dispatch_triton_backend(monkeypatch):
    assert "triton" in attention_mod.available_backends() and "triton" in quantize_mod.available_backends()
    patch_nums = (1, 2, 3, 5)
    q, k, v = cos_qkv(2, 2, 39, 39, 64, torch.float32, seed=31)
    mask = block_causal_mask(patch_nums, device=DEVICE)
    for m in (None, mask, mask[None, None]):
        ref = attention_torch(q, k, v, m)
        assert_parity(attention_mod.attention(q, k, v, m, backend="triton"), ref, torch.float32)
    monkeypatch.setenv(attention_mod.ENV_BACKEND, "triton")
    assert_parity(attention_mod.attention(q, k, v, mask), attention_torch(q, k, v, mask), torch.float32)
    # an additive mask that is not one interval per query goes elsewhere: 'triton' refuses it explicitly
    holes = mask.clone()
    holes[-1, 3] = float("-inf")
    assert supports(q, k, v, holes) is not None
    with pytest.raises(ValueError, match="one interval"):
        attention_triton(q, k, v, holes)


def test_mask_bounds_are_cached_and_invalidated_in_place():
    mask = block_causal_mask((1, 2, 3), device=DEVICE)
    start, end = row_bounds_from_mask(mask, 14, 14)
    assert end.tolist() == scale_row_bounds((1, 2, 3))[1].tolist() and start.eq(0).all()
    assert row_bounds_from_mask(mask, 14, 14)[1] is end  # cached
    mask[0, 1] = 0.0  # in place: row 0 now sees keys [0, 2)
    assert row_bounds_from_mask(mask, 14, 14)[1][0] == 2
    mask[0, 3] = 0.5  # not 0 / -inf
    assert row_bounds_from_mask(mask, 14, 14) is None


def test_supports_reasons():
    q, k, v = cos_qkv(1, 2, 4, 4, 64, torch.float32, seed=0)
    assert supports(q, k, v) is None
    assert "forward only" in supports(q.clone().requires_grad_(), k, v)
    assert "dtypes" in supports(q.double(), k.double(), v.double())
    assert "head dim" in supports(*cos_qkv(1, 1, 2, 2, 512, torch.float32, seed=0))
    if INTERPRET:
        assert "CPU" in supports(q.to("meta"), k.to("meta"), v.to("meta"))


def test_interval_mask_carries_the_schedule_bounds():
    patch_nums = (1, 2, 3, 5)
    buffer_11LL = block_causal_mask(patch_nums, device=DEVICE)[None, None]  # as VAR's attn_bias_for_masking
    for L in (1, 30, 39):
        mask = IntervalMask.block_causal(buffer_11LL[0, 0, :L, :L], patch_nums)
        read = triton_attention._read_row_bounds(buffer_11LL[0, 0, :L, :L])
        start, end = mask.bounds  # an end past L (a scale cut short) is clipped to S by the kernel
        assert start.tolist() == read[0].tolist() and end.clamp_max(L).tolist() == read[1].tolist()
        assert row_bounds_from_mask(mask, L, L) is mask.bounds and mask.data_ptr() == buffer_11LL.data_ptr()
    assert type(mask + 0) is torch.Tensor and type(mask[:5, :5]) is torch.Tensor  # operations lose the bounds
    with pytest.raises(ValueError, match="int32"):
        IntervalMask(mask, start.long(), end)
    with pytest.raises(ValueError, match=r"\(L, S\)"):
        IntervalMask(buffer_11LL, start, end)


def test_inference_tensor_masks_are_read_every_time_never_by_version():
    """A plain mask made under ``torch.inference_mode`` has no version counter: its bounds are read (no cache)."""
    with torch.inference_mode():
        mask = block_causal_mask((1, 2, 3), device=DEVICE)
        assert mask.is_inference()
        start, end = row_bounds_from_mask(mask, 14, 14)
        assert end.tolist() == scale_row_bounds((1, 2, 3))[1].tolist() and start.eq(0).all()
        mask[0, 1] = 0.0  # in place, allowed on inference tensors inside inference mode
        assert row_bounds_from_mask(mask, 14, 14)[1][0] == 2


@pytest.mark.skipif(not INTERPRET, reason="the CPU check of the auto dispatch (on a GPU: bench/kernels_gpu.py)")
def test_auto_dispatch_under_inference_mode_as_comfyui_runs_it(tiny_models, monkeypatch):
    """ComfyUI loads and runs models under ``torch.inference_mode``: ``attn_bias_for_masking`` (rebuilt by the
    loader) and every mask sliced from it are inference tensors, which have no version counter. With the auto
    dispatch choosing Triton (here: the interpreter on CPU), CoDe's prefill and teacher forcing pass the schedule's
    bounds down and no mask is read; their tokens and logits match the torch backend."""
    from nextscale.models.var.collaborative import sample_collaborative
    from nextscale.models.var.model import VAR
    from nextscale.models.var.sampler import SamplingOptions

    var, vae = tiny_models
    labels, opts = torch.tensor([1, 7, NUM_CLASSES]), SamplingOptions(cfg=3.0, top_k=1, top_p=0.0)
    masks = []
    triton_fn = attention_mod._BACKENDS["triton"]
    monkeypatch.setitem(attention_mod._BACKENDS, "triton", lambda *a: masks.append(a[3]) or triton_fn(*a))
    monkeypatch.setattr(triton_attention, "_read_row_bounds", lambda mask: pytest.fail("a mask was read"))
    runs = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv(attention_mod.ENV_BACKEND, backend)
        monkeypatch.setattr(triton_support, "use_triton", lambda t, on=backend == "auto": on)
        with torch.inference_mode():
            loaded = VAR.from_state_dict(var.state_dict())  # as the loader builds it
            assert loaded.attn_bias_for_masking.is_inference()
            out = sample_collaborative(loaded, loaded, vae, labels, draft_scales=2, seed=0, options=opts)
            x_BLCv = vae.quantize.teacher_forcing_input(out.flat(), PN)
            runs[backend] = out, loaded.forward_teacher(labels, x_BLCv)
    for si in range(len(PN)):
        assert torch.equal(runs["auto"][0].indices[si], runs["torch"][0].indices[si]), f"scale {si}"
    torch.testing.assert_close(runs["auto"][1], runs["torch"][1], rtol=1e-4, atol=1e-4)
    masked = [m for m in masks if m is not None]
    assert len(masked) == 2 * var.depth  # the prefill and teacher forcing, every layer, through Triton
    assert all(isinstance(m, IntervalMask) and m.is_inference() for m in masked)


def test_first_launch_probe_runs_the_kernels_and_catches_wrong_results(monkeypatch):
    """The check each CUDA device gets once (kernels.triton_support), here on the interpreter's CPU tensors."""
    triton_support._first_launch(torch.device(DEVICE))
    monkeypatch.setattr(triton_attention, "attention_triton", lambda q, k, v, mask: torch.zeros_like(q))
    with pytest.raises(RuntimeError, match="attention differs from the reference"):
        triton_support._first_launch(torch.device(DEVICE))


# ---------------------------------------------------------------------------------------------------------------
# autotuning and pruning, driven on CPU: a stand-in benchmark, stand-in shared memory (the compiled figures of
# each config are checked by tests/test_triton_compile.py)


TUNED = (triton_attention._attn_fwd_tuned, triton_attention._ragged_attn_fwd_tuned, triton_quantize._nearest_code_tuned)


@pytest.fixture
def stand_in_tuning(monkeypatch):
    """Autotuning on in the interpreter, 99 KiB of shared memory, 40 KiB per pipelining stage for every config, and
    a benchmark that runs each config and finds each one faster than the one before. Returns the timed configs
    of a kernel (what its autotuner benchmarked last)."""

    def fake_bench(kernel_call, quantiles):
        kernel_call()  # the config really runs (its output is checked through the final launch's)
        calls.append(None)
        return [1.0 / len(calls)] * 3

    calls = []
    for tuned in TUNED:
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "do_bench", fake_bench)
        monkeypatch.setattr(tuned, "configs_timings", {}, raising=False)
    monkeypatch.setattr(triton_attention, "AUTOTUNE", True)
    monkeypatch.setattr(triton_quantize, "AUTOTUNE", True)
    monkeypatch.setattr(triton_tuning, "shared_memory_limit", lambda device: 99 * 1024)
    monkeypatch.setattr(triton_tuning, "shared_memory", lambda kernel, config, *args: 40 * 1024 * config.num_stages)
    return lambda tuned: [(*c.kwargs.values(), c.num_stages) for c in tuned.configs_timings]


def test_autotune_times_only_stage_counts_that_fit(stand_in_tuning):
    q, k, v = cos_qkv(2, 2, 37, 53, 64, torch.float32, seed=41)
    assert_parity(scale_step_attention(q, k, v), attention_torch(q, k, v), torch.float32)
    tuned = triton_attention._attn_fwd_tuned
    assert stand_in_tuning(tuned) == [(16, 32, 1), (16, 32, 2)]  # fp32: its fixed tiles, the two stage counts
    assert (tuned.best_config.kwargs["BLOCK_N"], tuned.best_config.num_stages) == (32, 2)


def test_autotune_never_runs_a_config_that_does_not_fit(stand_in_tuning, monkeypatch):
    monkeypatch.setattr(triton_tuning, "shared_memory_limit", lambda device: 60 * 1024)  # stage 2 needs 80 KiB
    q, k, v = cos_qkv(1, 2, 9, 20, 128, torch.float32, seed=42)
    assert_parity(scale_step_attention(q, k, v), attention_torch(q, k, v), torch.float32)
    tuned = triton_attention._attn_fwd_tuned
    assert stand_in_tuning(tuned) == []  # one config left: launched without timing, as Triton does
    assert tuned.best_config.num_stages == 1
    monkeypatch.setattr(triton_tuning, "shared_memory_limit", lambda device: 30 * 1024)
    tuned.cache.clear()
    with pytest.raises(RuntimeError, match="no Triton config of _attn_fwd_kernel fits the 30720 bytes"):
        scale_step_attention(q, k, v)


@pytest.mark.parametrize("L,block_m", [(9, 16), (39, 64)])
def test_fp16_tiles_are_fixed_and_never_timed(stand_in_tuning, L, block_m):
    """One config per query count (the query tile for L, the dtype's key tile), for the block-causal and the
    ragged kernel alike: nothing is timed, so nothing depends on timings."""
    patch_nums = (1, 2, 3, 5)
    q, k, v = cos_qkv(1, 2, L, L, 64, torch.float16, seed=L)
    mask_LL = block_causal_mask(patch_nums, device=DEVICE)[:L, :L]
    assert_parity(block_causal_attention(q, k, v, patch_nums), attention_torch(q, k, v, mask_LL), torch.float16)
    k_packed, v_packed, offsets = ragged.pack_kv_prefix(k, v, torch.tensor([[L, L // 2]]))
    ref = ragged.ragged_attention_torch(q, k_packed, v_packed, offsets)
    assert_parity(ragged_attention_triton(q, k_packed, v_packed, offsets), ref, torch.float16)
    for tuned in TUNED[:2]:
        assert stand_in_tuning(tuned) == []
        assert tuned.best_config.kwargs == {"BLOCK_M": block_m, "BLOCK_N": triton_attention.KEY_TILE[torch.float16]}


def test_shared_memory_is_read_from_a_compile_without_launch():
    """What the pruning asks Triton on a GPU: ``warmup`` (compile, no launch) with the launch's arguments."""
    calls = []

    class Kernel:
        arg_names = ("Q", "L", "D", "BLOCK_M")

        def warmup(self, *args, **kwargs):
            calls.append((args, kwargs))
            return type("Compiled", (), {"metadata": type("Metadata", (), {"shared": 12345})})()

    config = triton_attention.tile_configs(torch.float16)[0]
    q = torch.zeros(1)
    meta = {"grid": lambda META: (1,), "warmup": False, "D": 64}  # as the autotuner hands them to the pruning
    assert triton_tuning.shared_memory(Kernel(), config, {"Q": q, "L": 5}, meta) == 12345
    (args, kwargs), = calls
    assert args[0] is q and args[1:] == (5,)
    assert kwargs == {"grid": (1,), "D": 64, **config.all_kwargs()}


def test_nearest_code_autotune_prunes_and_times(stand_in_tuning, monkeypatch):
    monkeypatch.setattr(triton_tuning, "shared_memory_limit", lambda device: 130 * 1024)  # drops the 4-stage one
    g = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(50, 32, generator=g).to(DEVICE), torch.randn(300, 32, generator=g).to(DEVICE)
    assert_same_codes(nearest_code_triton(z, codebook), z, codebook)
    assert stand_in_tuning(triton_quantize._nearest_code_tuned) == [(32, 128, 3), (64, 128, 3)]


# ---------------------------------------------------------------------------------------------------------------
# end to end: a tiny VAR samples the same greedy tokens with either backend

PN = (1, 2, 3, 4)
NUM_CLASSES, VOCAB, CVAE = 10, 96, 8


@pytest.fixture(scope="module")
def tiny_models():
    from nextscale.models.var.model import VAR, VARConfig
    from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig

    torch.manual_seed(0)
    tok_cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    vae = MultiScaleVQVAE(tok_cfg).eval().requires_grad_(False)
    var = VAR(VARConfig(depth=2, embed_dim=128, num_heads=2, num_classes=NUM_CLASSES, vocab_size=VOCAB, cvae=CVAE,
                        patch_nums=PN))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # O(1)-scale random weights: peaked logits, every block active
        for name, p in var.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("scale_mul_1H11"):
                r = math.log(4.0) + 0.3 * r
            elif p.dim() == 2 and not name.endswith(("class_emb.weight", "lvl_embed.weight")):
                gain = 0.3 if "ada_lin" in name else 3.0 if name == "head.weight" else 1.0
                r = r * gain / math.sqrt(p.shape[1])
            elif p.dim() == 1:
                r = 0.1 * r
            p.copy_(r)
        var.blocks[0].attn.scale_mul_1H11[0, 0] = math.log(200.0)  # above the ln 100 cap
    return var.eval().requires_grad_(False), vae


@pytest.mark.skipif(not INTERPRET, reason="the CPU end-to-end check (on a GPU: bench/kernels_gpu.py)")
def test_greedy_sampling_identical_with_triton_backend(tiny_models, monkeypatch):
    from nextscale.models.var.sampler import SamplingOptions, sample

    var, vae = tiny_models
    labels = torch.tensor([1, 7, NUM_CLASSES])
    opts = SamplingOptions(cfg=3.0, top_k=1, top_p=0.0)
    calls = []
    triton_fn = attention_mod._BACKENDS["triton"]
    monkeypatch.setitem(attention_mod._BACKENDS, "triton", lambda *a: calls.append(a[3] is None) or triton_fn(*a))
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(attention_mod.ENV_BACKEND, backend)
        runs[backend] = sample(var, vae, labels, seed=0, options=opts)
    for si in range(len(PN)):
        assert torch.equal(runs["triton"].indices[si], runs["torch"].indices[si]), f"scale {si}"
    assert runs["torch"].indices[-1].unique().numel() > 3  # diverse tokens, not a degenerate model
    # the teacher-forced forward goes through the block-causal kernel
    x_BLCv = vae.quantize.teacher_forcing_input(runs["torch"].flat(), PN)
    monkeypatch.setenv(attention_mod.ENV_BACKEND, "torch")
    ref = var.forward_teacher(labels, x_BLCv)
    monkeypatch.setenv(attention_mod.ENV_BACKEND, "triton")
    torch.testing.assert_close(var.forward_teacher(labels, x_BLCv), ref, rtol=1e-4, atol=1e-4)
    assert calls.count(True) == var.depth * len(PN) and calls.count(False) == var.depth  # cached steps, masked


@pytest.mark.skipif(not INTERPRET, reason="the CPU end-to-end check")
def test_tokenizer_encodes_identically_with_triton_code_search(tiny_models):
    _, vae = tiny_models
    img = torch.rand(2, 3, PN[-1] * vae.downsample, PN[-1] * vae.downsample, generator=torch.Generator().manual_seed(0))
    ref = vae.img_to_indices(img * 2 - 1)
    vae.quantize.code_search = "triton"
    try:
        out = vae.img_to_indices(img * 2 - 1)
    finally:
        vae.quantize.code_search = None
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
