"""Triton kernels for VAR's cos-attention: scale steps over the KV cache, block-causal prefill, ragged caches.

Imported by :func:`.triton_support.triton_status` (which checks that it builds), then by the dispatch of
:mod:`.attention` and :mod:`.ragged` when that says yes, and by :mod:`.triton_compile`; nothing else in the pack
needs Triton.

Convention (the one of :func:`.attention.attention`): ``q`` is already L2-normalised over the head dim and
multiplied by the per-head scale ``exp(min(scale_mul, ln 100))``, ``k`` is L2-normalised, and the softmax
scale is **1**::

    out_BHLc = softmax(q_BHLc @ k_BHSc^T) @ v_BHSc        (restricted to each query row's allowed keys)

The kernels take the normalised ``q``/``k`` rather than the raw projections: the cache stores normalised keys
(normalising inside would redo that work for every cached key at every scale), the dispatch signature is shared
with the torch and SDPA backends, and the normalisation of the current scale's queries is one cheap elementwise
pass next to the attention itself.

Kernels (all forward only: no autograd; :func:`supports` sends anything that needs a gradient elsewhere):

- :func:`scale_step_attention` -- queries of the current scale against every cached key (no mask).
- :func:`interval_attention` -- query row ``i`` attends to keys ``[kv_start_L[i], kv_end_L[i])``; key tiles
  outside a query tile's union of ranges are skipped, tiles inside every row's range run unmasked, only the
  boundary tiles are masked (HMAR's design, re-implemented from its description).
- :func:`block_causal_attention` -- VAR's teacher-forcing mask as intervals: each query attends to every token
  of its own and coarser scales (``[0, end of its scale)``), so most of the upper triangle is never loaded.
- :func:`ragged_attention_triton` -- per ``(batch, head)`` a different number of keys, packed as
  ``k_packed (total, c)`` with ``offsets (B*H + 1,)`` (layout helpers and the torch reference:
  :mod:`.ragged`).

Numerics: scores and softmax in fp32 (online softmax with ``exp2``), ``P`` rounded to the input dtype for the
``P @ V`` product as in FlashAttention, the output in the input dtype. fp32 inputs use exact fp32 dots
(``input_precision="ieee"``, never TF32: VAR's scores reach 100, where TF32 would move a logit by ~0.1). A query
row with no allowed key (an empty ragged head) gets zeros.

Tiles and tuning: fixed by dtype and the number of queries, so that no sum's order depends on timings; autotuning
picks only the pipelining stages that fit the device's shared memory (:data:`KEY_TILE` and below,
:mod:`.triton_tuning`). :mod:`.triton_compile` compiles every config for sm_80-sm_90 without a GPU.

Devices: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was first imported (the
CI parity tests). The interpreter multiplies bf16 operands wrongly (it feeds their raw bits to numpy), so there
bf16 operands are widened to fp32 before each dot, which computes the same exact products.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .attention import IntervalMask, scale_row_bounds
from .triton_tuning import autotune, bench, keep_fitting

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # VAR: 64, Infinity: 128; wider tiles would not fit shared memory in fp32
MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension, which carries batch * heads
LOG2E = math.log2(math.e)

# Used when not autotuning (the interpreter, or a forced config): small tiles, so odd sizes span several tiles.
DEFAULT_BLOCKS = (16, 16)
# Autotuning times compiled kernels; in the interpreter it would time the interpreter, so it is off there.
AUTOTUNE = not INTERPRET

# Tiles. The key tile BLOCK_N sets the order in which a query row's keys are summed (one online-softmax step per
# tile); the query tile BLOCK_M and the warps set the layout in which each step's row sums are reduced (and, on
# sm_90, whether the products run on wgmma or mma). All three are fixed here, by dtype and by the number of
# queries, never chosen by timing, so a seed gives the same tokens after a restart and on every card of one kind.
# Autotuning chooses only num_stages (software pipelining: when tiles are loaded, not what is added in which
# order), among the stages whose shared memory fits the device.
KEY_TILE = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}  # BLOCK_N
# BLOCK_M: 16 for up to 16 queries (the first scales: 1, 4, 9, 16 tokens), else the larger tile. fp32 products run
# on CUDA cores (exact fp32), where a 64-row tile holds more than the registers (it spills): fp32 keeps 16 rows.
QUERY_TILES = {torch.float16: (16, 64), torch.bfloat16: (16, 64), torch.float32: (16,)}
NUM_WARPS = 4
# Pipelining stages tried. fp16/bf16 tiles feed tensor cores and take the same shared memory at any stage count
# (Triton 3.8 does not pipeline these loops), so they use one; fp32 tiles are pipelined, and tuned.
STAGES = {torch.float16: (2,), torch.bfloat16: (2,), torch.float32: (1, 2)}


def query_tile(dtype: torch.dtype, L: int) -> int:
    """BLOCK_M for ``L`` queries of ``dtype``."""
    tiles = QUERY_TILES[dtype]
    return tiles[0] if L <= tiles[0] else tiles[-1]


def tile_configs(dtype: torch.dtype) -> list[triton.Config]:
    """Every config the autotuner may run for inputs of ``dtype``, whatever the device (pruning then drops the
    stages whose shared memory does not fit it)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": KEY_TILE[dtype]}, num_warps=NUM_WARPS, num_stages=stages)
        for bm in QUERY_TILES[dtype]
        for stages in STAGES[dtype]
    ]


