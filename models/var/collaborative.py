"""Collaborative decoding (CoDe, arXiv 2411.17787): a large drafter samples the coarse scales, a small refiner the
fine ones (upstream: czg1225/CoDe). Background in docs/collaborative.md.

One run of ``K`` scales with ``draft_scales = N``:
1. The drafter samples scales ``0 .. N-1`` through its own KV cache, exactly as :func:`~.sampler.sample` does, and
   frees its cache.
2. The refiner fills its own KV cache for the drafted scales in one block-causal pass over
   ``[sos ; word_embed(next inputs of scales 1..N)] + lvl_pos`` (``token_count(patch_nums[:N+1])`` tokens, e.g.
   424 for N = 8 on the 256-px schedule); the last ``pn_N**2`` positions give the logits of scale ``N``.
3. The refiner samples scales ``N .. K-1`` with its cache, as :func:`~.sampler.sample` does.

Both models share one :class:`~.sampler.ScaleSampler`: the per-item CPU generators (seed ``s + i``), ``f_hat``, the
guide and the callback continue across the switch, and the CFG ramp, temperatures and filters are those of the
whole ``K``-scale run. So with the same model as drafter and refiner the tokens are those of :func:`sample` (the
prefill computes the same logits in another order: they agree to rounding, like a different batch size).
Unlike upstream, the refiner does not redraw the drafted scales to advance a shared generator: it has none.

``N = 0`` is the refiner alone and ``N = K`` the drafter alone. Hooks: ``guide`` and ``callback`` act on every
scale; ``accel`` (:mod:`..core.accel`) on the refiner's scales after ``N`` only; ``control`` and ``kv_policy`` belong
to the refiner (bound to it: a control adapter is trained for one
model), ``drafter_control`` / ``drafter_kv_policy`` to the drafter. The refiner's control also shapes its prefill
(each drafted scale's segment goes through ``block_input`` with its own scale index). A KV policy that compacts
the cache (overrides ``after_attention``) or allocates less than the prefill needs gets the drafted scales one by
one, as in a plain run, instead of the single block-causal pass.
"""

from __future__ import annotations

import torch

from ...kernels.attention import IntervalMask
from ..core.accel import Acceleration
from ..core.errors import NextScaleError
from ..core.hooks import Control, SamplerHooks
from ..core.kv_cache import KVCache, KVPolicy
from ..core.schedule import scale_slices, token_count
from ..core.tokens import NextScaleTokens
from .sampler import SamplingOptions, ScaleSampler, _check_inputs


def check_collaborators(drafter, refiner, tokenizer, draft_scales: int) -> None:
    """Raise :class:`NextScaleError` unless drafter and refiner share tokenizer, schedule, vocabulary and classes
    and ``0 <= draft_scales <= K``."""
    d, r = drafter.config, refiner.config
    problems = [
        f"{what} {a} vs {b}"
        for what, a, b in (
            ("schedule", d.patch_nums, r.patch_nums),
            ("vocabulary", d.vocab_size, r.vocab_size),
            ("latent channels", d.cvae, r.cvae),
            ("classes", d.num_classes, r.num_classes),
        )
        if a != b
    ]
    if not problems and d.class_names is not None and r.class_names is not None and d.class_names != r.class_names:
        problems.append("class names differ")
    if problems:
        raise NextScaleError(
            f"the drafter and the refiner do not belong together ({'; '.join(problems)}): both must be trained "
            f"with the same tokenizer, schedule and classes (e.g. official var_d30 + var_d16, or a released "
            f"drafter_N / refiner_N pair)"
        )
    K = len(r.patch_nums)
    if not 0 <= draft_scales <= K:
        raise NextScaleError(f"draft_scales must lie in 0..{K} (this schedule has {K} scales), got {draft_scales}")


def _check_accel(accel: Acceleration, refiner, hooks: SamplerHooks, draft_scales: int) -> None:
    """Refuse an acceleration that touches a scale up to ``draft_scales`` (the drafted scales and the refiner's
    prefill run in full, guided; pruning also needs the full scale before its first pruned one)."""
    K = len(refiner.patch_nums)
    accel.check(K, refiner.depth, hooks.control, hooks.kv_policy)
    touched = max(accel.shortcut_scales + accel.prune_scales + (1 if accel.prune_scales else 0),
                  accel.unguided_scales)
    if accel.active and K - touched <= draft_scales:
        raise NextScaleError(
            f"the acceleration touches the last {touched} of {K} scales (pruning counts the full scale before it) but "
            f"the refiner's first {draft_scales + 1} run in full with collaborative decoding: lower the acceleration's "
            f"scale counts to at most {K - draft_scales - 1}, or draft fewer scales"
        )


def _compacts(policy: KVPolicy | None, depth: int, prefill_tokens: int) -> bool:
    """Whether ``policy`` must see the drafted scales one by one (it compacts, or allocates less than the prefill)."""
    if policy is None:
        return False
    if type(policy).after_attention is not KVPolicy.after_attention:
        return True
    return any(policy.capacity(layer, prefill_tokens) < prefill_tokens for layer in range(depth))


