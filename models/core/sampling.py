"""Draws shared by every family's sampler: top-k/top-p filtering and one multinomial draw per token."""

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


def multinomial(probs_BlV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """``idx_Bl``: one draw per token, item ``b``'s rows from ``generators[b]``."""
    return torch.stack(
        [torch.multinomial(p_lV, 1, replacement=True, generator=g)[:, 0] for p_lV, g in zip(probs_BlV, generators)]
    )
