"""KV-cache compression policies for the scale loop: baselines, ScaleKV and HACK (docs/kv-cache.md).

Every policy here subclasses :class:`~.kv_cache.KVPolicy` through :class:`BudgetPolicy`:

- The **budget** is a number of tokens per (layer, head) carried from one scale to the next, given as a fraction of
  the whole sequence (``budget = 0.25`` on the 680-token 256 px schedule keeps 170 tokens). ScaleKV moves budget
  between layers and HACK between heads, so that the average over layers and heads equals the uniform budget.
- Nothing is compressed while a layer's cache fits its budget (``budget >= 1`` is VAR's exact cache). Once it does
  not, the current scale is attended in full and then the cache is compacted to the budget (``after_attention``).
- Buffers hold the budget only (``transient = True``): a scale that does not fit is attended through a working copy
  of one layer at a time, so the peak is every layer's budget plus one layer's working copy.
- Heads that keep different numbers of tokens (HACK) use the packed layout of :mod:`..core.kv_cache`
  (``packed = True``): each layer's buffer holds exactly the tokens its heads keep, attended through the ragged
  kernel; :meth:`BudgetPolicy.cache_bytes` gives its peak exactly.
- The memory figures (:class:`KVStats`) are the bytes of the cache's buffers, measured from the cache.

Policies (:data:`POLICIES`):

- ``full``: every token (VAR).
- ``recent``: the most recent ``budget`` tokens (a sliding window; naive baseline).
- ``strided``: ``budget`` tokens evenly spaced over the cache (naive baseline).
- ``scalekv``: drafter layers (lowest attention-selectivity z-score per scale, from a :class:`~.kv_profile.KVProfile`)
  get a large budget, refiner layers a budget decaying linearly with the scale. Kept tokens: the 16 observation
  queries of the current scale (centres of a 4x4 grid) and the top keys by their summed softmax attention,
  max-pooled along the sequence with kernel 5, per head.
- ``hack``: heads with a low column variance of attention (profile) are *contextual* (small budget, keys by
  attention accumulated over the scales), the others *structural* (large budget: the first two scales, then the
  current scale, then the middle keys with the most attention from 32 evenly spaced queries of the current scale).

Without a profile ScaleKV treats every layer as a refiner without decay (uniform budgets, attention selection) and
HACK every head as structural; :class:`KVPolicySpec` says so in its description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError
from ..core.kv_cache import KVPolicy, LayerKV, host_tensor, token_bytes

if TYPE_CHECKING:
    from ..core.family import KVGeometry

POLICIES = ("full", "recent", "strided", "scalekv", "hack")
SCALEKV_WINDOW = 16  # observation queries: the centres of a 4x4 grid over the current scale
SCALEKV_POOL = 5  # max-pool kernel along the sequence
HACK_OBS = 32  # evenly spaced observation queries of the current scale
HACK_SINK_SCALES = 2  # structural heads always keep the first two scales


def token_budget(fraction: float, num_tokens: int) -> int:
    """Tokens per (layer, head) for a budget given as a fraction of the sequence (at least one)."""
    if not 0.0 < fraction:
        raise NextScaleError(f"KV budget must be a positive fraction of the sequence, got {fraction}")
    return max(1, min(num_tokens, round(fraction * num_tokens)))


def grid_shape(pn: int | tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of a scale given as a square side (VAR) or a grid (Infinity)."""
    return (pn, pn) if isinstance(pn, int) else (int(pn[0]), int(pn[1]))


def scale_area(pn: int | tuple[int, int]) -> int:
    h, w = grid_shape(pn)
    return h * w


def scale_starts(patch_nums) -> list[int]:
    """First position of each scale, plus the total at the end."""
    starts = [0]
    for pn in patch_nums:
        starts.append(starts[-1] + scale_area(pn))
    return starts


