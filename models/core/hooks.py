"""The hook points every family's scale loop offers (guide, control, KV policy, acceleration, per-scale callback).

A family's sampler takes one :class:`SamplerHooks`; a hook it cannot honour is refused with a
:class:`~.errors.NextScaleError` naming the hook and the family, never ignored (:func:`refuse_unsupported`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .accel import Acceleration
from .errors import NextScaleError
from .kv_cache import KVPolicy


class Guide:
    """Base of sampling guides (subclass it, or provide the same three methods); the defaults change nothing."""

    def apply(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        """The indices to use at scale ``si`` given the drawn ones ``(B, pn**2)``."""
        return idx_Bl

    def forced(self, si: int) -> torch.Tensor | None:
        """Bool ``(B, pn**2)``: the tokens :meth:`apply` sets at scale ``si``; None: those it changed."""
        return None

    def override_fhat(self, si: int, f_hat: torch.Tensor) -> torch.Tensor | None:
        """A replacement for ``f_hat (B, Cvae, side, side)`` after scale ``si``'s update, or None to keep it."""
        return None


def guided_fhat(
    guide: Guide | None, si: int, patch_nums, f_hat: torch.Tensor, next_BChw: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Applies ``guide.override_fhat`` after scale ``si``'s update of ``f_hat``: the replacement is copied into
    ``f_hat`` (the accumulator; the guide's tensor is never updated in place) and the next scale's input remade from
    it as the tokenizer makes it, area-downsampled. ``(next_BChw, replaced)``."""
    if guide is None or (replaced := guide.override_fhat(si, f_hat)) is None:
        return next_BChw, False
    f_hat.copy_(replaced)
    if si < len(patch_nums) - 1:
        next_BChw = F.interpolate(f_hat, size=(patch_nums[si + 1],) * 2, mode="area")
    return next_BChw, True


class Control:
    """Base of control modules (subclass it, or provide the same two methods); the defaults change nothing."""

    def block_input(self, si: int, layer: int, x_BlC: torch.Tensor) -> torch.Tensor:
        """The hidden state entering block ``layer`` at scale ``si`` (all CFG rows: conditional, then null)."""
        return x_BlC

    def logits(self, si: int, logits_BlV: torch.Tensor) -> torch.Tensor:
        """The guided fp32 logits of scale ``si``, before temperature and top-k/top-p."""
        return logits_BlV


@dataclass
class SamplerHooks:
    """Optional per-scale hook points of :func:`sample` (see the module docstring)."""

    guide: Guide | None = None
    control: Control | None = None
    kv_policy: KVPolicy | None = None
    accel: Acceleration | None = None
    callback: Callable[[int, int, torch.Tensor], None] | None = None


def refuse_unsupported(hooks: SamplerHooks | None, supported: set[str], family: str) -> None:
    """Raise when ``hooks`` sets a hook outside ``supported`` (names of :class:`SamplerHooks` fields)."""
    if hooks is None:
        return
    unsupported = [name for name in ("guide", "control", "kv_policy", "accel", "callback")
                   if getattr(hooks, name) is not None and name not in supported]
    if unsupported:
        raise NextScaleError(
            f"{family} sampling does not support the {' and '.join(unsupported)} hook(s): disconnect "
            f"{'them' if len(unsupported) > 1 else 'it'} for this model"
        )
