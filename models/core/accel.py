"""Training-free acceleration of the scale loop: token pruning at the large scales, guidance that stops early, and
a shortcut for the last scales. Every option is off by default; an :class:`Acceleration` reaches a sampler as the
``accel`` field of :class:`~.hooks.SamplerHooks`.

Which scales are affected is counted from the end of the run's schedule, so one setting fits every resolution:

- **shortcut** (the last ``shortcut_scales``, SkipVAR's step skipping, FastVAR's 100% pruning): the transformer does
  not run; the scale adds nothing to the latent, which stays the upsampled sum of the coarser scales. The token map
  recorded for the scale is the last computed one upsampled (nearest), a stand-in: the sampled tokens keep the latent
  (``f_hat`` / ``summed_codes``), which the decoders use.
- **pruning** (the ``prune_scales`` before those, FastVAR's cached token pruning): blocks ``0..prune_from_layer - 1``
  see every token; from block ``prune_from_layer`` on, each image keeps the ``keep_ratio`` of its tokens farthest (in
  squared distance) from the scale's mean hidden state, summed over its conditional and unconditional rows so that
  guidance mixes two computed or two restored logits, and the others are never computed (the KV cache receives the
  kept tokens only). After the last block, a pruned position gets its own hidden state at ``prune_from_layer``
  plus, with ``restore = "cached"``, the update the blocks made at the last full scale, area-resampled to this grid
  (FastVAR's cached restoration), or nothing more with ``restore = "input"``. The head then runs on every position.
- **guidance stop** (the last ``unguided_scales``): those scales are sampled from the conditional logits alone and the
  unconditional rows are dropped from the batch (and from the KV cache) before the first of them, so the
  transformer's work on them halves. Each item's draws on the earlier scales are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import NextScaleError
from .kv_cache import KVPolicy

RESTORE_MODES = ("cached", "input")


@dataclass(frozen=True)
class Acceleration:
    """What a run skips (see the module docstring); the defaults skip nothing."""

    prune_scales: int = 0
    keep_ratio: float = 0.5
    prune_from_layer: int = 3
    restore: str = "cached"
    unguided_scales: int = 0
    shortcut_scales: int = 0

    def __post_init__(self):
        if min(self.prune_scales, self.unguided_scales, self.shortcut_scales, self.prune_from_layer) < 0:
            raise NextScaleError(f"acceleration scale and layer counts must be >= 0, got {self}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise NextScaleError(f"keep_ratio (fraction of tokens computed) must lie in (0, 1], got {self.keep_ratio}")
        if self.restore not in RESTORE_MODES:
            raise NextScaleError(f"restore '{self.restore}' is not one of {', '.join(RESTORE_MODES)}")

    @property
    def active(self) -> bool:
        return bool(self.prune_scales or self.unguided_scales or self.shortcut_scales)

    @property
    def name(self) -> str:
        """A short description for reports, e.g. ``prune 2@0.5 from layer 3 (cached), unguided 2, shortcut 1``."""
        parts = []
        if self.prune_scales:
            parts.append(
                f"prune {self.prune_scales}@{self.keep_ratio:g} from layer {self.prune_from_layer} ({self.restore})"
            )
        if self.unguided_scales:
            parts.append(f"unguided {self.unguided_scales}")
        if self.shortcut_scales:
            parts.append(f"shortcut {self.shortcut_scales}")
        return ", ".join(parts) or "off"

    def check(self, num_scales: int, depth: int, control=None, kv_policy: KVPolicy | None = None) -> None:
        """Refuse a setting this schedule, transformer and hooks cannot run: scale 0 always runs, a scale with every
        token computed precedes the pruned ones (their cached update), and pruning needs every token's hidden state
        where a control model adds its features or a compressing KV policy picks its observation queries."""
        if self.prune_scales and control is not None:
            raise NextScaleError(
                "token pruning cannot run with a control model (it adds features at every position): set "
                "prune_scales to 0 in NextScale Acceleration, or disconnect the control"
            )
        if self.prune_scales and kv_policy is not None and type(kv_policy) is not KVPolicy:
            raise NextScaleError(
                f"token pruning cannot run with the '{kv_policy.name}' KV policy (it observes every query of a "
                f"scale): set prune_scales to 0 in NextScale Acceleration, or use the full KV policy"
            )
        if self.prune_scales + self.shortcut_scales > num_scales - 1:
            raise NextScaleError(
                f"prune_scales + shortcut_scales is {self.prune_scales + self.shortcut_scales} but this schedule has "
                f"{num_scales} scales, of which the first always runs in full: lower them to at most {num_scales - 1}"
            )
        if self.unguided_scales > num_scales:
            raise NextScaleError(f"unguided_scales must lie in 0..{num_scales} for this schedule, got "
                                 f"{self.unguided_scales}")
        if self.prune_scales and self.prune_from_layer >= depth:
            raise NextScaleError(
                f"prune_from_layer must lie in 0..{depth - 1} (this transformer has {depth} blocks), got "
                f"{self.prune_from_layer}"
            )

    def shortcut(self, si: int, num_scales: int) -> bool:
        return si >= num_scales - self.shortcut_scales

    def pruned(self, si: int, num_scales: int) -> bool:
        return num_scales - self.shortcut_scales - self.prune_scales <= si < num_scales - self.shortcut_scales

    def guided(self, si: int, num_scales: int) -> bool:
        """Whether scale ``si`` keeps its unconditional rows (when the run is guided at all)."""
        return si < num_scales - self.unguided_scales


def upsample_tokens(tokens_BhwX: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A token map ``(B, h, w)`` or ``(B, h, w, d)`` resampled to ``size`` by nearest neighbour (a shortcut scale's
    stand-in token map)."""
    flat = tokens_BhwX.dim() == 3
    x_BXhw = tokens_BhwX[..., None].permute(0, 3, 1, 2) if flat else tokens_BhwX.permute(0, 3, 1, 2)
    out = F.interpolate(x_BXhw.float(), size=size, mode="nearest").to(tokens_BhwX.dtype).permute(0, 2, 3, 1)
    return out[..., 0] if flat else out


