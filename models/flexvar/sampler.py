"""FlexVAR's scale loop (upstream ``autoregressive_infer_cfg``), on any schedule.

Per scale ``si`` of the schedule's ``K``:
1. The transformer runs the scale's tokens through a KV cache holding every earlier scale; with guidance
   (``cfg != 0``) the batch has ``2B`` rows, the conditional ones first, then the null class.
2. Guidance on the fp32 logits: ``(1 + t) * cond - t * uncond`` with, for ``cfg_schedule`` "linear" (upstream's
   default), ``t = cfg * si / min(K - 1, 9)`` (the ramp reaches ``cfg`` at scale 9 and keeps rising after it, as
   upstream) and ``t = cfg`` on sides above ``max_pn``; "constant": ``t = cfg`` everywhere (upstream's LlamaGen
   guidance with scale ``g`` is "constant" with ``cfg = g - 1``).
3. Top-k and top-p, then one categorical draw per token (:mod:`..core.sampling`; item ``i`` draws from seed
   ``seed + i``). A side that is not drawn (:func:`.schedule.drawn`) uses top-k 1: the most likely token.
4. The drawn token map is the scale's image; its codes, bicubic-upsampled to the next side, are the next input.

The result is the per-scale token maps (:class:`~..core.tokens.NextScaleTokens`); the last one decodes to the
picture, any earlier one to the picture at that scale. Hooks (:data:`HOOKS`):
- ``guide``: ``apply(si, idx_Bl)`` may replace the drawn tokens before they become the next input (inpaint, outpaint,
  class edit, image to image: VAR's edit guides in their "tokens" mode, the reference encoded by FlexVAE on the
  run's schedule). There is no running latent, so ``override_fhat`` is never asked.
- ``kv_policy``: what the KV cache keeps.
- ``callback(si, K, codes_BChw)`` with the scale's code map.
Control models (trained on VAR's hidden states) and accelerations (built on VAR's residual sum) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks, refuse_unsupported
from ..core.kv_cache import KVCache, KVPolicy
from ..core.sampling import categorical, filter_top_k_top_p_, item_generators
from ..core.schedule import SCHEDULE_256, token_count
from ..core.tokens import NextScaleTokens
from ..var.sampler import check_labels
from .schedule import check_schedule, drawn
from .tokenizer import FlexVAE

HOOKS = frozenset({"guide", "kv_policy", "callback"})
CFG_SCHEDULES = ("linear", "constant")
RAMP_SCALES = 9  # the linear ramp's denominator caps at 9 (upstream)


@dataclass
class FlexVAROptions:
    """A run's schedule and sampling settings (defaults: upstream's evaluation at 256 px)."""

    patch_nums: tuple[int, ...] = SCHEDULE_256
    cfg: float = 2.5
    cfg_schedule: str = "linear"
    top_k: int = 900
    top_p: float = 0.95
    max_pn: int = 16

    def __post_init__(self):
        self.patch_nums = check_schedule(self.patch_nums)
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise NextScaleError(f"cfg_schedule '{self.cfg_schedule}' is not one of {', '.join(CFG_SCHEDULES)}")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise NextScaleError(f"top_k must be >= 0 and top_p in [0, 1], got top_k={self.top_k}, top_p={self.top_p}")
        if self.max_pn < 1:
            raise NextScaleError(f"max_pn must be at least 1, got {self.max_pn}")

    def guidance(self, si: int) -> float:
        """``t`` of scale ``si``: guided logits are ``(1 + t) * cond - t * uncond``."""
        pn, K = self.patch_nums[si], len(self.patch_nums)
        if self.cfg_schedule == "constant" or pn > self.max_pn:
            return self.cfg
        return self.cfg * si / min(K - 1, RAMP_SCALES)

    def top_k_at(self, si: int) -> int:
        return self.top_k if drawn(self.patch_nums[si], self.max_pn) else 1


def check_inputs(generator, tokenizer) -> None:
    """Raise unless the tokenizer's codebook is the one the generator predicts."""
    cfg = generator.config
    codebook = tuple(tokenizer.quantize.embedding.weight.shape)
    if codebook != (cfg.vocab_size, cfg.cvae):
        raise NextScaleError(
            f"the tokenizer's codebook is {codebook[0]} codes x {codebook[1]} channels but the FlexVAR generator "
            f"predicts {cfg.vocab_size} codes x {cfg.cvae} channels: use FlexVAE.pth, the tokenizer it was trained "
            f"with"
        )


@torch.no_grad()
def sample_flexvar(
    generator, tokenizer, labels_B: torch.Tensor, *, seed: int, options: FlexVAROptions | None = None,
    hooks: SamplerHooks | None = None, device: str | torch.device | None = None,
) -> NextScaleTokens:
    """One image per label on ``options.patch_nums``; see the module docstring. ``generator`` is a
    :class:`~.model.FlexVAR`, ``tokenizer`` a :class:`~.tokenizer.FlexVAE`; both compute on ``device`` (default:
    the labels')."""
    options = options or FlexVAROptions()
    hooks = hooks or SamplerHooks()
    refuse_unsupported(hooks, HOOKS, "FlexVAR")
    labels_B = torch.as_tensor(labels_B, device=device)
    device = labels_B.device
    check_inputs(generator, tokenizer)
    check_labels(labels_B, generator.num_classes)
    patch_nums, B = options.patch_nums, labels_B.shape[0]
    guided = options.cfg != 0
    rows_R = torch.cat((labels_B, torch.full_like(labels_B, generator.num_classes))) if guided else labels_B
    generators = item_generators(seed, B)
    indices: list[torch.Tensor] = []
    cache = KVCache(generator.depth, token_count(patch_nums), hooks.kv_policy)
    try:
        cond = generator.condition(rows_R, patch_nums)
        x_RlC = generator.first_token_map(cond)
        begin = 0
        for si, pn in enumerate(patch_nums):
            logits_RlV = generator.forward_scale(si, x_RlC, cond, cache)
            t = options.guidance(si) if guided else 0.0
            logits_BlV = (1 + t) * logits_RlV[:B] - t * logits_RlV[B:] if guided else logits_RlV
            logits_BlV = filter_top_k_top_p_(logits_BlV, options.top_k_at(si), options.top_p)
            idx_Bl = categorical(logits_BlV.softmax(dim=-1), generators)
            if hooks.guide is not None:
                idx_Bl = hooks.guide.apply(si, idx_Bl).to(device=device, dtype=torch.long)
            idx_Bhw = idx_Bl.view(B, pn, pn)
            indices.append(idx_Bhw)
            if hooks.callback is not None:
                hooks.callback(si, len(patch_nums), tokenizer.code_map(idx_Bhw))
            begin += pn * pn
            if si + 1 < len(patch_nums):
                x_BlC = generator.scale_input(begin, tokenizer.next_input(idx_Bhw, patch_nums[si + 1]), cond)
                x_RlC = x_BlC.repeat(2, 1, 1) if guided else x_BlC
    finally:
        cache.free()
    return NextScaleTokens(
        indices=indices, patch_nums=patch_nums, labels=labels_B, source="sampled",
        tokenizer_kind=FlexVAE.tokenizer_kind,
        extra={
            "seed": seed, "cfg": options.cfg, "cfg_schedule": options.cfg_schedule, "top_k": options.top_k,
            "top_p": options.top_p, "max_pn": options.max_pn, "kv_policy": (hooks.kv_policy or KVPolicy()).name,
        },
    )
