"""Ahead-of-time compilation of the Triton kernels for CUDA targets, on any machine: no GPU, no driver.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's whole pipeline and its
bundled ``ptxas``: PTX and a cubin for ``sm_<arch>``, and the shared memory one block needs
(``metadata.shared``). :func:`cases` lists every (kernel, dtype, head dim, config) the autotuners may run, from
the tables they use (:func:`.triton_attention.tile_configs`, :func:`.triton_quantize.tile_configs`);
:func:`compile_case` compiles one as a launch on contiguous tensors specialises it (16-byte aligned pointers, unit
last-dim strides, the other strides multiples of 16). Used by ``tests/test_triton_compile.py`` and
``bench/kernels_compile.py``. Needs Triton 3.3 or newer (``ASTSource`` with ``constexprs`` and per-argument
``attrs``) and a process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_attention, triton_quantize

# Shared memory one block may use (the opt-in maximum), by compute capability: A100, RTX 30, RTX 40 / L40, H100.
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
HEAD_DIMS = (64, 128)  # VAR, Infinity
LATENT_CHANNELS = 32  # VAR's tokenizer: the only caller of the nearest-code search
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNELS = ("scale_step", "interval", "ragged", "nearest_code")
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Case:
    """One kernel with one config: ``blocks`` is ``(BLOCK_M, BLOCK_N)`` for attention, ``(BLOCK_N, BLOCK_V)`` for
    the nearest-code search; ``dim`` the head dim or the latent channels."""

    kernel: str
    dtype: str
    dim: int
    blocks: tuple[int, int]
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        tile = f"{self.blocks[0]}x{self.blocks[1]}"
        return f"{self.kernel} {self.dtype} d{self.dim} {tile} w{self.num_warps} s{self.num_stages}"


@dataclass(frozen=True)
class Compiled:
    case: Case
    arch: int
    shared: int  # bytes per block
    ptx: str
    cubin: bytes
    seconds: float

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_MEMORY_LIMITS[self.arch]


def cases(kernels=KERNELS, dtypes=tuple(DTYPES)) -> list[Case]:
    """Every config the autotuners may run, for each kernel and dtype, at head dims 64 and 128 (attention) or
    VAR's 32 latent channels (nearest code, which always runs in fp32)."""
    out = []
    for kernel in kernels:
        for dtype in dtypes:
            if kernel == "nearest_code":
                if DTYPES[dtype] != triton_quantize.KERNEL_DTYPE:
                    continue  # widened before the launch: the kernel is compiled for fp32 only
                configs, dims = triton_quantize.tile_configs(), (LATENT_CHANNELS,)
                keys = ("BLOCK_N", "BLOCK_V")
            else:
                configs, dims = triton_attention.tile_configs(DTYPES[dtype]), HEAD_DIMS
                keys = ("BLOCK_M", "BLOCK_N")
            out += [
                Case(kernel, dtype, dim, tuple(c.kwargs[k] for k in keys), c.num_warps, c.num_stages)
                for dim in dims
                for c in configs
            ]
    return out


def _source(case: Case) -> ASTSource:
    dtype = DTYPES[case.dtype]
    elem = _TRITON_TYPES[dtype]
    if case.kernel == "nearest_code":
        fn = triton_quantize._nearest_code_kernel
        meta = {**triton_quantize.kernel_meta(case.dim), "BLOCK_N": case.blocks[0], "BLOCK_V": case.blocks[1]}
        pointers = {"Z": elem, "E": elem, "Z_SQ": "fp32", "E_SQ": "fp32", "IDX": "i64"}
        unit_strides = {"stride_zc", "stride_ec"}
    else:
        ragged = case.kernel == "ragged"
        fn = triton_attention._ragged_attn_fwd_kernel if ragged else triton_attention._attn_fwd_kernel
        meta = {**triton_attention.kernel_meta(dtype, case.dim), "BLOCK_M": case.blocks[0], "BLOCK_N": case.blocks[1]}
        if not ragged:
            meta["HAS_BOUNDS"] = case.kernel == "interval"
        pointers = {"Q": elem, "K": elem, "V": elem, "O": elem, "KV_START": "i32", "KV_END": "i32", "OFFSETS": "i64"}
        unit_strides = {"stride_qd", "stride_kd", "stride_vd", "stride_od"}
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in unit_strides:
            signature[name] = "constexpr"
            constexprs[name] = meta[name] if param.is_constexpr else 1
        elif name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


def compile_case(case: Case, arch: int) -> Compiled:
    """Compile ``case`` for ``sm_<arch>`` (PTX and cubin); raises what Triton or ``ptxas`` raise."""
    start = time.perf_counter()
    kernel = triton.compile(
        _source(case),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    seconds = time.perf_counter() - start
    return Compiled(case, arch, kernel.metadata.shared, kernel.asm["ptx"], kernel.asm["cubin"], seconds)
