"""The Infinity scale loop (upstream ``Infinity.autoregressive_infer_cfg``): text to bitwise token maps.

Per scale ``si`` of the schedule:
1. The transformer runs the scale's tokens through the KV cache (the same :class:`~.kv_cache.KVCache`, policies
   included, as VAR's loop). With guidance the rows are ``[cond; uncond]``.
2. Logits are divided by the scale's temperature ``tau``, then guided with a constant ``cfg`` (no ramp):
   ``cfg * cond + (1 - cfg) * uncond`` (``cfg == 1`` on every scale runs the conditional rows only).
3. Each token's ``2 d`` logits are ``d`` independent bit pairs: top-k/top-p
   (:func:`~nextscale.models.core.sampling.filter_top_k_top_p_`) act on every pair (``top_k >= 2`` changes
   nothing; ``top_p = 0.97`` makes nearly sure bits deterministic) and one categorical draw per bit picks 0 or 1.
4. The bits become codes ``(2 bit - 1) / sqrt(d)`` (L2-normalised), upsampled (trilinear) onto the final latent
   grid and summed; the next scale's input is the sum resampled (trilinear) to the next grid, through
   ``word_embed``. With a patchifying model (8B: ``token_dim = 4 d``), bits are un-patchified (``pixel_shuffle``)
   onto the tokenizer's latent grid, and the next input is patchified back (``pixel_unshuffle``).

Randomness follows VAR's sampler (:mod:`..var.sampler`): batch item ``i`` draws from its own CPU generator seeded
``(seed + i) mod 2**64``, one uniform per bit (``h * w * d`` per scale) applied on the sampling device, so a seed
gives the same bits on every device and item ``i`` of a batch those of a batch-of-1 run with seed ``seed + i``.

Hooks (:class:`~nextscale.models.core.hooks.SamplerHooks`, the same as VAR's loop): ``guide`` must be a
:class:`BitGuide`, whose ``apply(si, bits_Bhwd)`` may replace a scale's bits (teacher forcing: image-to-image keeps
the early scales of an encoded image, upstream's ``gt_leak``; inpainting keeps the reference's cells outside the
mask, :mod:`.editing`) and whose ``override_summed(si, summed_BdHW)`` may replace the summed codes after the scale
is added (latent blend); the next scale's input is made from them. A token guide of VAR's is refused;
``control.block_input(si, layer, x)`` may change the hidden state before each block; ``kv_policy`` decides what the
cache keeps; ``accel`` (:class:`~nextscale.models.core.accel.Acceleration`) prunes tokens, stops guidance or skips
the last scales (default: off); ``callback(si, num_scales, summed_codes)`` runs once per scale (progress, previews,
interrupts; an exception ends sampling and propagates, the KV cache is freed in every case).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.accel import Acceleration, TokenPruning, upsample_tokens
from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks
from ..core.kv_cache import KVCache, KVPolicy
from ..core.sampling import categorical, filter_top_k_top_p_, item_generators
from ..core.tokens import NextScaleBitTokens
from .model import Infinity
from .schedule import InfinitySchedule


def _per_scale(value: float | Sequence[float], K: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, K):
        raise NextScaleError(f"{len(values)} {name} values given for {K} scales: give one, or one per scale")
    return [float(v) for v in (values * K if len(values) == 1 else values)]


@dataclass
class InfinityOptions:
    """Upstream defaults: 2B ``cfg = 3, tau = 0.5``; 8B ``cfg = 3, tau = 1``; ``top_k = 900, top_p = 0.97``.
    ``cfg`` and ``tau`` are one value or one per scale; ``top_k = 0`` / ``top_p = 0`` switch the filters off.
    ``schedule``: the scale grids (an aspect ratio's template at a resolution); None: 1:1 at 1M."""

    cfg: float | Sequence[float] = 3.0
    tau: float | Sequence[float] = 0.5
    top_k: int = 900
    top_p: float = 0.97
    schedule: InfinitySchedule | None = None

    def __post_init__(self):
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise NextScaleError(f"top_k must be >= 0 and top_p in [0, 1], got top_k={self.top_k}, top_p={self.top_p}")
        taus = self.tau if isinstance(self.tau, (list, tuple)) else [self.tau]
        if not taus or any(not t > 0 for t in taus):
            raise NextScaleError(f"tau (temperature) must be positive, got {self.tau}")


@dataclass
class TextCondition:
    """What a run is conditioned on: flan-T5 features ``text_BTC`` of ``B`` prompts and their key mask ``mask_BT``;
    ``negative``, optional features and mask of a negative prompt (one for all, or one per prompt), replaces the
    learned unconditional embedding."""

    text_BTC: torch.Tensor
    mask_BT: torch.Tensor
    negative: tuple[torch.Tensor, torch.Tensor] | None = None


class BitGuide:
    """Base of bitwise guides (``hooks.guide`` of an Infinity run); the defaults change nothing."""

    def apply(self, si: int, bits_Bhwd: torch.Tensor) -> torch.Tensor:
        """The bits to use at scale ``si`` given the drawn ones ``(B, h, w, d)``."""
        return bits_Bhwd

    def override_summed(self, si: int, summed_BdHW: torch.Tensor) -> torch.Tensor | None:
        """A replacement for the summed codes ``(B, d, H, W)`` after scale ``si`` is added, or None to keep them."""
        return None


class KeepScales(BitGuide):
    """Teacher forcing: the first ``keep`` scales take the given bits (an encoded image's), the rest are sampled;
    ``keep = 0`` changes nothing, ``keep = K`` reproduces the image."""

    def __init__(self, bits: Sequence[torch.Tensor], keep: int):
        if not 0 <= keep <= len(bits):
            raise NextScaleError(f"keep must lie in 0..{len(bits)} (the encoded scales), got {keep}")
        self.bits, self.keep = list(bits), keep

    def apply(self, si, bits_Bhwd):
        if si >= self.keep:
            return bits_Bhwd
        given = self.bits[si].to(bits_Bhwd.device, torch.bool)
        if given.shape[1:] != bits_Bhwd.shape[1:]:
            raise NextScaleError(
                f"the kept bits of scale {si} are {tuple(given.shape[1:])} but the sampler draws "
                f"{tuple(bits_Bhwd.shape[1:])}: encode the image with the same schedule and size"
            )
        return given.expand_as(bits_Bhwd) if given.shape[0] == 1 else given


def patch_factor(model: Infinity, tokenizer) -> int:
    """1, or 2 when the model sees 2x2 latent cells per token (``token_dim = 4 d``, the 8B)."""
    d, token_dim = tokenizer.codebook_dim, model.config.token_dim
    if token_dim == d:
        return 1
    if token_dim == 4 * d:
        return 2
    raise NextScaleError(
        f"the Infinity transformer predicts {token_dim} bits per token but the tokenizer codes {d} bits per cell: "
        f"use the tokenizer it was trained with (2B: infinity_vae_d32reg; 8B: infinity_vae_d56_f8_14_patchify)"
    )


def latent_scales(model: Infinity, tokenizer, schedule: InfinitySchedule) -> list[tuple[int, int]]:
    """The tokenizer's latent ``(h, w)`` of each scale: the schedule's grids, twice as fine when patchified."""
    p = patch_factor(model, tokenizer)
    return [(h * p, w * p) for h, w in schedule.scales]


def unpatchify(bits_Bhwd: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, h, w, p*p*d)`` token bits to ``(B, p*h, p*w, d)`` latent-cell bits (upstream's ``pixel_shuffle``)."""
    if p == 1:
        return bits_Bhwd
    return F.pixel_shuffle(bits_Bhwd.permute(0, 3, 1, 2), p).permute(0, 2, 3, 1)


def patchify(x_BdHW: torch.Tensor, p: int) -> torch.Tensor:
    return x_BdHW if p == 1 else F.pixel_unshuffle(x_BdHW, p)


@torch.no_grad()
def sample_infinity(
    model: Infinity,
    tokenizer,
    condition: TextCondition,
    *,
    seed: int,
    options: InfinityOptions | None = None,
    hooks: SamplerHooks | None = None,
    device: str | torch.device | None = None,
) -> NextScaleBitTokens:
    """Sample one image per prompt of ``condition``; see the module docstring for every convention.

    ``tokenizer`` is a :class:`~.bsq.BSQTokenizer`. Both models compute on ``device`` (default: the text features'),
    wherever their weights are.
    """
    options = options or InfinityOptions()
    hooks = hooks or SamplerHooks()
    guide = hooks.guide
    if guide is not None and not isinstance(guide, BitGuide):
        raise NextScaleError(
            "Infinity samples bits: its guide must be a bitwise guide (models/infinity/editing.py's bind_bits binds "
            "NextScale Inpaint Guide's and Image to Image Guide's output; NextScale Sampler (Text) does it for its "
            "'guide' input)"
        )
    schedule = options.schedule or InfinitySchedule.from_template()
    text_BTC, mask_BT = condition.text_BTC, condition.mask_BT
    device = torch.device(device) if device is not None else text_BTC.device
    K, B = schedule.num_scales, text_BTC.shape[0]
    cfgs, taus = _per_scale(options.cfg, K, "cfg"), _per_scale(options.tau, K, "tau")
    guided = any(c != 1 for c in cfgs)
    p = patch_factor(model, tokenizer)
    latent = latent_scales(model, tokenizer, schedule)
    d = tokenizer.codebook_dim
    generators = item_generators(seed, B)
    accel = hooks.accel or Acceleration()
    accel.check(K, model.depth, hooks.control, hooks.kv_policy)
    pruning = TokenPruning(accel, list(schedule.scales), B) if accel.prune_scales else None

    ctx = model.condition(text_BTC.to(device), mask_BT.to(device), guided, condition.negative)
    cache = KVCache(model.depth, schedule.num_tokens, hooks.kv_policy)
    summed_BdHW = torch.zeros(B, d, *latent[-1], device=device)
    bits_list: list[torch.Tensor] = []
    try:
        x_RlC = model.first_token_map(ctx)
        for si, (h, w) in enumerate(schedule.scales):
            if accel.shortcut(si, K):  # not run: the summed codes stay; the bits are a stand-in (core.accel)
                bits_list.append(upsample_tokens(bits_list[K - accel.shortcut_scales - 1], latent[si]))
                if hooks.callback is not None:
                    hooks.callback(si, K, summed_BdHW)
                continue
            if guided and not accel.guided(si, K):  # guidance stops: the prompts' rows only from here on
                guided, ctx, x_RlC = False, ctx.first_rows(B), x_RlC[:B]
                cache.keep_rows(B)
            logits_RlV = model.forward_scale(si, x_RlC, ctx, cache, schedule, hooks.control, pruning) / taus[si]
            if guided:
                logits_RlV = cfgs[si] * logits_RlV[:B] + (1 - cfgs[si]) * logits_RlV[B:]
            pairs_BN2 = filter_top_k_top_p_(logits_RlV.reshape(B, -1, 2), options.top_k, options.top_p)
            bits_Bhwd = categorical(pairs_BN2.softmax(dim=-1), generators).view(B, h, w, -1)
            bits_Bhwd = unpatchify(bits_Bhwd, p).bool()
            if guide is not None:
                bits_Bhwd = guide.apply(si, bits_Bhwd).bool()
            bits_list.append(bits_Bhwd)
            summed_BdHW += tokenizer.upsample_codes(tokenizer.bits_to_codes(bits_Bhwd).to(device), latent[-1])
            if guide is not None and (replaced := guide.override_summed(si, summed_BdHW)) is not None:
                summed_BdHW.copy_(replaced)
            if hooks.callback is not None:
                hooks.callback(si, K, summed_BdHW)
            if si < K - 1 and not accel.shortcut(si + 1, K):
                next_BdHW = patchify(tokenizer.downsample_codes(summed_BdHW, latent[si + 1]), p)
                x_BlC = model.scale_input(si + 1, next_BdHW.flatten(2).transpose(1, 2))
                x_RlC = x_BlC.repeat(2, 1, 1) if guided else x_BlC
    finally:
        cache.free()
    return NextScaleBitTokens(
        bits=bits_list,
        scales=tuple(latent),
        summed_codes=summed_BdHW,
        source="sampled",
        extra={
            "seed": seed,
            "cfg": options.cfg,
            "tau": options.tau,
            "top_k": options.top_k,
            "top_p": options.top_p,
            "schedule": [list(s) for s in schedule.scales],
            "kv_policy": (hooks.kv_policy or KVPolicy()).name,
            "accel": accel.name,
        },
    )
