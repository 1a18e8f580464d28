"""Attention for VAR's cos-attention, with one dispatch function over interchangeable backends.

Convention (every backend): ``q_BHLc`` is already L2-normalised over ``c`` and multiplied by the per-head
scale, ``k_BHSc`` is L2-normalised, and the softmax scale is **1** (no ``1/sqrt(c)``)::

    out_BHLc = softmax(q @ k^T + attn_mask) @ v

``attn_mask`` is additive (0 / -inf), broadcastable to ``(B, H, L, S)``, usually the ``(L, S)`` block-causal
mask of :func:`block_causal_mask` (teacher forcing, prefill) or ``None`` (cached inference: the current scale
attends to every cached token). The model passes its block-causal mask as an :class:`IntervalMask`, which carries
each query's key interval taken from the schedule, so the Triton backend never reads the mask.

Backends: ``"torch"`` is the plain reference and the specification (fp32 arithmetic, result cast back);
``"sdpa"`` is ``F.scaled_dot_product_attention(scale=1.0)``; ``"triton"`` (listed only when Triton imports) is
:mod:`.triton_attention` (forward only; no mask, or a mask allowing one interval of keys per query such as the
block-causal one, whose fully masked tiles it skips). ``backend=None`` uses the environment variable
``NEXTSCALE_ATTENTION_BACKEND`` when set (tests, benchmarks), else ``"auto"``: Triton for inputs it supports on
a CUDA device that passed :func:`.triton_support.triton_device_status`, SDPA otherwise. Every backend must match
the reference within the tolerances of ``tests/test_attention.py`` (Triton: ``tests/test_triton_kernels.py``).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import triton_support

ENV_BACKEND = "NEXTSCALE_ATTENTION_BACKEND"

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def attention_torch(q_BHLc, k_BHSc, v_BHSc, attn_mask=None) -> torch.Tensor:
    """Reference: the scores and the softmax in fp32, the output in ``q``'s dtype."""
    scores_BHLS = q_BHLc.float() @ k_BHSc.float().transpose(-2, -1)
    if attn_mask is not None:
        scores_BHLS = scores_BHLS + attn_mask.float()
    return (scores_BHLS.softmax(dim=-1) @ v_BHSc.float()).to(q_BHLc.dtype)


SPLIT_CALL_COST = 16  # an extra SDPA call of a split costs about as much as 16 keys per query (AVX2 core, training)
SPLIT_MAX_RUNS = 32  # masks with more key intervals than this (not a scale schedule) are not split


def attention_sdpa(q_BHLc, k_BHSc, v_BHSc, attn_mask=None) -> torch.Tensor:
    """PyTorch's fused attention (flash / memory-efficient / math, chosen by PyTorch) with softmax scale 1.

    On the CPU, where PyTorch's kernels compute every masked score, an :class:`IntervalMask` of key prefixes (the
    block-causal mask) runs as the query groups of :func:`_prefix_groups`, each over the keys its queries may see:
    the keys hidden from a whole group are never computed, and a group whose queries all see the same keys reads no
    mask."""
    groups = _prefix_groups(q_BHLc, k_BHSc, attn_mask)
    if groups is not None:
        parts = [
            F.scaled_dot_product_attention(
                q_BHLc[..., a:b, :], k_BHSc[..., :e, :], v_BHSc[..., :e, :],
                attn_mask=attn_mask[a:b, :e].to(q_BHLc.dtype) if masked else None, scale=1.0,
            )
            for a, b, e, masked in groups
        ]
        return torch.cat(parts, dim=-2)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q_BHLc.dtype)
    return F.scaled_dot_product_attention(q_BHLc, k_BHSc, v_BHSc, attn_mask=attn_mask, scale=1.0)


def _prefix_groups(q_BHLc, k_BHSc, attn_mask) -> list[tuple[int, int, int, bool]] | None:
    """``(query start, query end, key end, masked)`` of consecutive query groups for an :class:`IntervalMask` of
    non-empty key prefixes ``[0, end)`` on the CPU; ``None`` for any other mask or device (reading the bounds there
    would wait for the accelerator). The groups minimise the query-key pairs computed plus
    :data:`SPLIT_CALL_COST` keys per query and call; a group needs the mask unless its queries share one prefix.
    For Infinity's 521-token schedule: scales 0-4 masked, then scale 5 and scale 6 unmasked (69 % of the pairs)."""
    if not isinstance(attn_mask, IntervalMask) or q_BHLc.device.type != "cpu":
        return None
    L, S = q_BHLc.shape[-2], k_BHSc.shape[-2]
    if tuple(attn_mask.shape) != (L, S):
        return None
    start_L, end_L = attn_mask.bounds
    if bool(start_L.any()) or not bool(end_L.all()):
        return None
    runs, a = [], 0  # (query start, query end, key end) of each run of queries with the same prefix
    for end, run in itertools.groupby(end_L.tolist()):
        b = a + len(list(run))
        runs.append((a, b, end))
        a = b
    if len(runs) > SPLIT_MAX_RUNS:
        return None
    best = [(0, 0)]  # best[j]: the least cost of covering runs[:j], and where its last group starts
    for j in range(1, len(runs) + 1):
        costs = []
        for i in range(j):
            keys = max(e for _, _, e in runs[i:j])
            costs.append((best[i][0] + (runs[j - 1][1] - runs[i][0]) * keys + SPLIT_CALL_COST * S, i))
        best.append(min(costs))
    groups, j = [], len(runs)
    while j:
        i = best[j][1]
        groups.append((runs[i][0], runs[j - 1][1], max(e for _, _, e in runs[i:j]), j - i > 1))
        j = i
    return groups[::-1]