def grid_queries(pn: int | tuple[int, int], side: int = 4) -> list[int]:
    """ScaleKV's observation window: the centre of each cell of a ``side x side`` grid over the scale's rows and
    columns (every row or column when there are fewer)."""
    h, w = grid_shape(pn)

    def centres(n: int) -> list[int]:
        return list(range(n)) if n <= side else [min(n - 1, int((i + 0.5) * n / side)) for i in range(side)]

    return [r * w + c for r in centres(h) for c in centres(w)]


def even_queries(count: int, n: int) -> list[int]:
    """``n`` evenly spaced positions among ``count`` (all when ``count <= n``)."""
    if count <= n:
        return list(range(count))
    return sorted({round(i * (count - 1) / (n - 1)) for i in range(n)})


def observed_attention(kv: LayerKV, q_BHlc: torch.Tensor, query_idx: list[int]) -> torch.Tensor:
    """fp32 ``(rows, H, n, S)`` softmax attention of the chosen queries over the layer's padded view (padding
    masked)."""
    q_BHnc = q_BHlc[:, :, query_idx].float()
    scores_BHnS = q_BHnc @ kv.k_BHSc.float().transpose(-2, -1)
    valid_BHS = kv.valid_BHS()
    if valid_BHS is not None:
        scores_BHnS = scores_BHnS.masked_fill(~valid_BHS[:, :, None], float("-inf"))
    return scores_BHnS.softmax(dim=-1)


def select(priority_BHS: torch.Tensor, keep_H: list[int]) -> tuple[torch.Tensor, list[int] | None]:
    """``(index_BHs, lengths_H)`` for :meth:`LayerKV.keep`: the ``keep_H[h]`` highest priorities of head ``h``
    (in every row) in position order, padded to the longest head (``lengths_H`` is None when every head keeps the
    same count)."""
    S, s = priority_BHS.shape[-1], max(keep_H)
    top_BHs = priority_BHS.topk(s, dim=-1).indices
    if all(n == s for n in keep_H):
        return top_BHs.sort(dim=-1).values, None
    pad_Hs = torch.arange(s, device=top_BHs.device) >= host_tensor(keep_H, top_BHs.device)[:, None]
    index_BHs = top_BHs.masked_fill(pad_Hs, S).sort(dim=-1).values.masked_fill_(pad_Hs, 0)
    return index_BHs, keep_H


@dataclass
class KVStats:
    """What a run's cache allocated and held, measured from the cache itself.

    ``peak_bytes``: the most bytes its buffers (working copies included) held at once (:attr:`KVCache.peak_bytes`).
    ``scale_bytes[si]``: bytes of the buffers once scale ``si`` is done (after compaction).
    ``kept[(si, layer)] = (before_BH, budget_H, after_BH)``: tokens per head before and after compaction and the
    policy's budget.
    """

    peak_bytes: int = 0
    scale_bytes: dict[int, int] = field(default_factory=dict)
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)

    def carried_bytes(self) -> int:
        """The most bytes allocated between two scales (the last scale's cache is not carried anywhere)."""
        carried = [b for si, b in self.scale_bytes.items() if si < max(self.scale_bytes)]
        return max(carried, default=0)


class MeasuredFull(KVPolicy):
    """The full cache (VAR's exact behaviour: the buffers and the attention path are untouched) with
    :class:`KVStats` recorded."""

    name = "full"

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.stats = KVStats()

    def after_attention(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor) -> None:
        record(self.stats, kv, si, kv.valid_counts(), None, self.num_layers)


def record(stats: KVStats, kv: LayerKV, si: int, before_BH, budget_H, num_layers: int) -> None:
    """Record a layer's counts once scale ``si`` is done: host-side (CPU tensors, no read from the device)."""
    stats.peak_bytes = max(stats.peak_bytes, kv.cache.peak_bytes)
    stats.kept[(si, kv.layer)] = (before_BH, budget_H, kv.valid_counts())
    if kv.layer == num_layers - 1:
        stats.scale_bytes[si] = kv.cache.nbytes()


