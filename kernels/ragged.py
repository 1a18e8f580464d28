"""Ragged KV caches: per (batch row, head) a different number of kept keys, in one packed layout.

Compressed caches (HACK's per-head budgets, HeatKV's pruned head x scale segments, ScaleKV-style selection done
per head) keep a different number of tokens in each head. Padding them to the longest head wastes memory and
bandwidth; the packed layout does not::

    k_packed_Tc, v_packed_Tc   (total, c)    the kept keys / values of head (0, 0), then (0, 1), ... (B-1, H-1)
    offsets                    (B*H + 1,)    int32 or int64; head bh = b * H + h owns rows offsets[bh]:offsets[bh+1]

``offsets[0] == 0``, non-decreasing, ``offsets[-1] == total``. A head may be empty (its queries get zeros: a
softmax over no keys has no value; zeros are what the kernels write) or hold one key (its queries get that
value). Queries stay dense ``(B, H, L, c)``: every head of the current scale has all of its queries.

This module is pure torch (the Triton kernel lives in :mod:`.triton_attention` and is imported only when used):
layout helpers, the reference :func:`ragged_attention_torch` (the specification), a padded SDPA fallback, and
the dispatch :func:`ragged_attention`, which honours ``NEXTSCALE_ATTENTION_BACKEND`` like
:func:`.attention.attention`. The attention convention is the pack's: normalised, pre-scaled ``q``, normalised
``k``, softmax scale 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import triton_support
from .attention import ENV_BACKEND

RaggedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def lengths_to_offsets(lengths_BH: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``(B*H + 1,)`` offsets of the packed layout from the per-head key counts ``(B, H)`` (or flat)."""
    lengths = lengths_BH.reshape(-1).to(torch.int64)
    return torch.cat((lengths.new_zeros(1), lengths.cumsum(0))).to(dtype)


def check_offsets(offsets: torch.Tensor, num_heads_total: int, total: int) -> None:
    """Raise ``ValueError`` unless ``offsets`` is a valid packed layout for ``num_heads_total = B*H`` heads over
    ``total`` packed rows (reads the values: a device sync on GPU)."""
    if offsets.shape != (num_heads_total + 1,) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"offsets must be int32/int64 ({num_heads_total + 1},), got {tuple(offsets.shape)} {offsets.dtype}"
        )
    o = offsets.to(torch.int64)
    if int(o[0]) != 0 or int(o[-1]) != total or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"offsets must start at 0, never decrease and end at {total} (the packed rows)")


def pack_kv(
    k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, keep_BHS: torch.Tensor, offsets_dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k_packed, v_packed, offsets)`` of the keys and values where ``keep_BHS`` (bool) is set, in their order."""
    if keep_BHS.shape != k_BHSc.shape[:3] or keep_BHS.dtype != torch.bool or v_BHSc.shape[:3] != k_BHSc.shape[:3]:
        raise ValueError(
            f"keep_BHS must be bool {tuple(k_BHSc.shape[:3])}, got {tuple(keep_BHS.shape)} {keep_BHS.dtype}"
        )
    return k_BHSc[keep_BHS], v_BHSc[keep_BHS], lengths_to_offsets(keep_BHS.sum(dim=2), offsets_dtype)


def pack_kv_prefix(
    k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, lengths_BH: torch.Tensor, offsets_dtype: torch.dtype = torch.int64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the first ``lengths_BH[b, h]`` keys and values of each head."""
    S = k_BHSc.shape[2]
    keep_BHS = torch.arange(S, device=k_BHSc.device) < lengths_BH.to(k_BHSc.device)[..., None]
    return pack_kv(k_BHSc, v_BHSc, keep_BHS, offsets_dtype)


