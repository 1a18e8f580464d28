"""Nearest-code search: the one hot spot of residual quantisation.

``nearest_code(z_NC, codebook_VC)`` returns, for each of the ``N`` latent vectors, the index of the
closest of the ``V`` code vectors in L2 (VAR uses no z-normalisation). The distance is evaluated in
VAR's form ``||z||^2 + ||e||^2 - 2 z.e`` in fp32, so that ties and near-ties resolve as upstream.

Backends register in ``_BACKENDS``; ``backend=None`` picks the best one available for the inputs: the fused
Triton kernel (:mod:`.triton_quantize`, listed only when Triton imports) for inputs it supports on a CUDA device
that passed :func:`.triton_support.triton_device_status`, else torch.
The torch reference below is the specification every faster backend must match.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import triton_support

# Distance entries (N_chunk x V) evaluated at once by the torch reference: 2**24 fp32 = 64 MiB.
MAX_CHUNK_ELEMENTS = 1 << 24


def nearest_code_torch(z_NC: torch.Tensor, codebook_VC: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Reference: argmin_v ||z_n - e_v||^2 in fp32, over row chunks of ``chunk_rows`` latents
    (default: as many as fit ``MAX_CHUNK_ELEMENTS`` distances), so the full N x V matrix never exists."""
    e_VC = codebook_VC.float()
    e_sq_V = e_VC.square().sum(dim=1)
    rows = chunk_rows or max(1, MAX_CHUNK_ELEMENTS // e_VC.shape[0])
    idx_N = torch.empty(z_NC.shape[0], dtype=torch.long, device=z_NC.device)
    for start in range(0, z_NC.shape[0], rows):
        z_nC = z_NC[start : start + rows].float()
        d_nV = z_nC.square().sum(dim=1, keepdim=True) + e_sq_V
        d_nV.addmm_(z_nC, e_VC.T, alpha=-2.0, beta=1.0)
        idx_N[start : start + rows] = d_nV.argmin(dim=1)
    return idx_N


def nearest_code_triton(z_NC: torch.Tensor, codebook_VC: torch.Tensor) -> torch.Tensor:
    """Distance and argmin fused in one Triton kernel (imported on first use; see :mod:`.triton_quantize`)."""
    from .triton_quantize import nearest_code_triton as triton_fn

    return triton_fn(z_NC, codebook_VC)


_BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "torch": nearest_code_torch,
    "triton": nearest_code_triton,
}


def available_backends() -> list[str]:
    """Names accepted by ``nearest_code(..., backend=name)``."""
    return [name for name in _BACKENDS if name != "triton" or triton_support.triton_status()[0]]


def _default_backend(z_NC: torch.Tensor, codebook_VC: torch.Tensor) -> str:
    # The fused kernel is preferred for inputs it supports on a device that passed the Triton checks.
    if triton_support.use_triton(z_NC):
        from .triton_quantize import supports

        if supports(z_NC, codebook_VC) is None:
            return "triton"
    return "torch"


def nearest_code(z_NC: torch.Tensor, codebook_VC: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Index ``(N,)`` int64 of the nearest code for each row of ``z_NC`` ``(N, C)`` in ``codebook_VC`` ``(V, C)``."""
    if z_NC.dim() != 2 or codebook_VC.dim() != 2 or z_NC.shape[1] != codebook_VC.shape[1]:
        raise ValueError(
            f"nearest_code expects z (N, C) and codebook (V, C), got {tuple(z_NC.shape)} and {tuple(codebook_VC.shape)}"
        )
    name = backend or _default_backend(z_NC, codebook_VC)
    if name not in _BACKENDS or (name == "triton" and not triton_support.triton_status()[0]):
        raise ValueError(f"unknown nearest-code backend {name!r}; available: {', '.join(available_backends())}")
    return _BACKENDS[name](z_NC, codebook_VC)