class BudgetPolicy(KVPolicy):
    """Base of the compressing policies: per-(layer, scale) head budgets, budget-sized buffers, compaction after
    each scale's attention, stats. Subclasses define :meth:`head_budgets` and :meth:`priority`."""

    name = "budget"
    transient = True

    def __init__(self, num_layers: int, num_heads: int, patch_nums, budget: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.patch_nums = tuple(patch_nums)
        self.starts = scale_starts(self.patch_nums)
        self.num_tokens = self.starts[-1]
        self.budget = int(budget)
        self.stats = KVStats()
        self._pos: dict[int, torch.Tensor] = {}  # per layer: original position of each cached slot (rows, H, S)

    def head_budgets(self, layer: int, si: int) -> list[int]:
        """Tokens each head of ``layer`` may carry after scale ``si``."""
        return [self.budget] * self.num_heads

    def budgets_after(self, layer: int, si: int) -> list[int]:
        """What each head keeps after scale ``si``: its budget, except after the last scale, whose cache is never
        carried anywhere (the previous scale's budget, so that the last scale sets no buffer size)."""
        last = len(self.patch_nums) - 1
        return self.head_budgets(layer, si - 1 if si == last and si > 0 else si)

    def priority(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor, pos_BHS: torch.Tensor) -> torch.Tensor:
        """``(rows, H, S)`` scores; each head keeps its highest (invalid slots are masked out by the caller)."""
        raise NotImplementedError

    def capacity(self, layer: int, num_tokens: int) -> int:
        """The most tokens a head carries between scales (the working copy takes what does not fit); dense layout."""
        kept = [0] * self.num_heads
        cap = 1
        for si, pn in enumerate(self.patch_nums):
            kept = [min(k + scale_area(pn), b) for k, b in zip(kept, self.budgets_after(layer, si))]
            cap = max(cap, max(kept))
        largest = max(scale_area(pn) for pn in self.patch_nums)
        if self.num_layers * cap + cap + largest >= self.num_layers * num_tokens:
            return num_tokens  # budget buffers plus a working copy would not beat the full cache: no working copy
        return min(cap, num_tokens)

    def cache_bytes(self, geometry: KVGeometry, rows: int, itemsize: int) -> int:
        """Dense layout: :meth:`KVPolicy.cache_bytes`. Packed: the exact peak, replaying the run on the host. A
        layer's buffer holds its heads' tokens; at each scale a working buffer of those plus the scale's tokens
        replaces it, and is replaced by the kept tokens when the budgets require; the peak is the moment both a
        buffer and its successor are alive."""
        if not self.packed:
            return super().cache_bytes(geometry, rows, itemsize)
        per_token = token_bytes(geometry, rows, itemsize) // geometry.heads  # one head's key and value, every row
        held_LH = [[0] * geometry.heads for _ in range(geometry.layers)]
        total = peak = 0
        for si, area in enumerate(geometry.areas):
            for layer, held_H in enumerate(held_LH):
                before = sum(held_H) * per_token
                work_H = [n + area for n in held_H]
                work = sum(work_H) * per_token
                peak, total = max(peak, total + work), total - before + work
                kept_H = [min(n, b) for n, b in zip(work_H, self.budgets_after(layer, si))]
                if kept_H != work_H:
                    kept = sum(kept_H) * per_token
                    peak, total = max(peak, total + kept), total - work + kept
                held_LH[layer] = kept_H
        return peak

    def after_attention(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor) -> None:
        B, H, l, _ = q_BHlc.shape
        device = q_BHlc.device
        new_pos_BHl = torch.arange(self.starts[si], self.starts[si] + l, device=device).expand(B, H, l)
        old = self._pos.get(kv.layer) if si > 0 else None
        pos_BHS = new_pos_BHl if old is None else torch.cat((old, new_pos_BHl), dim=2)
        before_BH, before_H, budget_H = kv.valid_counts(), kv.held(), self.budgets_after(kv.layer, si)
        keep_H = [min(n, b) for n, b in zip(before_H, budget_H)]
        budget_H = torch.tensor(budget_H, dtype=torch.long, device="cpu")
        self.observe(kv, si, q_BHlc, pos_BHS)
        if not kv.over_capacity and keep_H == before_H:
            self._pos[kv.layer] = pos_BHS
            record(self.stats, kv, si, before_BH, budget_H, self.num_layers)
            return
        priority_BHS = self.priority(kv, si, q_BHlc, pos_BHS).float()
        valid_BHS = kv.valid_BHS()
        if valid_BHS is not None:
            priority_BHS = priority_BHS.masked_fill(~valid_BHS, float("-inf"))
        index_BHs, lengths_H = select(priority_BHS, keep_H)
        self.on_keep(kv.layer, index_BHs)
        self._pos[kv.layer] = pos_BHS.gather(2, index_BHs)
        kv.keep(index_BHs, lengths_H)
        record(self.stats, kv, si, before_BH, budget_H, self.num_layers)

    def observe(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor, pos_BHS: torch.Tensor) -> None:
        """Called at every scale before any compaction (HACK accumulates attention here)."""

    def on_keep(self, layer: int, index_BHs: torch.Tensor) -> None:
        """Hook for per-slot state that must follow the compaction (HACK's accumulated attention)."""

    def keep_rows(self, rows: int) -> None:
        self._pos = {layer: pos_BHS[:rows] for layer, pos_BHS in self._pos.items()}


class RecentPolicy(BudgetPolicy):
    """Baseline: the most recent ``budget`` tokens."""

    name = "recent"

    def priority(self, kv, si, q_BHlc, pos_BHS):
        return pos_BHS.float()


class StridedPolicy(BudgetPolicy):
    """Baseline: ``budget`` tokens evenly spaced over the cache."""

    name = "strided"

    def priority(self, kv, si, q_BHlc, pos_BHS):
        S = pos_BHS.shape[-1]
        b = min(self.budget, S)
        chosen = torch.zeros(S, device=pos_BHS.device)
        chosen[host_tensor(even_queries(S, b), pos_BHS.device)] = 1.0
        return chosen.expand(pos_BHS.shape) + pos_BHS.float() / (2 * self.num_tokens)  # ties: later first


def scalekv_budgets(
    drafter_LK: list[list[bool]], budget: int, patch_nums, decay: float, refiner_start: float = 1.0
) -> list[list[int]]:
    """``budgets[layer][si]``: refiners get ``budget * (refiner_start - decay * si / (K - 1))`` (at least one token),
    drafters share the rest of ``num_layers * budget`` equally; nobody gets more than the cache holds at ``si``;
    what caps leave over goes to the others."""
    L, K = len(drafter_LK), len(patch_nums)
    starts = scale_starts(patch_nums)
    out = [[0] * K for _ in range(L)]
    for si in range(K):
        cap, total = starts[si + 1], L * budget
        drafters = [layer for layer in range(L) if drafter_LK[layer][si]]
        ratio = max(0.0, refiner_start - decay * si / max(1, K - 1))
        want = [budget * ratio] * L
        if drafters and len(drafters) < L:
            d_budget = (total - budget * ratio * (L - len(drafters))) / len(drafters)
            for layer in drafters:
                want[layer] = d_budget
        else:
            want = [float(budget)] * L
        # water-fill: cap each layer at the cache length, hand the excess to the uncapped ones in proportion
        alloc = [min(float(cap), w) for w in want]
        for _ in range(L):
            excess = total - sum(alloc)
            free = [i for i in range(L) if alloc[i] < cap]
            if excess <= 1e-9 or not free:
                break
            weight = sum(want[i] for i in free) or len(free)
            for i in free:
                alloc[i] = min(float(cap), alloc[i] + excess * (want[i] or 1.0) / weight)
        ints = [max(1, math.floor(a)) for a in alloc]
        rest = min(total, cap * L) - sum(ints)
        for i in sorted(range(L), key=lambda i: alloc[i] - ints[i], reverse=True):
            if rest <= 0:
                break
            if ints[i] < cap:
                ints[i] += 1
                rest -= 1
        for layer in range(L):
            out[layer][si] = ints[layer]
    return out


class ScaleKVPolicy(BudgetPolicy):
    """ScaleKV: drafter/refiner budgets per (layer, scale) and attention-selected tokens plus the window."""

    name = "scalekv"

    def __init__(self, num_layers, num_heads, patch_nums, budget, budgets_LK: list[list[int]]):
        super().__init__(num_layers, num_heads, patch_nums, budget)
        self.budgets_LK = budgets_LK

    def head_budgets(self, layer, si):
        return [self.budgets_LK[layer][si]] * self.num_heads

    def priority(self, kv, si, q_BHlc, pos_BHS):
        l, S = q_BHlc.shape[2], pos_BHS.shape[-1]
        window = grid_queries(self.patch_nums[si])
        probs_BHnS = observed_attention(kv, q_BHlc, window)
        window_S = host_tensor([S - l + i for i in window], q_BHlc.device)
        score_BHS = probs_BHnS.sum(dim=2)
        score_BHS[..., window_S] = 0.0
        B, H = score_BHS.shape[:2]
        pooled = F.max_pool1d(score_BHS.reshape(B * H, 1, S), SCALEKV_POOL, 1, SCALEKV_POOL // 2).view(B, H, S)
        pooled[..., window_S] = 1e4  # the window is always kept (when the budget allows)
        return pooled


class HACKPolicy(BudgetPolicy):
    """HACK: per-head budgets by head type; contextual heads keep the keys with the most accumulated attention,
    structural heads the first two scales, the current scale and the best middle keys. Packed layout: each head
    allocates its own budget."""

    name = "hack"
    packed = True

    def __init__(self, num_layers, num_heads, patch_nums, budget, contextual_LH: list[list[bool]], budgets_LH):
        super().__init__(num_layers, num_heads, patch_nums, budget)
        self.contextual_LH, self.budgets_LH = contextual_LH, budgets_LH
        self._acc: dict[int, torch.Tensor] = {}

    def head_budgets(self, layer, si):
        return list(self.budgets_LH[layer])

    def observe(self, kv, si, q_BHlc, pos_BHS):
        probs_BHnS = observed_attention(kv, q_BHlc, even_queries(q_BHlc.shape[2], HACK_OBS))
        score_BHS = probs_BHnS.sum(dim=2)
        S = score_BHS.shape[-1]
        acc = self._acc.get(kv.layer) if si > 0 else None
        self._acc[kv.layer] = score_BHS if acc is None else score_BHS + F.pad(acc, (0, S - acc.shape[-1]))
        self._score = score_BHS

    def priority(self, kv, si, q_BHlc, pos_BHS):
        score_BHS, acc_BHS = self._score, self._acc[kv.layer]
        tier_BHS = (pos_BHS < self.starts[min(HACK_SINK_SCALES, len(self.patch_nums))]).float() * 2
        tier_BHS = tier_BHS + (pos_BHS >= self.starts[si]).float()
        structural = tier_BHS * (HACK_OBS + 1) + score_BHS
        ctx_H = host_tensor(self.contextual_LH[kv.layer], score_BHS.device).bool()
        return torch.where(ctx_H[None, :, None], acc_BHS, structural)

    def on_keep(self, layer, index_BHs):
        if layer in self._acc:
            self._acc[layer] = self._acc[layer].gather(2, index_BHs)

    def keep_rows(self, rows):
        super().keep_rows(rows)
        self._acc = {layer: acc_BHS[:rows] for layer, acc_BHS in self._acc.items()}


def hack_budgets(contextual_LH: list[list[bool]], budget: int, num_tokens: int, ratio: float) -> list[list[int]]:
    """Per-head budgets: contextual heads ``ratio`` times the structural budget, averaging ``budget`` over all heads
    (structural heads at most the whole sequence)."""
    flat = [c for row in contextual_LH for c in row]
    n, n_c = len(flat), sum(flat)
    n_s = n - n_c
    if n_c == 0 or n_s == 0:
        return [[budget] * len(row) for row in contextual_LH]
    b_s = min(num_tokens, n * budget / (n_c * ratio + n_s))
    b_c = max(1, int((n * budget - n_s * int(b_s)) // n_c))
    b_s = int(b_s)
    return [[min(num_tokens, b_c) if c else b_s for c in row] for row in contextual_LH]


@dataclass
class KVPolicySpec:
    """A device-free KV policy choice (what the NEXTSCALE_KV_POLICY socket carries); :meth:`bind` makes the
    per-run :class:`KVPolicy` for a generator.

    ``budget``: fraction of the sequence each (layer, head) carries on average. ScaleKV: ``drafters`` per scale
    (from the profile's z-scores), refiner ``decay`` (the last scale's refiners get ``1 - decay`` of the budget).
    HACK: ``contextual_fraction`` of the heads (lowest column variance) and their budget ``contextual_ratio``
    relative to structural heads.
    """

    policy: str = "full"
    budget: float = 0.25
    profile: object | None = None  # a kv_profile.KVProfile
    drafters: int = 1
    decay: float = 0.4
    contextual_fraction: float = 0.5
    contextual_ratio: float = 0.25

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise NextScaleError(f"KV policy '{self.policy}' is not one of {', '.join(POLICIES)}")
        if not self.budget > 0:
            raise NextScaleError(f"KV budget must be a positive fraction of the sequence, got {self.budget}")
        if not 0 <= self.decay <= 1 or not 0 <= self.contextual_fraction <= 1 or not 0 < self.contextual_ratio <= 1:
            raise NextScaleError(
                "KV policy knobs out of range: decay and contextual_fraction must lie in 0..1, contextual_ratio in "
                f"(0, 1]; got decay={self.decay}, contextual_fraction={self.contextual_fraction}, "
                f"contextual_ratio={self.contextual_ratio}"
            )

    @property
    def calibrated(self) -> bool:
        return self.profile is not None

    def describe(self) -> str:
        if self.policy == "full":
            return "full cache"
        note = "" if self.policy not in ("scalekv", "hack") or self.calibrated else " (uncalibrated: uniform budgets)"
        return f"{self.policy} at {self.budget:.0%} of the sequence{note}"

    def bind(self, var, batch_size: int = 1, device=None) -> KVPolicy:
        """The policy object for one run of the VAR generator ``var``."""
        return self.bind_scales(var.depth, var.config.num_heads, tuple(var.patch_nums))

    def bind_scales(self, num_layers: int, num_heads: int, scales) -> KVPolicy:
        """The policy object for a run over ``scales`` (square sides or ``(h, w)`` grids) of a transformer with
        ``num_layers`` x ``num_heads`` (a family's :class:`~..core.family.KVGeometry`); a profile is checked
        against that shape."""
        if self.profile is not None:
            self.profile.check_shape(num_layers, num_heads, scales)
        L, H, pns = num_layers, num_heads, tuple(scales)
        num_tokens = scale_starts(pns)[-1]
        if self.policy == "full":
            return MeasuredFull(L)
        budget = token_budget(self.budget, num_tokens)
        if self.policy == "recent":
            return RecentPolicy(L, H, pns, budget)
        if self.policy == "strided":
            return StridedPolicy(L, H, pns, budget)
        if self.policy == "scalekv":
            drafter = self.profile.drafters(self.drafters) if self.profile is not None else [[False] * len(pns)] * L
            decay = self.decay if self.profile is not None else 0.0
            return ScaleKVPolicy(L, H, pns, budget, scalekv_budgets(drafter, budget, pns, decay))
        contextual = (
            self.profile.contextual_heads(self.contextual_fraction) if self.profile is not None else [[False] * H] * L
        )
        return HACKPolicy(L, H, pns, budget, contextual, hack_budgets(contextual, budget, num_tokens,
                                                                      self.contextual_ratio))
