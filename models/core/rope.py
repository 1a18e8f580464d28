"""Rotary position embedding applied to attention's q and k (Infinity's 2D RoPE; each family supplies its angles)."""

from __future__ import annotations

import torch


def apply_rope(x_BHLc: torch.Tensor, cos_Lh: torch.Tensor, sin_Lh: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` of the last axis by the angles whose cos/sin are given per
    token ``(L, c / 2)``; computed in fp32, returned in ``x``'s dtype."""
    x = x_BHLc.float().unflatten(-1, (-1, 2))
    x0, x1 = x.unbind(-1)
    out = torch.stack((cos_Lh * x0 - sin_Lh * x1, sin_Lh * x0 + cos_Lh * x1), dim=-1)
    return out.flatten(-2).to(x_BHLc.dtype)
