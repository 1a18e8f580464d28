"""Draws shared by every family's sampler: top-k/top-p filtering and the random draws.

Every random number comes from CPU generators, one per batch item, seeded ``(seed + i) mod 2**64``, and is then
moved to the sampling device without waiting for it (a non-blocking copy), where it is applied (ComfyUI draws its
noise on the CPU too). CUDA's generator is another algorithm than the CPU's, so drawing on the device would give one
seed another image on every kind of device; drawn on the CPU, a seed gives the same numbers everywhere.
"""

from __future__ import annotations

import torch


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set filtered logits to -inf in place and return them.

    Top-k removes every logit strictly below the k-th largest, so ties at the threshold survive (``top_k = 1`` is
    greedy up to ties). Top-p, after top-k, sorts ascending and removes the tokens whose cumulative probability
    is at most ``1 - top_p``; the most likely token is always kept.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_Bl1 = logits_BlV.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, float("-inf"))
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1)
        drop_sorted_BlV = sorted_BlV.softmax(dim=-1).cumsum_(dim=-1) <= 1 - top_p
        drop_sorted_BlV[..., -1] = False
        logits_BlV.masked_fill_(drop_sorted_BlV.scatter(-1, order_BlV, drop_sorted_BlV), float("-inf"))
    return logits_BlV


def item_generators(seed: int, batch: int) -> list[torch.Generator]:
    """One CPU generator per batch item, item ``i``'s seeded ``(seed + i) mod 2**64``."""
    return [torch.Generator("cpu").manual_seed((seed + i) % 2**64) for i in range(batch)]


def uniform(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(B, *shape)`` float32 uniforms in ``[0, 1)`` on ``device``, item ``b``'s drawn on the CPU from
    ``generators[b]``."""
    drawn = torch.stack([torch.rand(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators])
    return drawn.to(device, non_blocking=True)


def categorical(probs_BlV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """``idx_Bl``: one draw per token from ``probs_BlV`` (rows that need not sum to exactly 1), item ``b``'s rows
    from ``generators[b]``: one uniform ``u`` per token, and the first token whose cumulative probability exceeds
    ``u`` times the row's total (inverse CDF, on the probabilities' device). A token of probability 0 is never
    drawn; where rounding puts ``u`` times the total at the total, the last token of nonzero probability is."""
    cdf_BlV = probs_BlV.float().cumsum(dim=-1)
    total_Bl1 = cdf_BlV[..., -1:].contiguous()
    u_Bl1 = uniform(generators, (*probs_BlV.shape[1:-1], 1), probs_BlV.device)
    drawn_Bl1 = torch.searchsorted(cdf_BlV, u_Bl1 * total_Bl1, right=True)
    last_Bl1 = torch.searchsorted(cdf_BlV, total_Bl1, right=False)
    return torch.minimum(drawn_Bl1, last_Bl1)[..., 0]


def gumbel(generators: list[torch.Generator], like_BlV: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise shaped and typed as ``like_BlV``, on its device, item ``b``'s drawn on the CPU from
    ``generators[b]`` (``-log`` of an exponential draw)."""
    shape = like_BlV.shape[1:]
    noise_BlV = torch.stack(
        [-torch.empty(shape, device=g.device, dtype=like_BlV.dtype).exponential_(generator=g).log() for g in generators]
    )
    return noise_BlV.to(like_BlV.device, non_blocking=True)
