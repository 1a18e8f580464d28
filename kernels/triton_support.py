"""Whether the Triton kernels are used: decided once per process for the install and once per CUDA device.

The pack never needs Triton: every kernel has a PyTorch path. :func:`triton_status` says whether the installed
Triton builds the kernel modules: it imports, it is :data:`MIN_TRITON` or newer, and :mod:`.triton_attention`
and :mod:`.triton_quantize` import with it (``triton.autotune`` gets only the keyword arguments the installed
version accepts: ``cache_results`` arrived in 3.4). :func:`triton_device_status` adds, once per CUDA device,
compute capability :data:`MIN_CAPABILITY` or newer and a first launch of the attention and nearest-code kernels
whose outputs match the PyTorch references. When either says no, the auto dispatch of :mod:`.attention`,
:mod:`.ragged` and :mod:`.quantize` uses PyTorch (SDPA for attention) and one warning names the reason: the
install's at load (``nodes``), a device's at its first use. Nothing raises. This module imports Triton only
inside :func:`triton_status`.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

import torch

MIN_TRITON = (3, 2)  # torch 2.6; 3.2 and 3.3 (torch 2.6, 2.7, triton-windows) lack autotune's cache_results
MIN_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores, cp.async; Turing and older fall back

log = logging.getLogger("NextScale")

_device_status: dict[int, tuple[bool, str]] = {}
_device_lock = threading.Lock()


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """``(available, detail)``: detail is Triton's version, or why the kernels cannot be built with it."""
    try:
        import triton
    except Exception as e:  # a missing or broken install must never break the pack
        return False, f"{type(e).__name__}: {e}"
    version = str(getattr(triton, "__version__", ""))
    parsed = _version_tuple(version)
    if parsed is None or parsed < MIN_TRITON:
        oldest = ".".join(map(str, MIN_TRITON))
        return False, f"Triton {version or '(no version)'} is older than {oldest}, the oldest the kernels support"
    try:
        from . import triton_attention, triton_quantize  # noqa: F401  (define the jitted and autotuned kernels)
    except Exception as e:
        return False, f"Triton {version} cannot build the kernels ({type(e).__name__}: {e})"
    return True, version


def triton_device_status(device: torch.device | str | int) -> tuple[bool, str]:
    """``(usable, detail)`` for a CUDA device, checked on the first call for that device and then remembered;
    a ``False`` logs one warning naming the reason and the PyTorch path."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the Triton kernels run on CUDA devices, not {device.type}"
    index = torch.cuda.current_device() if device.index is None else device.index
    with _device_lock:
        status = _device_status.get(index)
        if status is None:
            status = _device_status[index] = _check_device(torch.device("cuda", index))
            if not status[0] and triton_status()[0]:  # a missing Triton was reported at load already
                log.warning(
                    "NextScale: Triton kernels not used on cuda:%d (%s); attention runs on PyTorch SDPA and the "
                    "quantizer on PyTorch.", index, status[1],
                )
    return status


def use_triton(t: torch.Tensor) -> bool:
    """Whether the auto dispatch sends work on ``t``'s device to the Triton kernels."""
    return t.is_cuda and triton_device_status(t.device)[0]


def _check_device(device: torch.device) -> tuple[bool, str]:
    available, version = triton_status()
    if not available:
        return False, version
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if capability < MIN_CAPABILITY:
        need = ".".join(map(str, MIN_CAPABILITY))
        return False, f"{name} has compute capability {capability[0]}.{capability[1]}, the kernels need {need}"
    try:
        with torch.cuda.device(device):
            _first_launch(device)
    except Exception as e:  # a broken toolchain (no C compiler, ptxas), a miscompile, a driver too old
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"the first launch on {name} failed: {type(e).__name__}: {reason}"[:400]
    return True, f"Triton {version} on {name} (compute capability {capability[0]}.{capability[1]})"


def _first_launch(device: torch.device) -> None:
    """Run each kernel once on small inputs through the path sampling takes (autotuned fp16 attention with both
    query tiles, with and without a mask; nearest-code search) and compare with the PyTorch references computed
    on the CPU (no TF32 there); raise on any failure or mismatch."""
    import torch.nn.functional as F

    from .attention import attention_torch, block_causal_mask
    from .triton_attention import attention_triton
    from .triton_quantize import nearest_code_triton

    g = torch.Generator().manual_seed(0)  # never the global generator: the probe must not move anyone's seed
    for L in (5, 39):  # the 16-query and the 64-query tiles
        q = F.normalize(torch.randn(1, 2, L, 64, generator=g), dim=-1) * 10.0
        k = F.normalize(torch.randn(1, 2, L, 64, generator=g), dim=-1)
        v = torch.randn(1, 2, L, 64, generator=g)
        q16, k16, v16 = (t.to(device, torch.float16) for t in (q, k, v))
        for mask in (None, block_causal_mask((1, 2, 3, 5))[:L, :L]):
            ref = attention_torch(q16.cpu().float(), k16.cpu().float(), v16.cpu().float(), mask)
            out = attention_triton(q16, k16, v16, None if mask is None else mask.to(device))
            err = (out.cpu().float() - ref).abs().max().item()
            if not err <= 1e-2:
                raise RuntimeError(f"attention differs from the reference by {err:.3g} (L={L})")
    codebook = torch.randn(100, 32, generator=g)
    idx = torch.randint(100, (37,), generator=g)
    z = codebook[idx] + 0.01 * torch.randn(37, 32, generator=g)  # unambiguous nearest codes
    if not torch.equal(nearest_code_triton(z.to(device), codebook.to(device)).cpu(), idx):
        raise RuntimeError("nearest-code search differs from the reference")