def _pruner(kernel):
    """The ``early_config_prune`` of ``kernel``: the configs of the query tile for ``L``, the dtype's key tile
    and stages, that fit the device's shared memory."""

    def prune(configs, named_args, **meta):
        dtype = named_args["Q"].dtype
        bm = query_tile(dtype, int(named_args["L"]))
        wanted = [
            c for c in configs
            if c.kwargs["BLOCK_M"] == bm and c.kwargs["BLOCK_N"] == KEY_TILE[dtype] and c.num_stages in STAGES[dtype]
        ]
        return keep_fitting(kernel, wanted, named_args, meta)

    return prune


def _bucket(n: int) -> int:
    """Autotune key: the next power of two, so the ten scales of a schedule share a handful of tunings."""
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``UPCAST`` widens both operands first (the interpreter's bf16)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attn_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    offs_n,
    offs_d,
    n_start,
    n_stop,
    S,
    row_lo,
    row_hi,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online-softmax update over the key tiles starting at ``n_start, n_start + BLOCK_N, ... < n_stop``.

    ``MASK`` 0: every key of every tile is allowed (no bound checks at all); 1: keys ``< S`` are allowed;
    2: key ``j`` is allowed for row ``i`` when ``row_lo[i] <= j < row_hi[i]`` (bounds already clipped to
    ``[0, S]``). Scores are in log2 units (``q . k * log2 e``)."""
    for n0 in range(n_start, n_stop, BLOCK_N):
        cols = n0 + offs_n
        k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd  # (D, BLOCK_N): k^T
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if MASK == 0:
            if EVEN_D:
                kT = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                kT = tl.load(k_ptrs, mask=offs_d[:, None] < D, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            in_S = cols < S
            if EVEN_D:
                kT = tl.load(k_ptrs, mask=in_S[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=in_S[:, None], other=0.0)
            else:
                kT = tl.load(k_ptrs, mask=in_S[None, :] & (offs_d[:, None] < D), other=0.0)
                v = tl.load(v_ptrs, mask=in_S[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _mma(q, kT, PRECISION, UPCAST) * 1.4426950408889634  # log2(e): exp2 below
        if MASK == 1:
            s = tl.where(in_S[None, :], s, float("-inf"))
        if MASK == 2:
            allowed = (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK == 0:
            m_use = m_new
        else:  # a row with no allowed key so far keeps m = -inf; subtract 0 instead (exp2(-inf) = 0, no NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mma(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    KV_START,
    KV_END,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    L,
    S,
    L_BUCKET,  # autotune key only
    S_BUCKET,  # autotune key only
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    HAS_BOUNDS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch * head). Without bounds every query sees keys ``[0, S)``; with
    bounds, query ``i`` sees ``[KV_START[i], KV_END[i])`` and the tile visits only the union of its rows' ranges:
    masked leading tiles, unmasked tiles common to every row, masked trailing tiles."""
    pid_bh = tl.program_id(1)
    if HAS_BOUNDS:  # heaviest (latest-scale) query tiles first: better balance when tiles are skipped
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_L = offs_m < L

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=in_L[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=in_L[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_BOUNDS:
        row_lo = tl.maximum(tl.load(KV_START + offs_m, mask=in_L, other=0), 0)
        row_hi = tl.minimum(tl.load(KV_END + offs_m, mask=in_L, other=0), S)
        row_hi = tl.where(in_L, row_hi, 0)  # padding rows: empty range, they take no part in the bounds
        lo = tl.min(tl.where(in_L, row_lo, S), 0)
        hi = tl.max(row_hi, 0)
        common_lo = tl.max(tl.where(in_L, row_lo, 0), 0)
        common_hi = tl.min(tl.where(in_L, row_hi, S), 0)
        n_first = (lo // BLOCK_N) * BLOCK_N
        n_full_lo = tl.maximum(n_first, tl.minimum(tl.cdiv(common_lo, BLOCK_N), tl.cdiv(hi, BLOCK_N)) * BLOCK_N)
        n_full_hi = tl.maximum(n_full_lo, (common_hi // BLOCK_N) * BLOCK_N)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_n, offs_d, n_first, n_full_lo, S, row_lo, row_hi,
                                    D, BLOCK_N, EVEN_D, 2, PRECISION, UPCAST)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_n, offs_d, n_full_lo, n_full_hi, S, row_lo, row_hi,
                                    D, BLOCK_N, EVEN_D, 0, PRECISION, UPCAST)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_n, offs_d, n_full_hi, hi, S, row_lo, row_hi,
                                    D, BLOCK_N, EVEN_D, 2, PRECISION, UPCAST)
    else:
        n_full = (S // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_n, offs_d, 0, n_full, S, offs_m, offs_m,
                                    D, BLOCK_N, EVEN_D, 0, PRECISION, UPCAST)
        acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                    offs_n, offs_d, n_full, S, S, offs_m, offs_m,
                                    D, BLOCK_N, EVEN_D, 1, PRECISION, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no allowed key: acc = 0 -> zeros
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_L[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_L[:, None] & (offs_d[None, :] < D))


@triton.jit
def _ragged_attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    OFFSETS,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    L,
    L_BUCKET,  # autotune key only
    S_BUCKET,  # autotune key only (the mean keys per head)
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch * head); head ``bh`` owns packed keys ``[OFFSETS[bh], OFFSETS[bh+1])``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_start = tl.load(OFFSETS + pid_bh).to(tl.int64)
    n_keys = (tl.load(OFFSETS + pid_bh + 1).to(tl.int64) - kv_start).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_L = offs_m < L

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=in_L[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=in_L[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + kv_start * stride_kt
    v_base = V + kv_start * stride_vt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (n_keys // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                offs_n, offs_d, 0, n_full, n_keys, offs_m, offs_m,
                                D, BLOCK_N, EVEN_D, 0, PRECISION, UPCAST)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                offs_n, offs_d, n_full, n_keys, n_keys, offs_m, offs_m,
                                D, BLOCK_N, EVEN_D, 1, PRECISION, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty head: zeros
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if EVEN_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_L[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_L[:, None] & (offs_d[None, :] < D))


def _tuned(kernel, key: list[str]):
    """``kernel`` autotuned over the configs of every dtype; its pruning keeps those of the launch's dtype and
    query tile that fit the device."""
    configs = [c for dtype in SUPPORTED_DTYPES for c in tile_configs(dtype)]
    unique = list({str(c): c for c in configs}.values())
    return autotune(
        configs=unique, key=key, prune_configs_by={"early_config_prune": _pruner(kernel)}, do_bench=bench,
        cache_results=True,
    )(kernel)


_attn_fwd_tuned = _tuned(_attn_fwd_kernel, ["L_BUCKET", "S_BUCKET", "D", "HAS_BOUNDS"])
_ragged_attn_fwd_tuned = _tuned(_ragged_attn_fwd_kernel, ["L_BUCKET", "S_BUCKET", "D"])


# ----------------------------------------------------------------------------------------------------------------
# wrappers


def _device_ok(t: torch.Tensor) -> str | None:
    if INTERPRET:
        return None if t.device.type == "cpu" else "TRITON_INTERPRET=1 runs on CPU tensors only"
    return None if t.device.type == "cuda" else f"Triton kernels need CUDA tensors, got {t.device.type}"


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape (B, H, L|S, c), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, _, c = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H) or k.shape[2] != v.shape[2] or k.shape[3] != c or v.shape[3] != c:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need k, v (B, H, S, c)")
    _check_common(q, (k, v), c, B * H)


def _check_common(q: torch.Tensor, others: Sequence[torch.Tensor], c: int, bh: int) -> None:
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in others):
        raise ValueError(f"dtypes must all be one of fp32/fp16/bf16, got {q.dtype}, {[t.dtype for t in others]}")
    if any(t.device != q.device for t in others):
        raise ValueError("q, k, v must be on one device")
    why = _device_ok(q)
    if why:
        raise ValueError(why)
    if not 1 <= c <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {c} not supported (1..{MAX_HEAD_DIM})")
    if bh > MAX_GRID_Y:
        raise ValueError(f"batch * heads = {bh} exceeds the grid limit {MAX_GRID_Y}")


def _out_for(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    return out


def kernel_meta(dtype: torch.dtype, c: int) -> dict:
    """The constexpr arguments both attention kernels take for inputs of ``dtype`` and head dim ``c`` (all but
    the tiles and ``HAS_BOUNDS``). fp32 inputs get exact fp32 products ("ieee"); fp16/bf16 products are exact on
    tensor cores anyway."""
    block_d = max(16, triton.next_power_of_2(c))
    return {
        "D": c,
        "BLOCK_D": block_d,
        "EVEN_D": c == block_d,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
    }


def _blocks_kwargs(blocks: tuple[int, int] | None) -> dict | None:
    """Explicit tile sizes (the interpreter, tests, benchmarks) or ``None`` to autotune."""
    if blocks is None and AUTOTUNE:
        return None
    bm, bn = blocks or DEFAULT_BLOCKS
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"blocks must be powers of two >= 16, got {(bm, bn)}")
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2}


def _launch_dense(q, k, v, out, kv_start_L, kv_end_L, blocks):
    B, H, L, c = q.shape
    S = k.shape[2]
    if L == 0:
        return out
    if S == 0:  # no key at all: zeros, as for an empty ragged head
        return out.zero_()
    has_bounds = kv_start_L is not None
    dummy = q.new_empty(0, dtype=torch.int32) if not has_bounds else None
    args = (
        q, k, v, out,
        kv_start_L if has_bounds else dummy, kv_end_L if has_bounds else dummy,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, L, S, _bucket(L), _bucket(S),
    )
    meta = {**kernel_meta(q.dtype, c), "HAS_BOUNDS": has_bounds}
    forced = _blocks_kwargs(blocks)
    if forced is None:
        _attn_fwd_tuned[lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H)](*args, **meta)
    else:
        _attn_fwd_kernel[(triton.cdiv(L, forced["BLOCK_M"]), B * H)](*args, **meta, **forced)
    return out


