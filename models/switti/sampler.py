"""The Switti scale loop (upstream ``SwittiPipeline.__call__``, ``models/pipeline.py``): text to VAR-layout tokens.

Per scale ``si`` of ``K``:
1. The transformer runs the scale's token map. Rows: the ``B`` prompts, then ``B`` copies of the null prompt while
   guidance is on. Switti attends within the scale; Switti-AR through a KV cache of every earlier scale.
2. Guidance on the fp32 logits for ``guidance_start <= si < guidance_stop``: ``(1 + t) * cond - t * null`` with
   VAR's ramp ``t = cfg * si / (K - 1)``; before ``guidance_start`` the conditional rows are used as they are.
   From ``guidance_stop`` on, the null rows are dropped (from the batch, and from Switti-AR's KV cache and its
   policy's state: :meth:`~..core.kv_cache.KVCache.keep_rows`) and the logits are divided by ``temperature``
   (upstream's ``last_scale_temp``; 1 leaves them as they are).
3. ``more_smooth`` (for ``smooth_start <= si < guidance_stop``): the code map is a Gumbel-softmax mixture of codes,
   ``softmax((logits * (1 + r) + gumbel) / tau)`` with ``r = si / (K - 1)`` and ``tau = max(0.27 (1 - 0.95 r),
   0.005)``, over the unfiltered logits (upstream); the recorded token is the mixture's heaviest code. Otherwise
   top-k and top-p (:func:`~..core.sampling.filter_top_k_top_p_`) then one categorical draw per token.
4. ``h`` goes through the VQ-VAE's ``next_input`` (VAR's residual quantizer), which accumulates ``f_hat`` and
   returns the next scale's input.

Randomness follows VAR's sampler: batch item ``i`` draws from its own CPU generator seeded ``(seed + i) mod
2**64``: per scale ``pn**2`` uniforms, or (smoothing) its Gumbel noise; the draws are applied on the sampling
device. Upstream draws with one CUDA generator for the batch: same distribution, other images for a seed.

Hooks (:class:`~..core.hooks.SamplerHooks`): ``guide`` (VAR's token guides: inpaint, image to image by kept
scales) may replace the drawn indices and ``f_hat``; ``kv_policy`` decides what Switti-AR's cache keeps (refused
for Switti, which has no cache across scales); ``callback(si, K, f_hat)`` runs once per scale (progress, previews,
interrupts; an exception ends sampling and propagates, the cache is freed in every case). ``control`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks, guided_fhat, refuse_unsupported
from ..core.kv_cache import KVCache, KVPolicy
from ..core.sampling import categorical, filter_top_k_top_p_, gumbel, item_generators
from ..core.schedule import token_count
from ..core.tokens import NextScaleTokens
from .model import Switti, SwittiText

HOOKS = frozenset({"guide", "kv_policy", "callback"})
NO_CACHE = (
    "Switti attends within each scale and keeps no KV cache across scales: KV policies apply to Switti-AR only; "
    "disconnect kv_policy"
)


@dataclass
class SwittiOptions:
    """Upstream's sampling options; the defaults are its pipeline's (``more_smooth`` off; its README uses
    ``more_smooth``, ``smooth_start = 2``, ``guidance_stop = 11`` and ``temperature = 0.1`` at 1024 px).
    ``top_k = 0`` and ``top_p = 0`` switch the filters off; ``guidance_stop >= K`` guides to the last scale.
    ``schedule``: the scales to sample (None: the model's own); another known schedule of as many scales works,
    since every scale's RoPE spans the same range (a 512 px model samples 256 px)."""

    cfg: float = 6.0
    top_k: int = 400
    top_p: float = 0.95
    more_smooth: bool = False
    smooth_start: int = 0
    guidance_start: int = 0
    guidance_stop: int = 10
    temperature: float = 1.0
    schedule: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise NextScaleError(f"top_k must be >= 0 and top_p in [0, 1], got top_k={self.top_k}, top_p={self.top_p}")
        if not self.temperature > 0:
            raise NextScaleError(f"temperature must be positive, got {self.temperature}")
        if min(self.smooth_start, self.guidance_start, self.guidance_stop) < 0:
            raise NextScaleError("smooth_start, guidance_start and guidance_stop count scales from 0: none is negative")

    def guided(self, si: int) -> bool:
        return self.guidance_start <= si < self.guidance_stop

    def has_null_rows(self, num_scales: int) -> bool:
        """Whether a run needs the null prompt's rows at all."""
        return self.cfg != 0 and any(self.guided(si) for si in range(num_scales))


@dataclass
class SwittiCondition:
    """The prompts (``B`` rows) and the null prompt (one row, or ``B``), both Switti text (:class:`SwittiText`)."""

    text: SwittiText
    null: SwittiText


def _code_map(quant, idx_Bl: torch.Tensor, pn: int, soft_BlV=None, forced_Bl=None) -> torch.Tensor:
    """``(B, Cvae, pn, pn)``: the codes of ``idx_Bl`` or the mixture ``soft_BlV`` of codes (hard where forced)."""
    hard_BChw = quant.embed(idx_Bl, pn)
    if soft_BlV is None:
        return hard_BChw
    codebook_VC = quant.codebook(idx_Bl.device).float()
    soft_BChw = (soft_BlV @ codebook_VC).transpose(1, 2).reshape(hard_BChw.shape)
    if forced_Bl is None:
        return soft_BChw
    return torch.where(forced_Bl.view(-1, 1, pn, pn), hard_BChw, soft_BChw)


def check_inputs(model: Switti, tokenizer) -> None:
    cfg = model.config
    codebook = tuple(tokenizer.quantize.embedding.weight.shape)
    if codebook != (cfg.vocab_size, cfg.cvae):
        raise NextScaleError(
            f"the VQ-VAE's codebook is {codebook[0]} codes x {codebook[1]} channels but the Switti transformer "
            f"predicts {cfg.vocab_size} codes x {cfg.cvae} channels: use VQVAE-Switti (yresearch/VQVAE-Switti)"
        )


@torch.no_grad()
def sample_switti(
    model: Switti,
    tokenizer,
    condition: SwittiCondition,
    *,
    seed: int,
    options: SwittiOptions | None = None,
    hooks: SamplerHooks | None = None,
    device: str | torch.device | None = None,
) -> NextScaleTokens:
    """Sample one image per prompt row of ``condition``; see the module docstring for every convention.

    ``tokenizer`` is the VQ-VAE (a VAR ``MultiScaleVQVAE``). Both models compute on ``device`` (default: the text's),
    wherever their weights are. Returns the ``(B, pn, pn)`` indices per scale on Switti's schedule; ``f_hat`` is
    kept when the indices cannot rebuild it (smoothing, a guide that set it).
    """
    options = options or SwittiOptions()
    hooks = hooks or SamplerHooks()
    refuse_unsupported(hooks, HOOKS, "Switti")
    causal = model.config.causal
    if hooks.kv_policy is not None and not causal:
        raise NextScaleError(NO_CACHE)
    check_inputs(model, tokenizer)
    device = torch.device(device) if device is not None else condition.text.context_BTC.device
    patch_nums, quant, guide = model.schedule(options.schedule), tokenizer.quantize, hooks.guide
    K, B = len(patch_nums), condition.text.context_BTC.shape[0]
    null_rows = options.has_null_rows(K)
    text = SwittiText.cat([condition.text, condition.null.expand(B)]) if null_rows else condition.text
    text = SwittiText(text.context_BTC.to(device), text.pooled_BC.to(device), text.bias_BT.to(device))
    generators = item_generators(seed, B)
    f_hat = torch.zeros(B, quant.channels, patch_nums[-1], patch_nums[-1], device=device)
    indices: list[torch.Tensor] = []
    fhat_from_indices = True
    cache = KVCache(model.depth, token_count(patch_nums), hooks.kv_policy) if causal else None
    try:
        cond = model.condition(text)
        x_RlC = model.first_token_map(cond)
        for si, pn in enumerate(patch_nums):
            if null_rows and si == options.guidance_stop:  # the null rows are dropped once guidance stops
                cond, x_RlC = cond.rows(B), x_RlC[:B]
                if cache is not None:
                    cache.keep_rows(B)
            logits_RlV = model.forward_scale(si, x_RlC, cond, cache, patch_nums)
            logits_BlV, ratio = logits_RlV[:B], si / (K - 1)
            if options.guided(si):
                if null_rows:
                    t = options.cfg * ratio
                    logits_BlV = (1 + t) * logits_BlV - t * logits_RlV[B:]
            elif si >= options.guidance_stop and options.temperature != 1:
                logits_BlV = logits_BlV / options.temperature
            smooth = options.more_smooth and options.smooth_start <= si < options.guidance_stop
            soft_BlV = None
            if smooth:
                scaled_BlV = logits_BlV * (1 + ratio)
                tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
                soft_BlV = ((scaled_BlV + gumbel(generators, scaled_BlV)) / tau).softmax(dim=-1)
                idx_Bl = soft_BlV.argmax(dim=-1)
                fhat_from_indices = False
            else:
                filtered_BlV = filter_top_k_top_p_(logits_BlV, options.top_k, options.top_p)
                idx_Bl = categorical(filtered_BlV.softmax(dim=-1), generators)
            forced_Bl = None
            if guide is not None:
                drawn_Bl, idx_Bl = idx_Bl, guide.apply(si, idx_Bl).to(device=device, dtype=torch.long)
                forced_Bl = guide.forced(si)
                forced_Bl = idx_Bl != drawn_Bl if forced_Bl is None else forced_Bl.to(device=device, dtype=torch.bool)
            indices.append(idx_Bl.view(B, pn, pn))
            h_BChw = _code_map(quant, idx_Bl, pn, soft_BlV, forced_Bl)
            f_hat, next_BChw = quant.next_input(si, patch_nums, f_hat, h_BChw)
            next_BChw, replaced = guided_fhat(guide, si, patch_nums, f_hat, next_BChw)
            fhat_from_indices &= not replaced
            if hooks.callback is not None:
                hooks.callback(si, K, f_hat)
            if si < K - 1:
                x_BlC = model.scale_input(si + 1, next_BChw.flatten(2).transpose(1, 2).to(device))
                x_RlC = x_BlC.repeat(2, 1, 1) if x_RlC.shape[0] == 2 * B else x_BlC
    finally:
        if cache is not None:
            cache.free()
    return NextScaleTokens(
        indices=indices,
        patch_nums=patch_nums,
        f_hat=None if fhat_from_indices else f_hat,
        source="sampled",
        extra={
            **{k: getattr(options, k) for k in SwittiOptions.__dataclass_fields__},
            "seed": seed,
            "kv_policy": (hooks.kv_policy or KVPolicy()).name if causal else None,
        },
    )
