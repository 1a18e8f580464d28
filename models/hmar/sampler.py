"""HMAR's sampler (upstream ``HMAR.generate``): VAR's scale loop without a KV cache, plus masked refinement passes
within a scale.

Per scale ``si`` of ``K``, with the refinement counts ``counts = refinement[si]`` (``sum(counts) = pn**2``):
1. The next-scale pass (:meth:`~.model.HMAR.next_scale_logits`) on the scale's input alone (Markovian: the input
   carries the coarser scales; nothing of them is attended to). Guidance as VAR's: ``(1 + t) * cond - t * uncond``,
   ``t = cfg * si / (K - 1)``, rows ``[cond; null]`` (``cfg == 0``: the conditional rows only); then top-k, top-p
   and one categorical draw per token (:mod:`..core.sampling`).
2. With more than one count, each token's confidence is the probability of its drawn code under the filtered
   distribution, and the ``sum(counts[1:])`` least confident tokens are masked. Refinement pass ``j = 1, 2, ...``
   (:meth:`~.model.HMAR.refine_logits`) sees the coarser scales' ``f_hat`` and the scale's current codes with the
   masked ones replaced by ``mask_embed``; its logits are guided with ``t = cfg * 1e-6`` (upstream's fixed ratio),
   filtered, and drawn for every token; the masked tokens take the new codes. Before the next pass the
   ``sum(counts[j + 1:])`` least confident of the masked tokens (by the new filtered distribution) stay masked.
3. A guide's ``apply`` may replace the scale's final indices; the code map goes through VAR's ``next_input`` (``f_hat``
   update, the next scale's input), then the guide's ``override_fhat`` and the callback.

Upstream's released setting, :data:`OFFICIAL_REFINEMENT`, refines scales 1 (2x2: one token from the first pass,
three re-drawn) and 2 (3x3: counts 1, 1, 2, 5) of VAR's 256 px schedule.

Randomness: item ``i`` draws from its own CPU generator seeded ``(seed + i) mod 2**64``: per scale ``pn**2``
uniforms for the first pass, then ``pn**2`` per refinement pass. Upstream draws with ``torch.multinomial``: the same
distribution, other images for a seed. Ties in confidence (greedy sampling) are ranked in raster order.

Hooks: ``guide`` and ``callback(si, K, f_hat)``. ``control`` (no adapter was trained for HMAR's split transformer),
``kv_policy`` (HMAR keeps no KV cache) and ``accel`` are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks, guided_fhat
from ..core.sampling import categorical, filter_top_k_top_p_, item_generators
from ..core.schedule import SCHEDULE_256
from ..core.tokens import NextScaleTokens
from ..var.sampler import check_labels
from .model import HMAR

HOOKS = frozenset({"guide", "callback"})
REFUSED = {
    "control": "no control adapter was trained for HMAR's split transformer",
    "kv_policy": "HMAR keeps no KV cache: each scale attends only to its own tokens, whose input already carries "
    "the coarser scales, so there is nothing for a policy to compress",
    "accel": "the training-free accelerations prune and skip VAR's cached scales; HMAR has no cache to prune",
}
REFINE_GUIDANCE_RATIO = 1e-6  # upstream's guidance ratio in the refinement passes (t = cfg * ratio)
OFFICIAL_REFINEMENT = ((1,), (1, 3), (1, 1, 2, 5))  # upstream mask_schedule, scales after these single-pass


def refinement_for(patch_nums: Sequence[int], counts: Sequence[Sequence[int]] | None = None) -> tuple[tuple[int, ...]]:
    """Per scale, the tokens each pass settles: ``counts`` for the first scales (default: :data:`OFFICIAL_REFINEMENT`
    on VAR's 256 px schedule, none on another), one pass (``(pn**2,)``) for the rest. Checked: positive counts
    summing to each scale's ``pn**2``."""
    if counts is None:
        counts = OFFICIAL_REFINEMENT if tuple(patch_nums) == SCHEDULE_256 else ()
    if len(counts) > len(patch_nums):
        raise NextScaleError(f"refinement lists {len(counts)} scales; the model has {len(patch_nums)}")
    out = []
    for si, pn in enumerate(patch_nums):
        scale = tuple(int(c) for c in counts[si]) if si < len(counts) else (pn * pn,)
        if not scale or min(scale) < 1 or sum(scale) != pn * pn:
            raise NextScaleError(
                f"refinement of scale {si} ({pn}x{pn}) is {list(scale)}: give positive token counts per pass that "
                f"sum to {pn * pn}, e.g. {[1, pn * pn - 1] if pn > 1 else [1]}"
            )
        out.append(scale)
    return tuple(out)


def parse_refinement(text: str, patch_nums: Sequence[int]) -> tuple[tuple[int, ...]]:
    """``"1 | 1,3 | 1,1,2,5"`` (scales from the first, separated by ``|``; per scale the tokens each pass settles)
    to :func:`refinement_for`'s counts. An empty text: one pass per scale."""
    try:
        counts = [[int(c) for c in part.split(",")] for part in text.split("|")] if text.strip() else []
    except ValueError:
        raise NextScaleError(
            f"refinement '{text}' must be comma-separated token counts per scale, scales separated by '|', "
            f"e.g. '1 | 1,3 | 1,1,2,5'"
        ) from None
    return refinement_for(patch_nums, counts)


@dataclass(frozen=True)
class HMAROptions:
    """Upstream's released sampling settings (``config/sample/hmar-d*.yaml``): cfg 1.7, top-k 1000, top-p 0.99.
    ``refinement``: per scale, the tokens each pass settles (None: :func:`refinement_for`'s default)."""

    cfg: float = 1.7
    top_k: int = 1000
    top_p: float = 0.99
    refinement: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.cfg < 0 or self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise NextScaleError(
                f"HMAR needs cfg >= 0, top_k >= 0 and top_p in [0, 1], got {self.cfg}, {self.top_k}, {self.top_p}"
            )


def check_inputs(generator: HMAR, tokenizer) -> None:
    cfg, codebook = generator.config, tuple(tokenizer.quantize.embedding.weight.shape)
    if codebook != (cfg.vocab_size, cfg.cvae):
        raise NextScaleError(
            f"the HMAR generator draws {cfg.vocab_size} codes of {cfg.cvae} channels, the tokenizer has {codebook}: "
            f"HMAR uses VAR's VQ-VAE, vae_ch160v4096z32.pth"
        )
    if tuple(tokenizer.patch_nums)[-1] != cfg.patch_nums[-1]:
        raise NextScaleError(
            f"the HMAR generator ends at {cfg.patch_nums[-1]}x{cfg.patch_nums[-1]} codes, the tokenizer at "
            f"{tokenizer.patch_nums[-1]}: use VAR's 256 px VQ-VAE, vae_ch160v4096z32.pth"
        )


def _draw(
    logits_RlV: torch.Tensor, B: int, t: float, options: HMAROptions, generators
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per token from the guided (``(1 + t) cond - t uncond`` over ``[cond; null]`` rows, the ``B`` rows as
    they are without guidance), filtered logits: ``(idx_Bl, probs_BlV)``, ``probs`` the filtered distribution."""
    guided_BlV = logits_RlV if logits_RlV.shape[0] == B else (1 + t) * logits_RlV[:B] - t * logits_RlV[B:]
    probs_BlV = filter_top_k_top_p_(guided_BlV, options.top_k, options.top_p).softmax(dim=-1)
    return categorical(probs_BlV, generators), probs_BlV


def _least_confident(probs_BlV: torch.Tensor, idx_Bl: torch.Tensor, among_Bm: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` positions of ``among_Bm`` whose drawn code is least probable, least first (ties: raster order)."""
    confidence_Bm = probs_BlV.gather(2, idx_Bl[..., None])[..., 0].gather(1, among_Bm)
    return among_Bm.gather(1, confidence_Bm.argsort(dim=1, stable=True)[:, :n])


def _flat(x_BChw: torch.Tensor) -> torch.Tensor:
    return x_BChw.flatten(2).transpose(1, 2)


@torch.no_grad()
def sample_hmar(
    generator: HMAR,
    tokenizer,
    labels_B: torch.Tensor,
    *,
    seed: int,
    options: HMAROptions | None = None,
    hooks: SamplerHooks | None = None,
    device: str | torch.device | None = None,
) -> NextScaleTokens:
    """One image per label; see the module docstring."""
    options = options or HMAROptions()
    hooks = hooks or SamplerHooks()
    for name, why in REFUSED.items():
        if getattr(hooks, name) is not None:
            raise NextScaleError(f"HMAR takes no {name}: {why}; disconnect it")
    cfg = generator.config
    check_inputs(generator, tokenizer)
    refinement = refinement_for(cfg.patch_nums, options.refinement)
    labels_B = torch.as_tensor(labels_B, device=device)
    check_labels(labels_B, cfg.num_classes)
    device, B, patch_nums, K = labels_B.device, labels_B.shape[0], cfg.patch_nums, cfg.num_scales
    quant, guide, generators = tokenizer.quantize, hooks.guide, item_generators(seed, B)
    guided = options.cfg != 0
    rows_R = torch.cat((labels_B, torch.full_like(labels_B, cfg.num_classes))) if guided else labels_B

    def rows(x_BlC: torch.Tensor) -> torch.Tensor:
        return x_BlC.repeat(2, 1, 1) if guided else x_BlC

    cond = generator.condition(rows_R)
    f_hat = torch.zeros(B, quant.channels, patch_nums[-1], patch_nums[-1], device=device)
    x_RlC, indices, fhat_from_indices = generator.first_token_map(cond), [], True
    for si, pn in enumerate(patch_nums):
        idx_Bl, probs_BlV = _draw(
            generator.next_scale_logits(x_RlC, cond), B, options.cfg * si / (K - 1), options, generators
        )
        counts = refinement[si]
        if len(counts) > 1:
            every_Bl = torch.arange(pn * pn, device=device).expand(B, -1)
            masked_Bm = _least_confident(probs_BlV, idx_Bl, every_Bl, sum(counts[1:]))
            coarse_BlCv = _flat(F.interpolate(f_hat, size=(pn, pn), mode="area"))
            for step in range(1, len(counts)):
                h_BChw = quant.contribution(si, patch_nums, quant.embed(idx_Bl, pn))
                masked_Bl = torch.zeros(B, pn * pn, dtype=torch.bool, device=device).scatter_(1, masked_Bm, True)
                x_BlC = generator.refine_input(
                    si, coarse_BlCv, _flat(F.interpolate(h_BChw, size=(pn, pn), mode="area")), masked_Bl, cond
                )
                redrawn_Bl, probs_BlV = _draw(
                    generator.refine_logits(rows(x_BlC), cond), B, options.cfg * REFINE_GUIDANCE_RATIO, options,
                    generators,
                )
                idx_Bl = torch.where(masked_Bl, redrawn_Bl, idx_Bl)
                if step < len(counts) - 1:
                    masked_Bm = _least_confident(probs_BlV, idx_Bl, masked_Bm, sum(counts[step + 1 :]))
        if guide is not None:
            idx_Bl = guide.apply(si, idx_Bl).to(device=device, dtype=torch.long).reshape(B, pn * pn)
        indices.append(idx_Bl.view(B, pn, pn))
        f_hat, next_BChw = quant.next_input(si, patch_nums, f_hat, quant.embed(idx_Bl, pn))
        next_BChw, replaced = guided_fhat(guide, si, patch_nums, f_hat, next_BChw)
        fhat_from_indices &= not replaced
        if hooks.callback is not None:
            hooks.callback(si, K, f_hat)
        if si < K - 1:
            x_RlC = rows(generator.scale_input(si + 1, _flat(next_BChw), cond))
    return NextScaleTokens(
        indices, patch_nums, f_hat=None if fhat_from_indices else f_hat, labels=labels_B, source="sampled",
        extra={"seed": seed, "cfg": options.cfg, "top_k": options.top_k, "top_p": options.top_p,
               "refinement": [list(c) for c in refinement]},
    )