def scale_step_attention(
    q_BHLc: torch.Tensor,
    k_BHSc: torch.Tensor,
    v_BHSc: torch.Tensor,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dense attention of ``L`` queries over ``S`` keys (the current scale against the whole cache), for every
    ``(B, H)`` row (CFG rows are just batch rows). Any strides; ``out`` (``q``'s shape and dtype) may be given.
    ``blocks=(BLOCK_M, BLOCK_N)`` skips autotuning."""
    _check_qkv(q_BHLc, k_BHSc, v_BHSc)
    return _launch_dense(q_BHLc, k_BHSc, v_BHSc, _out_for(q_BHLc, out), None, None, blocks)


def interval_attention(
    q_BHLc: torch.Tensor,
    k_BHSc: torch.Tensor,
    v_BHSc: torch.Tensor,
    kv_start_L: torch.Tensor,
    kv_end_L: torch.Tensor,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Query ``i`` attends to keys ``[kv_start_L[i], kv_end_L[i])`` (int32, shared by every batch row and head;
    clipped to ``[0, S)``; an empty range gives zeros). Block-causal: start 0, end = end of the query's scale;
    block-diagonal (HMAR): start = start of the query's scale."""
    _check_qkv(q_BHLc, k_BHSc, v_BHSc)
    L = q_BHLc.shape[2]
    for name, t in (("kv_start_L", kv_start_L), ("kv_end_L", kv_end_L)):
        if t.shape != (L,) or t.dtype != torch.int32 or t.device != q_BHLc.device or t.stride(0) != 1:
            raise ValueError(f"{name} must be a contiguous int32 ({L},) tensor on {q_BHLc.device}")
    return _launch_dense(q_BHLc, k_BHSc, v_BHSc, _out_for(q_BHLc, out), kv_start_L, kv_end_L, blocks)


def block_causal_attention(
    q_BHLc: torch.Tensor,
    k_BHLc: torch.Tensor,
    v_BHLc: torch.Tensor,
    patch_nums: Sequence[int],
    out: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Full-sequence (teacher forcing, calibration, prefill) attention with VAR's block-causal mask: every query
    attends to all tokens of its own and coarser scales. ``L`` may be a prefix of the schedule's tokens."""
    start, end = scale_row_bounds(patch_nums, q_BHLc.shape[2], q_BHLc.device)
    return interval_attention(q_BHLc, k_BHLc, v_BHLc, start, end, out=out, blocks=blocks)


def _check_ragged(q_BHLc, k_packed_Tc, v_packed_Tc, offsets) -> None:
    if q_BHLc.dim() != 4 or k_packed_Tc.dim() != 2 or v_packed_Tc.dim() != 2:
        raise ValueError(
            f"expected q (B, H, L, c), k_packed/v_packed (total, c), got {tuple(q_BHLc.shape)}, "
            f"{tuple(k_packed_Tc.shape)}, {tuple(v_packed_Tc.shape)}"
        )
    B, H, _, c = q_BHLc.shape
    if k_packed_Tc.shape != v_packed_Tc.shape or k_packed_Tc.shape[1] != c:
        raise ValueError(f"k_packed {tuple(k_packed_Tc.shape)}, v_packed {tuple(v_packed_Tc.shape)}: need (total, {c})")
    if offsets.shape != (B * H + 1,) or offsets.dtype not in (torch.int32, torch.int64) or offsets.stride(0) != 1:
        raise ValueError(
            f"offsets must be a contiguous int32/int64 ({B * H + 1},) tensor, "
            f"got {tuple(offsets.shape)} {offsets.dtype}"
        )
    if offsets.device != q_BHLc.device:
        raise ValueError("offsets must be on q's device")
    _check_common(q_BHLc, (k_packed_Tc, v_packed_Tc), c, B * H)


def supports_ragged(q_BHLc, k_packed_Tc, v_packed_Tc, offsets) -> str | None:
    """``None`` when :func:`ragged_attention_triton` handles these inputs, else the reason it does not."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHLc, k_packed_Tc, v_packed_Tc)):
        return "the Triton kernels are forward only (inputs require grad)"
    try:
        _check_ragged(q_BHLc, k_packed_Tc, v_packed_Tc, offsets)
    except ValueError as e:
        return str(e)
    return None


def ragged_attention_triton(
    q_BHLc: torch.Tensor,
    k_packed_Tc: torch.Tensor,
    v_packed_Tc: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention of ``q_BHLc`` over per-head key sets of different lengths: head ``(b, h)`` (flat index
    ``b * H + h``) owns rows ``offsets[bh] : offsets[bh + 1]`` of ``k_packed``/``v_packed`` ``(total, c)``.
    ``offsets`` is ``(B*H + 1,)`` int32 or int64, non-decreasing, from 0 (see :mod:`.ragged`; values are not
    checked here, to avoid a device sync). An empty head gives zeros."""
    _check_ragged(q_BHLc, k_packed_Tc, v_packed_Tc, offsets)
    B, H, L, c = q_BHLc.shape
    out = _out_for(q_BHLc, out)
    if L == 0 or B * H == 0:
        return out
    if k_packed_Tc.shape[0] == 0:  # every head empty
        return out.zero_()
    args = (
        q_BHLc, k_packed_Tc, v_packed_Tc, out, offsets,
        *q_BHLc.stride(), *k_packed_Tc.stride(), *v_packed_Tc.stride(), *out.stride(),
        H, L, _bucket(L), _bucket(k_packed_Tc.shape[0] // max(B * H, 1)),
    )
    meta = kernel_meta(q_BHLc.dtype, c)
    forced = _blocks_kwargs(blocks)
    if forced is None:
        _ragged_attn_fwd_tuned[lambda META: (triton.cdiv(L, META["BLOCK_M"]), B * H)](*args, **meta)
    else:
        _ragged_attn_fwd_kernel[(triton.cdiv(L, forced["BLOCK_M"]), B * H)](*args, **meta, **forced)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the dispatch backend: attention(q, k, v, attn_mask) with an additive mask


_MASK_CACHE: OrderedDict = OrderedDict()
_MASK_CACHE_SIZE = 8


def row_bounds_from_mask(attn_mask: torch.Tensor, L: int, S: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(kv_start_L, kv_end_L)`` int32 when the additive mask (0 / -inf, shape ``(L, S)`` or with leading
    singleton dims) allows each query exactly one non-empty interval of keys, else ``None``.

    An :class:`.attention.IntervalMask` gives its own bounds (nothing is read). Any other mask is read, a device
    sync; the result is cached per mask tensor (kept alive by the cache, so its address cannot be reused) and
    checked against its version counter, which an in-place change bumps. Tensors made under
    ``torch.inference_mode`` have no version counter: their bounds are read again at every call."""
    if isinstance(attn_mask, IntervalMask):
        return attn_mask.bounds if attn_mask.shape[-2:] == (L, S) else None
    while attn_mask.dim() > 2 and attn_mask.shape[0] == 1:
        attn_mask = attn_mask[0]
    if attn_mask.shape != (L, S) or not attn_mask.is_floating_point():
        return None
    if attn_mask.is_inference():
        return _read_row_bounds(attn_mask)
    key = (attn_mask.data_ptr(), tuple(attn_mask.shape), attn_mask.stride(), attn_mask.dtype, attn_mask.device)
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[1] == attn_mask._version:
        _MASK_CACHE.move_to_end(key)
        return hit[2]
    bounds = _read_row_bounds(attn_mask)
    _MASK_CACHE[key] = (attn_mask, attn_mask._version, bounds)
    while len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return bounds


def _read_row_bounds(mask_LS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    L, S = mask_LS.shape
    allowed_LS = mask_LS == 0
    if L == 0 or S == 0 or not bool((allowed_LS | (mask_LS == float("-inf"))).all()):
        return None
    ar_S = torch.arange(S, device=mask_LS.device)
    any_L = allowed_LS.any(dim=1)
    start_L = allowed_LS.int().argmax(dim=1)
    end_L = S - allowed_LS.flip(1).int().argmax(dim=1)
    interval_LS = (ar_S >= start_L[:, None]) & (ar_S < end_L[:, None])
    if not (bool(any_L.all()) and bool((interval_LS == allowed_LS).all())):  # an empty row would be NaN upstream
        return None
    return start_L.to(torch.int32).contiguous(), end_L.to(torch.int32).contiguous()


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> str | None:
    """``None`` when :func:`attention_triton` handles these inputs, else the reason it does not."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "the Triton kernels are forward only (inputs require grad)"
    try:
        _check_qkv(q, k, v)
    except ValueError as e:
        return str(e)
    if attn_mask is not None and row_bounds_from_mask(attn_mask, q.shape[2], k.shape[2]) is None:
        return "the mask is not one interval of allowed keys per query (0 / -inf)"
    return None


def attention_triton(q_BHLc, k_BHSc, v_BHSc, attn_mask=None) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`.attention.attention`: no mask -> :func:`scale_step_attention`; an
    interval mask such as VAR's block-causal one -> :func:`interval_attention` with tile skipping."""
    if attn_mask is None:
        return scale_step_attention(q_BHLc, k_BHSc, v_BHSc)
    bounds = row_bounds_from_mask(attn_mask, q_BHLc.shape[2], k_BHSc.shape[2])
    if bounds is None:
        raise ValueError(
            "the triton attention backend takes no mask or a mask allowing one interval of keys per query "
            f"(0 inside, -inf outside), e.g. the block-causal mask; got {tuple(attn_mask.shape)}"
        )
    return interval_attention(q_BHLc, k_BHSc, v_BHSc, *bounds)