def packed_heads(offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(head_T, pos_T)``: the flat head ``b * H + h`` of each of the ``total`` packed rows and the row's position
    within its head, computed on the offsets' device (``total`` comes from the host: nothing is read back)."""
    o = offsets.to(torch.int64)
    head_T = torch.repeat_interleave(torch.arange(o.shape[0] - 1, device=o.device), o[1:] - o[:-1], output_size=total)
    return head_T, torch.arange(total, device=o.device) - o[head_T]


def unpack_kv(
    k_packed_Tc: torch.Tensor,
    v_packed_Tc: torch.Tensor,
    offsets: torch.Tensor,
    B: int,
    H: int,
    longest: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ``(k_BHSc, v_BHSc, valid_BHS)`` with ``S`` = the longest head (padding is zeros, ``valid`` False).
    ``longest``: that length when the caller knows it on the host (else it is read from the offsets: a device sync
    on GPU)."""
    o = offsets.to(device=k_packed_Tc.device, dtype=torch.int64)
    lengths = o[1:] - o[:-1]
    S = longest if longest is not None else int(lengths.max()) if lengths.numel() else 0
    total, c = k_packed_Tc.shape
    head_T, pos_T = packed_heads(o, total)
    k_pad = k_packed_Tc.new_zeros(B * H, S, c)
    v_pad = v_packed_Tc.new_zeros(B * H, S, v_packed_Tc.shape[1])
    k_pad[head_T, pos_T] = k_packed_Tc
    v_pad[head_T, pos_T] = v_packed_Tc
    valid = torch.arange(S, device=o.device) < lengths[:, None]
    return k_pad.view(B, H, S, c), v_pad.view(B, H, S, v_packed_Tc.shape[1]), valid.view(B, H, S)


def ragged_attention_torch(
    q_BHLc: torch.Tensor, k_packed_Tc: torch.Tensor, v_packed_Tc: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Reference (the specification): head by head, scores and softmax in fp32, output in ``q``'s dtype;
    an empty head gives zeros."""
    B, H, L, _ = q_BHLc.shape
    check_offsets(offsets, B * H, k_packed_Tc.shape[0])
    bounds = offsets.tolist()
    out = torch.zeros(B, H, L, v_packed_Tc.shape[1], dtype=torch.float32, device=q_BHLc.device)
    for bh in range(B * H):
        b, h = divmod(bh, H)
        k_sc, v_sc = k_packed_Tc[bounds[bh] : bounds[bh + 1]].float(), v_packed_Tc[bounds[bh] : bounds[bh + 1]].float()
        if k_sc.shape[0]:
            out[b, h] = (q_BHLc[b, h].float() @ k_sc.T).softmax(dim=-1) @ v_sc
    return out.to(q_BHLc.dtype)


def ragged_attention_sdpa(
    q_BHLc: torch.Tensor,
    k_packed_Tc: torch.Tensor,
    v_packed_Tc: torch.Tensor,
    offsets: torch.Tensor,
    longest: int | None = None,
) -> torch.Tensor:
    """Fallback without Triton: pad to the longest head (``longest``, as in :func:`unpack_kv`), SDPA with a key
    mask, zeros for empty heads."""
    B, H, L, _ = q_BHLc.shape
    k_BHSc, v_BHSc, valid_BHS = unpack_kv(k_packed_Tc, v_packed_Tc, offsets, B, H, longest)
    if k_BHSc.shape[2] == 0:
        return q_BHLc.new_zeros(B, H, L, v_packed_Tc.shape[1])
    mask_BH1S = torch.zeros(valid_BHS.shape, dtype=q_BHLc.dtype, device=q_BHLc.device)
    mask_BH1S = mask_BH1S.masked_fill_(~valid_BHS, float("-inf"))[:, :, None]
    out = F.scaled_dot_product_attention(q_BHLc, k_BHSc, v_BHSc, attn_mask=mask_BH1S, scale=1.0)
    return out.masked_fill(~valid_BHS.any(dim=2)[:, :, None, None], 0.0)


def _ragged_triton(q_BHLc, k_packed_Tc, v_packed_Tc, offsets) -> torch.Tensor:
    from .triton_attention import ragged_attention_triton

    return ragged_attention_triton(q_BHLc, k_packed_Tc, v_packed_Tc, offsets)


_BACKENDS: dict[str, RaggedFn] = {
    "torch": ragged_attention_torch,
    "sdpa": ragged_attention_sdpa,
    "triton": _ragged_triton,
}


def available_backends() -> list[str]:
    """Names accepted by ``ragged_attention(..., backend=name)`` here (``triton`` only when it imports)."""
    return [n for n in _BACKENDS if n != "triton" or triton_support.triton_status()[0]]


def _auto_backend(q_BHLc, k_packed_Tc, v_packed_Tc, offsets) -> str:
    if triton_support.use_triton(q_BHLc):
        from .triton_attention import supports_ragged

        if supports_ragged(q_BHLc, k_packed_Tc, v_packed_Tc, offsets) is None:
            return "triton"
    return "sdpa"


def ragged_attention(
    q_BHLc: torch.Tensor,
    k_packed_Tc: torch.Tensor,
    v_packed_Tc: torch.Tensor,
    offsets: torch.Tensor,
    backend: str | None = None,
    longest: int | None = None,
) -> torch.Tensor:
    """``out_BHLc``: each head's queries over its own packed keys. ``backend=None`` uses
    ``NEXTSCALE_ATTENTION_BACKEND`` when set, else Triton for supported inputs on a CUDA device that passed
    :func:`.triton_support.triton_device_status` and the padded SDPA path otherwise. ``longest``, the most keys a
    head holds, known on the host, spares the SDPA path a device sync (Triton never syncs; the torch reference
    does)."""
    name = backend or os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    if name == "auto":
        name = _auto_backend(q_BHLc, k_packed_Tc, v_packed_Tc, offsets)
    fn = _BACKENDS.get(name)
    if fn is None or (name == "triton" and not triton_support.triton_status()[0]):
        raise ValueError(f"unknown ragged attention backend {name!r}; available: {', '.join(available_backends())}")
    if name == "sdpa":
        return ragged_attention_sdpa(q_BHLc, k_packed_Tc, v_packed_Tc, offsets, longest)
    return fn(q_BHLc, k_packed_Tc, v_packed_Tc, offsets)