class TokenPruning:
    """One run's pruning (see the module docstring): a transformer's ``forward_scale`` calls
    :meth:`block_input` before each block and :meth:`output` after the last. ``grids`` are the transformer's token
    grids ``(h, w)`` per scale."""

    def __init__(self, accel: Acceleration, grids: list[tuple[int, int]], items: int):
        self.accel, self.grids, self.K, self.items = accel, grids, len(grids), items
        first = self.K - accel.shortcut_scales - accel.prune_scales
        self.cache_scale = first - 1  # the last full scale: its update restores the pruned positions
        self.kept_Rk: torch.Tensor | None = None  # positions computed at the current scale, per row
        self._x_RlC: torch.Tensor | None = None  # every position's hidden state entering block prune_from_layer
        self._update_RlC: torch.Tensor | None = None  # what the blocks added at the cache scale

    def block_input(self, si: int, layer: int, x_RlC: torch.Tensor, rope=None):
        """The hidden state (and the rotary ``(cos, sin)`` per token, when the family has them) entering ``layer``
        at scale ``si``: at a pruned scale, from ``prune_from_layer`` on, the kept positions only."""
        if layer != self.accel.prune_from_layer:
            return x_RlC, rope
        self.kept_Rk = None
        if si == self.cache_scale and self.accel.restore == "cached":
            self._x_RlC = x_RlC
        if not self.accel.pruned(si, self.K):
            return x_RlC, rope
        self._x_RlC = x_RlC
        R, l, C = x_RlC.shape
        keep = max(1, int(l * self.accel.keep_ratio))
        score_Rl = (x_RlC.float() - x_RlC.float().mean(dim=1, keepdim=True)).square().sum(dim=-1)
        if R == 2 * self.items:  # an image's conditional and unconditional rows keep the same positions
            score_Rl = (score_Rl[: self.items] + score_Rl[self.items :]).repeat(2, 1)
        self.kept_Rk = score_Rl.topk(keep, dim=1).indices.sort(dim=1).values
        x_RkC = x_RlC.gather(1, self.kept_Rk[..., None].expand(R, keep, C))
        if rope is not None:  # per row: (R, 1, k, c / 2), broadcast over the heads
            rope = tuple(t[self.kept_Rk][:, None] for t in rope)
        return x_RkC, rope

    def output(self, si: int, x_RkC: torch.Tensor) -> torch.Tensor:
        """The last block's output on every position of scale ``si`` (pruned positions restored)."""
        if si == self.cache_scale and self._x_RlC is not None:
            self._update_RlC, self._x_RlC = x_RkC - self._x_RlC.to(x_RkC.dtype), None
        if self.kept_Rk is None:
            return x_RkC
        x_RlC, kept_Rk = self._x_RlC.to(x_RkC.dtype), self.kept_Rk
        R, C = x_RlC.shape[0], x_RlC.shape[2]
        if self.accel.restore == "cached":
            update_RChw = self._update_RlC[:R].transpose(1, 2).unflatten(2, self.grids[self.cache_scale])
            update_RChw = F.interpolate(update_RChw.float(), size=self.grids[si], mode="area")
            update_RlC = update_RChw.flatten(2).transpose(1, 2)
            x_RlC = x_RlC + update_RlC.to(x_RlC.dtype)
        self._x_RlC, self.kept_Rk = None, None
        return x_RlC.scatter(1, kept_Rk[..., None].expand(R, kept_Rk.shape[1], C), x_RkC)
