"""The scale loop: the one sampler that nodes, benchmarks and tests call (upstream ``autoregressive_infer_cfg``).

Per scale ``si`` of ``K``:
1. The transformer runs the scale's token map through a KV cache holding every earlier scale.
   With guidance (``cfg != 0``) the batch has ``2B`` rows: the ``B`` conditional rows first, then the same images
   with the null class; both halves get the same input. ``cfg == 0`` runs the conditional rows only.
2. Guidance on the fp32 logits: ``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (K - 1)`` ("linear", VAR's
   ramp: scale 0 unguided, the last scale at full ``cfg``) or ``t = cfg`` ("constant").
3. ``logits /= temperature`` (one value, or one per scale; 1 leaves the logits untouched), then top-k and top-p
   (:func:`filter_top_k_top_p_`), then one categorical draw per token from ``softmax(logits)``
   (:func:`~..core.sampling.categorical`: one uniform per token, inverse CDF).
4. The code map ``h`` is the codebook rows of the drawn indices or, with ``more_smooth``, a Gumbel-softmax mixture of
   codes over the filtered logits (its noise drawn after the uniforms, from the same generator). ``h`` goes through
   ``tokenizer.quantize.next_input``, which accumulates ``f_hat`` and returns the next scale's input.

Steps 2-4 (everything after the transformer) are :meth:`ScaleSampler.step`, which holds the run's state; the
collaborative sampler (:mod:`.collaborative`) switches transformers mid-run around the same object.

Randomness and batches: batch item ``i`` of a run with seed ``s`` draws from its own CPU ``torch.Generator``,
seeded with ``(s + i) mod 2**64``, and the numbers are applied on the sampling device (:mod:`..core.sampling`), so
a seed gives the same draws on every device: per scale ``pn**2`` uniforms, then (with ``more_smooth``) its Gumbel
noise. So item ``i`` of a batch makes exactly the draws of a batch-of-1 run with seed ``s + i`` and the same label.
Upstream draws with ``torch.multinomial`` on the sampling device: the distribution is the same, the images of a
seed are not (nor were they across devices upstream). The probabilities themselves agree to rounding only (a matrix
product may round differently for another batch size), so a token could differ only where a draw falls within
rounding distance of a probability boundary; the soft ``more_smooth`` latent agrees to about 1e-4.

Hooks (:class:`SamplerHooks`, all optional):
- ``guide`` (:class:`Guide`): ``apply(si, idx_Bl)`` may replace the drawn indices (inpainting, img2img); with
  ``more_smooth`` the tokens it sets (``forced(si)``, by default those it changed) use their hard code instead of
  the soft mixture. ``override_fhat(si, f_hat)`` may return a new ``f_hat`` after the scale's update (f-hat
  blending), from which the next input is recomputed.
- ``control`` (:class:`Control`): ``block_input(si, layer, x_BlC)`` may change the hidden state (all ``2B`` rows)
  before each block; ``logits(si, logits_BlV)`` may change the guided logits before temperature and filtering.
- ``kv_policy`` (:class:`~.kv_cache.KVPolicy`): what the KV cache keeps (default: everything).
- ``accel`` (:class:`~..core.accel.Acceleration`): token pruning, guidance stop and shortcut at the last scales
  (default: off, and the loop above is unchanged). A guide acts on the scales that run.
- ``callback(si, num_scales, f_hat)``: called once per scale after ``f_hat`` is updated (progress, previews,
  interrupts). ``f_hat`` is the live accumulator: read it, do not modify it. An exception raised by the callback
  ends sampling and propagates; the KV cache is freed in every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.accel import Acceleration, TokenPruning, upsample_tokens
from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks, guided_fhat
from ..core.kv_cache import KVCache, KVPolicy
from ..core.sampling import categorical, filter_top_k_top_p_, gumbel, item_generators
from ..core.tokens import NextScaleTokens

CFG_SCHEDULES = ("linear", "constant")


@dataclass
class SamplingOptions:
    """``top_k = 0`` and ``top_p = 0`` switch the filters off; ``temperature`` is one value or one per scale."""

    cfg: float = 4.0
    top_k: int = 900
    top_p: float = 0.95
    more_smooth: bool = False
    temperature: float | Sequence[float] = 1.0
    cfg_schedule: str = "linear"

    def __post_init__(self):
        temps = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise NextScaleError(f"cfg_schedule '{self.cfg_schedule}' is not one of {', '.join(CFG_SCHEDULES)}")
        if self.top_k < 0 or not 0.0 <= self.top_p <= 1.0:
            raise NextScaleError(f"top_k must be >= 0 and top_p in [0, 1], got top_k={self.top_k}, top_p={self.top_p}")
        if not temps or any(not t > 0 for t in temps):
            raise NextScaleError(f"temperatures must be positive, got {self.temperature}")

    def guidance(self, si: int, num_scales: int) -> float:
        """``t`` of scale ``si``: guided logits are ``(1 + t) * cond - t * uncond``."""
        return self.cfg * si / (num_scales - 1) if self.cfg_schedule == "linear" else self.cfg

    def temperature_at(self, si: int, num_scales: int) -> float:
        temps = self.temperature if isinstance(self.temperature, (list, tuple)) else [self.temperature]
        if len(temps) not in (1, num_scales):
            raise NextScaleError(f"{len(temps)} temperatures given for {num_scales} scales: give one, or one per scale")
        return float(temps[si] if len(temps) > 1 else temps[0])


def _guided(logits_RlV: torch.Tensor, B: int, t: float) -> torch.Tensor:
    """``(1 + t) * cond - t * uncond`` from the ``[cond; null]`` rows (just the conditional rows when ``t == 0``)."""
    if t == 0:
        return logits_RlV[:B]
    return (1 + t) * logits_RlV[:B] - t * logits_RlV[B:]


def _gumbel_mixture(logits_BlV: torch.Tensor, ratio: float, generators: list[torch.Generator]) -> torch.Tensor:
    """``more_smooth`` weights (B, l, V): ``softmax((logits * (1 + ratio) + gumbel) / tau)``, noise from each item's
    generator, with ``tau = max(0.27 * (1 - 0.95 * ratio), 0.005)``."""
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    scaled_BlV = logits_BlV * (1 + ratio)
    return ((scaled_BlV + gumbel(generators, scaled_BlV)) / tau).softmax(dim=-1)


def _code_map(quant, idx_Bl: torch.Tensor, pn: int, soft_BlV=None, forced_Bl=None) -> torch.Tensor:
    """``h_BChw (B, Cvae, pn, pn)`` on the indices' device: the codes of ``idx_Bl`` or, given ``more_smooth``
    weights ``soft_BlV``, their mixture of codes (hard codes kept where ``forced_Bl``)."""
    hard_BChw = quant.embed(idx_Bl, pn)
    if soft_BlV is None:
        return hard_BChw
    codebook_VC = quant.codebook(idx_Bl.device)
    soft_BChw = (soft_BlV.to(idx_Bl.device) @ codebook_VC.float()).transpose(1, 2).reshape(hard_BChw.shape)
    if forced_Bl is None:
        return soft_BChw
    return torch.where(forced_Bl.to(idx_Bl.device).view(-1, 1, pn, pn), hard_BChw, soft_BChw)


def _check_inputs(var, tokenizer, labels_B: torch.Tensor) -> None:
    cfg = var.config
    codebook = tuple(tokenizer.quantize.embedding.weight.shape)
    if codebook != (cfg.vocab_size, cfg.cvae):
        raise NextScaleError(
            f"the tokenizer's codebook is {codebook[0]} codes x {codebook[1]} channels but the generator predicts "
            f"{cfg.vocab_size} codes x {cfg.cvae} channels: use the tokenizer the generator was trained with"
        )
    check_labels(labels_B, cfg.num_classes)


def check_labels(labels_B: torch.Tensor, num_classes: int) -> None:
    """Class labels of a class-conditional run: a non-empty 1-D integer tensor of classes in ``0..num_classes``
    (``num_classes``: the unconditional row)."""
    if labels_B.dim() != 1 or labels_B.numel() == 0 or labels_B.is_floating_point():
        raise NextScaleError(f"labels must be a non-empty 1-D integer tensor, got shape {tuple(labels_B.shape)}")
    if bool(((labels_B < 0) | (labels_B > num_classes)).any()):  # one read back, before the loop
        raise NextScaleError(
            f"labels must lie in 0..{num_classes} ({num_classes} = unconditional), got {labels_B.tolist()}"
        )


class ScaleSampler:
    """One run's sampling state, model-independent: the CFG rows, the per-item CPU generators, ``f_hat`` and the
    indices drawn so far. :meth:`step` is everything a scale does after the transformer (guidance, control
    logits, temperature, filters, draws, guide, code map, ``f_hat`` update, callback), so that one run may switch
    models between scales (:mod:`.collaborative`) and still draw exactly what :func:`sample` draws."""

    def __init__(self, tokenizer, labels_B, patch_nums, num_classes, *, seed, options, hooks, device):
        self.quant, self.patch_nums, self.K, self.B = tokenizer.quantize, patch_nums, len(patch_nums), labels_B.shape[0]
        self.labels_B, self.seed, self.options, self.hooks, self.device = labels_B, seed, options, hooks, device
        self.control = hooks.control  # whose logits hook step() calls: the model's now sampling (collaborative)
        self.accel = hooks.accel or Acceleration()
        self.guided = options.cfg != 0  # whether the rows are [cond; null] now (False once guidance stops)
        self.rows_R = torch.cat((labels_B, torch.full_like(labels_B, num_classes))) if self.guided else labels_B
        self.temperatures = [options.temperature_at(si, self.K) for si in range(self.K)]
        self.generators = item_generators(seed, self.B)
        side = patch_nums[-1]
        self.f_hat = torch.zeros(self.B, self.quant.channels, side, side, device=device)
        self.indices: list[torch.Tensor] = []
        self.fhat_from_indices = not options.more_smooth

    def rows(self, x_BlC: torch.Tensor) -> torch.Tensor:
        """The transformer's rows of a scale input: ``[cond; null]`` with guidance, else the ``B`` rows."""
        return x_BlC.repeat(2, 1, 1) if self.guided else x_BlC

    def stops_guidance(self, si: int) -> bool:
        """True at the first scale of a guided run that the acceleration leaves unguided: from it on the rows are
        the ``B`` conditional ones, and the caller drops the null rows from its conditioning and KV cache."""
        if self.guided and not self.accel.guided(si, self.K):
            self.guided = False
            return True
        return False

    def pruning(self) -> TokenPruning | None:
        """The run's token pruning (None when the acceleration prunes nothing)."""
        if not self.accel.prune_scales:
            return None
        return TokenPruning(self.accel, [(pn, pn) for pn in self.patch_nums], self.B)

    def step(self, si: int, logits_RlV: torch.Tensor) -> torch.Tensor | None:
        """Sample scale ``si`` from the transformer's fp32 logits (all rows); return the next scale's input
        ``(B, pn_{si+1}**2, Cvae)`` on the sampling device (None after the last scale that runs; the shortcut
        scales after it are filled in here)."""
        options, guide, control, device = self.options, self.hooks.guide, self.control, self.device
        B, K, pn, quant, generators = self.B, self.K, self.patch_nums[si], self.quant, self.generators
        logits_BlV = _guided(logits_RlV, B, options.guidance(si, K) if self.guided else 0.0)
        if control is not None:
            logits_BlV = control.logits(si, logits_BlV)
        logits_BlV = filter_top_k_top_p_(logits_BlV / self.temperatures[si], options.top_k, options.top_p)
        idx_Bl = categorical(logits_BlV.softmax(dim=-1), generators)
        soft_BlV = _gumbel_mixture(logits_BlV, si / (K - 1), generators) if options.more_smooth else None
        forced_Bl = None
        if guide is not None:
            drawn_Bl, idx_Bl = idx_Bl, guide.apply(si, idx_Bl).to(device=device, dtype=torch.long)
            forced_Bl = guide.forced(si)
            forced_Bl = idx_Bl != drawn_Bl if forced_Bl is None else forced_Bl.to(device=device, dtype=torch.bool)
        self.indices.append(idx_Bl.view(B, pn, pn))

        h_BChw = _code_map(quant, idx_Bl, pn, soft_BlV, forced_Bl)
        f_hat, next_BChw = quant.next_input(si, self.patch_nums, self.f_hat, h_BChw)
        self.f_hat = f_hat
        next_BChw, replaced = guided_fhat(guide, si, self.patch_nums, f_hat, next_BChw)
        self.fhat_from_indices &= not replaced
        if self.hooks.callback is not None:
            self.hooks.callback(si, K, f_hat)
        if si < K - 1 and not self.accel.shortcut(si + 1, K):
            return next_BChw.flatten(2).transpose(1, 2).to(device)
        for skipped in range(si + 1, K):
            self._shortcut(skipped, idx_Bl.view(B, pn, pn))
        return None

    def _shortcut(self, si: int, last_Bhw: torch.Tensor) -> None:
        """Scale ``si`` is not run: ``f_hat`` stays the sum of the coarser scales, kept in the result; the token map
        recorded is the last computed one ``last_Bhw`` upsampled (a stand-in, see :mod:`..core.accel`)."""
        pn = self.patch_nums[si]
        self.indices.append(upsample_tokens(last_Bhw, (pn, pn)))
        self.fhat_from_indices = False
        if self.hooks.callback is not None:
            self.hooks.callback(si, self.K, self.f_hat)

    def result(self, **extra) -> NextScaleTokens:
        options = self.options
        return NextScaleTokens(
            indices=self.indices,
            patch_nums=self.patch_nums,
            f_hat=None if self.fhat_from_indices else self.f_hat,
            labels=self.labels_B,
            source="sampled",
            extra={
                "seed": self.seed,
                "cfg": options.cfg,
                "cfg_schedule": options.cfg_schedule,
                "top_k": options.top_k,
                "top_p": options.top_p,
                "more_smooth": options.more_smooth,
                "temperature": options.temperature,
                "kv_policy": (self.hooks.kv_policy or KVPolicy()).name,
                "accel": self.accel.name,
                **extra,
            },
        )