def prefill(
    var, x_RPC: torch.Tensor, cond, cache: KVCache, upto: int, control: Control | None = None
) -> torch.Tensor:
    """fp32 logits of scale ``upto`` after one block-causal pass over the inputs ``x_RPC`` of scales ``0..upto``
    (``P = token_count(patch_nums[:upto + 1])`` tokens), writing every position's keys and values into the empty
    ``cache``. ``control.block_input`` sees each scale's segment with its own scale index, block by block: block 0
    sees every scale before block 1 sees any, so a control's state between blocks is kept per scale (CAR's is)."""
    P = x_RPC.shape[1]
    slices = scale_slices(var.patch_nums)[: upto + 1]
    if P != slices[-1].stop:
        raise NextScaleError(f"prefill of scales 0..{upto} needs {slices[-1].stop} tokens, got {P}")
    mask_PP = IntervalMask.block_causal(var.teacher_mask(P, x_RPC.device), var.patch_nums)
    cache.begin_scale(upto)
    for i, block in enumerate(var.blocks):
        if control is not None:
            x_RPC = torch.cat([control.block_input(si, i, x_RPC[:, sl]) for si, sl in enumerate(slices)], dim=1)
        x_RPC = block(x_RPC, cond.ada_B16C[i], attn_mask=mask_PP, kv=cache[i])
    return var.logits(x_RPC[:, slices[-1]], cond)


@torch.no_grad()
def sample_collaborative(
    drafter,
    refiner,
    tokenizer,
    labels_B: torch.Tensor,
    *,
    draft_scales: int,
    seed: int,
    options: SamplingOptions | None = None,
    hooks: SamplerHooks | None = None,
    drafter_control: Control | None = None,
    drafter_kv_policy: KVPolicy | None = None,
    device: str | torch.device | None = None,
) -> NextScaleTokens:
    """Sample scales ``0..draft_scales-1`` with ``drafter`` and the rest with ``refiner`` (module docstring).

    Arguments as for :func:`~.sampler.sample` (``device`` defaults to the labels'). Every check runs before
    any sampling. The result's ``extra`` adds ``draft_scales``.
    """
    options = options or SamplingOptions()
    hooks = hooks or SamplerHooks()
    labels_B = torch.as_tensor(labels_B, device=device)
    device = labels_B.device
    check_collaborators(drafter, refiner, tokenizer, draft_scales)
    _check_inputs(drafter, tokenizer, labels_B)
    _check_inputs(refiner, tokenizer, labels_B)
    if hooks.accel is not None:
        _check_accel(hooks.accel, refiner, hooks, draft_scales)
    N, patch_nums = draft_scales, refiner.patch_nums
    run = ScaleSampler(
        tokenizer, labels_B, patch_nums, refiner.num_classes, seed=seed, options=options, hooks=hooks, device=device
    )
    for si in range(run.K):  # temperatures of the whole run, checked up front
        options.temperature_at(si, run.K)

    drafted = []  # the next inputs of scales 1..N, (B, pn**2, Cvae) each
    if N > 0:
        cache = KVCache(drafter.depth, drafter.num_tokens, drafter_kv_policy)
        run.control = drafter_control
        try:
            cond = drafter.condition(run.rows_R)
            x_RlC = drafter.first_token_map(cond)
            for si in range(N):
                next_BlCv = run.step(si, drafter.forward_scale(si, x_RlC, cond, cache, drafter_control))
                if next_BlCv is not None:
                    drafted.append(next_BlCv)
                    if si < N - 1:
                        x_RlC = run.rows(drafter.scale_input(si + 1, next_BlCv, cond))
        finally:
            cache.free()
            run.control = hooks.control
    if N < run.K:
        cache = KVCache(refiner.depth, refiner.num_tokens, hooks.kv_policy)
        try:
            cond = refiner.condition(run.rows_R)
            inputs = [refiner.first_token_map(cond)]
            inputs += [run.rows(refiner.scale_input(si + 1, x_BlCv, cond)) for si, x_BlCv in enumerate(drafted)]
            if N == 0 or _compacts(hooks.kv_policy, refiner.depth, token_count(patch_nums[: N + 1])):
                for si, x_RlC in enumerate(inputs):  # scale by scale, as a plain run
                    logits_RlV = refiner.forward_scale(si, x_RlC, cond, cache, hooks.control)
            else:
                logits_RlV = prefill(refiner, torch.cat(inputs, dim=1), cond, cache, N, hooks.control)
            del inputs, drafted
            pruning = run.pruning()
            for si in range(N, run.K):
                next_BlCv = run.step(si, logits_RlV)
                if next_BlCv is None:
                    break
                if run.stops_guidance(si + 1):
                    cond = cond.first_rows(run.B)
                    cache.keep_rows(run.B)
                x_RlC = run.rows(refiner.scale_input(si + 1, next_BlCv, cond))
                logits_RlV = refiner.forward_scale(si + 1, x_RlC, cond, cache, hooks.control, pruning)
        finally:
            cache.free()
    return run.result(draft_scales=N)
