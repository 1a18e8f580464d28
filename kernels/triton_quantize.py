"""Triton nearest-code search: distance and argmin fused, the ``N x V`` distance matrix never exists.

Imported by :func:`.triton_support.triton_status` (which checks that it builds), then by :mod:`.quantize` when
that says yes, and by :mod:`.triton_compile`.

Same specification as :func:`.quantize.nearest_code_torch`: ``argmin_v ||z_n||^2 + ||e_v||^2 - 2 z_n . e_v`` in
fp32 whatever the input dtype, ties to the lowest index. The squared norms come from torch exactly as in the
reference (one cheap pass over ``z`` and the codebook), so the only difference is the summation order of the
fp32 dot products (exact fp32 products, ``input_precision="ieee"``: TF32 would flip near ties). Each program
keeps, for its ``BLOCK_N`` latents, the running minimum and its index while it walks the codebook in
``BLOCK_V`` tiles; a later tile replaces the best only when strictly smaller, so the first minimum wins as in
``torch.argmin``. (A NaN latent gives index 0 here; torch would return the NaN's position.)

Devices: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (see :mod:`.triton_attention`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .triton_tuning import autotune, bench, keep_fitting

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPE = torch.float32  # what the kernel reads: other inputs are widened first
MAX_CHANNELS = 256  # one latent tile holds all channels: VAR has 32, Infinity's BSQ tokenizers do not come here
DEFAULT_BLOCKS = (16, 32)  # (BLOCK_N, BLOCK_V) without autotuning: the interpreter, tests
AUTOTUNE = not INTERPRET  # autotuning times compiled kernels; in the interpreter it would time the interpreter


@triton.jit
def _nearest_code_kernel(
    Z,
    E,
    Z_SQ,
    E_SQ,
    IDX,
    N,
    V,
    stride_zn,
    stride_zc,
    stride_ev,
    stride_ec,
    N_BUCKET,  # autotune key only
    C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    chans = tl.arange(0, BLOCK_C)
    codes = tl.arange(0, BLOCK_V)
    in_N = rows < N
    z = tl.load(
        Z + rows[:, None].to(tl.int64) * stride_zn + chans[None, :] * stride_zc,
        mask=in_N[:, None] & (chans[None, :] < C),
        other=0.0,
    ).to(tl.float32)
    z_sq = tl.load(Z_SQ + rows, mask=in_N, other=0.0)
    best_d = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + codes
        in_V = cols < V
        eT = tl.load(
            E + cols[None, :].to(tl.int64) * stride_ev + chans[:, None] * stride_ec,
            mask=in_V[None, :] & (chans[:, None] < C),
            other=0.0,
        ).to(tl.float32)  # (BLOCK_C, BLOCK_V)
        e_sq = tl.load(E_SQ + cols, mask=in_V, other=0.0)
        zeT = tl.dot(z, eT, input_precision="ieee")
        d = (z_sq[:, None] + e_sq[None, :]) - 2.0 * zeT
        d = tl.where(in_V[None, :], d, float("inf"))
        tile_d, tile_i = tl.min(d, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_d < best_d
        best_i = tl.where(better, tile_i + v0, best_i)
        best_d = tl.where(better, tile_d, best_d)
    tl.store(IDX + rows, best_i.to(tl.int64), mask=in_N)


def tile_configs() -> list[triton.Config]:
    """Every config the autotuner may run (pruning drops those whose shared memory does not fit the device).
    Any of them gives the same indices: the distances are sequential exact fp32 sums over the channels, whatever
    the tiles, and the first minimum wins."""
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w, num_stages=s)
        for bn, bv, w, s in [(32, 128, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4)]
    ]


def kernel_meta(C: int) -> dict:
    """The constexpr arguments of the kernel for ``C`` latent channels (all but the tiles)."""
    return {"C": C, "BLOCK_C": max(16, triton.next_power_of_2(C))}


def _prune(configs, named_args, **meta):
    return keep_fitting(_nearest_code_kernel, configs, named_args, meta)


_nearest_code_tuned = autotune(
    configs=tile_configs(), key=["N_BUCKET", "V", "C"], prune_configs_by={"early_config_prune": _prune},
    do_bench=bench, cache_results=True,
)(_nearest_code_kernel)


def supports(z_NC: torch.Tensor, codebook_VC: torch.Tensor) -> str | None:
    """``None`` when :func:`nearest_code_triton` handles these inputs, else why not."""
    if z_NC.dim() != 2 or codebook_VC.dim() != 2 or z_NC.shape[1] != codebook_VC.shape[1]:
        return f"expected z (N, C) and codebook (V, C), got {tuple(z_NC.shape)} and {tuple(codebook_VC.shape)}"
    if z_NC.dtype not in SUPPORTED_DTYPES or codebook_VC.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {z_NC.dtype}, {codebook_VC.dtype} not supported (fp32/fp16/bf16)"
    if z_NC.device != codebook_VC.device:
        return "z and codebook must be on one device"
    if INTERPRET and z_NC.device.type != "cpu":
        return "TRITON_INTERPRET=1 runs on CPU tensors only"
    if not INTERPRET and z_NC.device.type != "cuda":
        return f"the Triton kernel needs CUDA tensors, got {z_NC.device.type}"
    if not 1 <= z_NC.shape[1] <= MAX_CHANNELS:
        return f"{z_NC.shape[1]} channels not supported (1..{MAX_CHANNELS})"
    if codebook_VC.shape[0] == 0 or codebook_VC.shape[0] >= 2**31:
        return f"codebook size {codebook_VC.shape[0]} not supported"
    return None


def nearest_code_triton(
    z_NC: torch.Tensor,
    codebook_VC: torch.Tensor,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Index ``(N,)`` int64 of the nearest code for each row of ``z_NC`` ``(N, C)`` in ``codebook_VC``
    ``(V, C)``; any strides and float dtypes. ``out`` (int64 ``(N,)``) may be given; ``blocks=(BLOCK_N,
    BLOCK_V)`` skips autotuning."""
    why = supports(z_NC, codebook_VC)
    if why:
        raise ValueError(why)
    N, C = z_NC.shape
    V = codebook_VC.shape[0]
    if out is None:
        out = torch.empty(N, dtype=torch.int64, device=z_NC.device)
    elif out.shape != (N,) or out.dtype != torch.int64 or out.device != z_NC.device or (N and out.stride(0) != 1):
        raise ValueError(f"out must be a contiguous int64 ({N},) tensor on {z_NC.device}")
    if N == 0:
        return out
    # The kernel reads fp32 (KERNEL_DTYPE): 16-bit latents and codes are widened here, the values the kernel's
    # own conversion would give. Compiled for 16-bit loads it kept a 4-6 KiB stack per thread (docs/kernels.md).
    z_NC, codebook_VC = z_NC.to(KERNEL_DTYPE), codebook_VC.to(KERNEL_DTYPE)
    z_sq_N = z_NC.square().sum(dim=1).contiguous()  # as the reference computes them
    e_sq_V = codebook_VC.square().sum(dim=1).contiguous()
    args = (
        z_NC,
        codebook_VC,
        z_sq_N,
        e_sq_V,
        out,
        N,
        V,
        *z_NC.stride(),
        *codebook_VC.stride(),
        triton.next_power_of_2(N),
    )
    meta = kernel_meta(C)
    if blocks is None and AUTOTUNE:
        _nearest_code_tuned[lambda META: (triton.cdiv(N, META["BLOCK_N"]),)](*args, **meta)
    else:
        bn, bv = blocks or DEFAULT_BLOCKS
        _nearest_code_kernel[(triton.cdiv(N, bn),)](*args, **meta, BLOCK_N=bn, BLOCK_V=bv, num_warps=4)
    return out