@torch.no_grad()
def sample(
    var,
    tokenizer,
    labels_B: torch.Tensor,
    *,
    seed: int,
    options: SamplingOptions | None = None,
    hooks: SamplerHooks | None = None,
    device: str | torch.device | None = None,
) -> NextScaleTokens:
    """Sample one image per label; see the module docstring for every convention.

    ``var`` is a :class:`~.model.VAR`, ``tokenizer`` a ``MultiScaleVQVAE`` with the same vocabulary and latent
    channels; both compute on ``device`` (default: the labels'), wherever their weights are. ``labels_B`` holds
    classes in ``0..num_classes`` (``num_classes`` = unconditional). Returns the ``(B, pn, pn)`` indices per scale;
    ``f_hat`` is kept when it cannot be rebuilt from them (``more_smooth``, or a guide that overrode it).
    """
    options = options or SamplingOptions()
    hooks = hooks or SamplerHooks()
    labels_B = torch.as_tensor(labels_B, device=device)
    device = labels_B.device
    _check_inputs(var, tokenizer, labels_B)
    if hooks.accel is not None:
        hooks.accel.check(len(var.patch_nums), var.depth, hooks.control, hooks.kv_policy)
    run = ScaleSampler(
        tokenizer, labels_B, var.patch_nums, var.num_classes, seed=seed, options=options, hooks=hooks, device=device
    )

    cache = KVCache(var.depth, var.num_tokens, hooks.kv_policy)
    pruning = run.pruning()
    try:
        cond = var.condition(run.rows_R)
        x_RlC = var.first_token_map(cond)
        for si in range(run.K):
            if run.stops_guidance(si):
                cond, x_RlC = cond.first_rows(run.B), x_RlC[: run.B]
                cache.keep_rows(run.B)
            next_BlCv = run.step(si, var.forward_scale(si, x_RlC, cond, cache, hooks.control, pruning))
            if next_BlCv is None:
                break
            x_RlC = run.rows(var.scale_input(si + 1, next_BlCv, cond))
    finally:
        cache.free()
    return run.result()