def attention_triton(q_BHLc, k_BHSc, v_BHSc, attn_mask=None) -> torch.Tensor:
    """The Triton kernels (imported on first use; see :mod:`.triton_attention`)."""
    from .triton_attention import attention_triton as triton_fn

    return triton_fn(q_BHLc, k_BHSc, v_BHSc, attn_mask)


_BACKENDS: dict[str, AttentionFn] = {"torch": attention_torch, "sdpa": attention_sdpa, "triton": attention_triton}


def available_backends() -> list[str]:
    """Names accepted by ``attention(..., backend=name)`` and by ``NEXTSCALE_ATTENTION_BACKEND`` (also ``"auto"``)."""
    return [name for name in _BACKENDS if name != "triton" or triton_support.triton_status()[0]]


def default_backend() -> str:
    return os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"


def _auto_backend(q_BHLc, k_BHSc, v_BHSc, attn_mask) -> str:
    """Triton for inputs its kernels support (dtype, head dim, no gradient, mask shape) on a device that passed
    :func:`.triton_support.triton_device_status`, else SDPA."""
    if triton_support.use_triton(q_BHLc):
        from .triton_attention import supports

        if supports(q_BHLc, k_BHSc, v_BHSc, attn_mask) is None:
            return "triton"
    return "sdpa"


def attention(
    q_BHLc: torch.Tensor,
    k_BHSc: torch.Tensor,
    v_BHSc: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out_BHLc`` of cos-attention with softmax scale 1 (see the module docstring for the conventions)."""
    name = backend or default_backend()
    if name == "auto":
        name = _auto_backend(q_BHLc, k_BHSc, v_BHSc, attn_mask)
    fn = _BACKENDS.get(name)
    if fn is None or (name == "triton" and not triton_support.triton_status()[0]):
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}")
    return fn(q_BHLc, k_BHSc, v_BHSc, attn_mask)


def block_causal_mask(patch_nums: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``(L, L)`` mask: 0 where the key's scale is at or below the query's, -inf elsewhere
    (causal across scales, bidirectional within one). VAR stores it as ``attn_bias_for_masking (1, 1, L, L)``."""
    level_L = torch.tensor([si for si, pn in enumerate(patch_nums) for _ in range(pn * pn)], device=device)
    return additive_mask(level_L[None, :] <= level_L[:, None], dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive mask of the bool ``allowed``: 0 where it is True, -inf elsewhere, on its device."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=32)
def _scale_row_bounds(patch_nums: tuple[int, ...], L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ends = [end for end, pn in zip(itertools.accumulate(p * p for p in patch_nums), patch_nums) for _ in range(pn * pn)]
    if L > len(ends):
        raise ValueError(f"{L} queries but the schedule {patch_nums} has {len(ends)} tokens")
    end_L = torch.tensor(ends[:L], dtype=torch.int32, device=device)
    return torch.zeros(L, dtype=torch.int32, device=device), end_L


def scale_row_bounds(patch_nums: Sequence[int], L: int | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv_start_L, kv_end_L)`` int32 of VAR's block-causal mask over the first ``L`` tokens of the schedule:
    start 0, end = the cumulative token count at the end of the query's scale. Cached per schedule, length and
    device (the tensors are shared: do not modify them)."""
    pn = tuple(int(p) for p in patch_nums)
    n = sum(p * p for p in pn) if L is None else int(L)
    return _scale_row_bounds(pn, n, torch.empty(0, device=device).device)


class IntervalMask(torch.Tensor):
    """An additive ``(L, S)`` mask (0 / -inf) that lets query ``i`` see exactly the keys
    ``[kv_start_L[i], kv_end_L[i])``, carrying those bounds (int32 ``(L,)``, on the mask's device).

    The Triton backend takes the bounds and never reads the mask: no device sync, and no version counter to
    consult (tensors made under ``torch.inference_mode``, as ComfyUI runs every prompt, have none). The bounds are
    the caller's statement about the mask (:meth:`block_causal` takes them from the schedule); torch uses the
    mask itself, SDPA the bounds on the CPU (:func:`attention_sdpa`) and the mask elsewhere. Like ``nn.Parameter``,
    it is a tensor whose operations return plain tensors: a sum with another mask, a slice or a cast loses the
    bounds and is read like any mask.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, mask_LS: torch.Tensor, kv_start_L: torch.Tensor, kv_end_L: torch.Tensor) -> IntervalMask:
        if mask_LS.dim() != 2 or not mask_LS.is_floating_point():
            raise ValueError(f"an interval mask is a float (L, S) tensor, got {tuple(mask_LS.shape)} {mask_LS.dtype}")
        for name, t in (("kv_start_L", kv_start_L), ("kv_end_L", kv_end_L)):
            if t.shape != mask_LS.shape[:1] or t.dtype != torch.int32 or t.device != mask_LS.device:
                raise ValueError(f"{name} must be int32 ({mask_LS.shape[0]},) on {mask_LS.device}")
        mask = torch.Tensor._make_subclass(cls, mask_LS)
        mask.bounds = (kv_start_L.contiguous(), kv_end_L.contiguous())
        return mask

    @classmethod
    def block_causal(cls, mask_LL: torch.Tensor, patch_nums: Sequence[int]) -> IntervalMask:
        """``mask_LL``, the block-causal mask of the first ``L`` tokens of the schedule ``patch_nums`` (e.g. a
        slice of VAR's ``attn_bias_for_masking``), with its bounds from the schedule."""
        return cls(mask_LL, *scale_row_bounds(patch_nums, mask_LL.shape[0], mask_LL.device))
