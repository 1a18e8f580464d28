"""Training-free acceleration (models/core/accel.py) on tiny VAR and Infinity models: what each option skips (rows
entering the blocks, KV cache rows, transformer passes), what it keeps (earlier scales' draws, the latent), exact
equality when off, and the refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nextscale.models.core.accel import Acceleration, TokenPruning
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import Control, SamplerHooks
from nextscale.models.core.kv_cache import KVCache, KVPolicy
from nextscale.models.core.schedule import token_count
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, sample_infinity
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.collaborative import sample_collaborative
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_infinity import SCHEDULE, prompts, tiny_model
from test_infinity_sampler import tiny_tokenizer
from test_sampler import CVAE, NUM_CLASSES, VOCAB, randomize_

PN = (1, 2, 3, 4, 6, 8)  # six scales: room for pruned, unguided and shortcut scales after full ones
K = len(PN)
LABELS = [1, 4, NUM_CLASSES]
GREEDY = SamplingOptions(cfg=3.0, top_k=1, top_p=0.0)
SAMPLED = SamplingOptions(cfg=3.0, top_k=40, top_p=0.9)


@pytest.fixture(scope="module")
def var() -> VAR:
    cfg = VARConfig(depth=4, embed_dim=64, num_heads=4, num_classes=NUM_CLASSES, vocab_size=VOCAB, cvae=CVAE,
                    patch_nums=PN)
    return randomize_(VAR(cfg), seed=2)


@pytest.fixture(scope="module")
def vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    return MultiScaleVQVAE(cfg).eval().requires_grad_(False)


class BlockRows:
    """Counts what enters each block: ``rows[layer]`` lists ``(rows, tokens)`` per call, in call order."""

    def __init__(self, blocks):
        self.rows = {i: [] for i in range(len(blocks))}
        self.handles = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, layer):
        def record(module, args):
            self.rows[layer].append(tuple(args[0].shape[:2]))
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def var_run(var, vae, accel=None, options=GREEDY, seed=5, **hooks):
    return sample(var, vae, torch.tensor(LABELS), seed=seed, options=options,
                  hooks=SamplerHooks(accel=accel, **hooks))


def same_tokens(a, b, scales=None):
    scales = range(len(a.indices)) if scales is None else scales
    return all(torch.equal(a.indices[si], b.indices[si]) for si in scales)


# -- off ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [GREEDY, SAMPLED])
def test_off_is_the_plain_sampler_bit_for_bit(var, vae, options):
    plain = sample(var, vae, torch.tensor(LABELS), seed=5, options=options)
    off = var_run(var, vae, Acceleration(), options)
    assert same_tokens(plain, off) and off.f_hat is None
    assert off.extra == {**plain.extra, "accel": "off"} and plain.extra["accel"] == "off"


def test_keeping_every_token_is_the_plain_sampler(var, vae):
    """Pruning's gather and scatter are exact: a keep ratio of 1 computes the same logits in the same order."""
    plain = var_run(var, vae, options=SAMPLED)
    full = var_run(var, vae, Acceleration(prune_scales=3, keep_ratio=1.0, prune_from_layer=1), SAMPLED)
    assert same_tokens(plain, full)


# -- pruning -----------------------------------------------------------------------------------------------------


def test_pruned_positions_never_enter_the_later_blocks(var, vae):
    accel = Acceleration(prune_scales=2, keep_ratio=0.5, prune_from_layer=2)
    R = 2 * len(LABELS)
    with BlockRows(var.blocks) as seen:
        tokens = var_run(var, vae, accel)
    for layer in range(var.depth):
        expected = [(R, pn * pn if si < K - 2 or layer < 2 else pn * pn // 2) for si, pn in enumerate(PN)]
        assert seen.rows[layer] == expected, f"layer {layer}"
    plain = var_run(var, vae)
    assert same_tokens(tokens, plain, range(K - 2)) and not same_tokens(tokens, plain)
    assert tokens.extra["accel"] == "prune 2@0.5 from layer 2 (cached)"


def test_pruned_scales_write_their_kept_tokens_only_to_the_kv_cache(var, vae, monkeypatch):
    caches = []
    original = KVCache.free
    monkeypatch.setattr(KVCache, "free", lambda self: (caches.append([kv.length for kv in self.layers]),
                                                        original(self)))
    var_run(var, vae, Acceleration(prune_scales=1, keep_ratio=0.25, prune_from_layer=1))
    full = token_count(PN)
    assert caches == [[full] + [full - PN[-1] ** 2 + PN[-1] ** 2 // 4] * (var.depth - 1)]


@pytest.mark.parametrize("restore", ["cached", "input"])
def test_pruned_positions_are_restored_from_their_input_and_the_cached_update(restore):
    """Scale 1 (2x2) runs in full and caches its update; at scale 2 (4x4) each row keeps its 4 tokens farthest
    from the mean, the other 12 get their own input plus the cached update upsampled (or their input alone)."""
    torch.manual_seed(0)
    pruning = TokenPruning(Acceleration(prune_scales=1, keep_ratio=0.25, prune_from_layer=0, restore=restore),
                           [(1, 1), (2, 2), (4, 4)], items=2)
    x1 = torch.randn(2, 4, 8)
    x1_in, _ = pruning.block_input(1, 0, x1)
    assert x1_in is x1 and pruning.kept_Rk is None
    update1 = torch.randn(2, 4, 8)
    assert torch.equal(pruning.output(1, x1 + update1), x1 + update1)

    x2 = torch.randn(2, 16, 8)
    x2[:, 5] += 10.0  # far from the mean: always kept
    kept_x, _ = pruning.block_input(2, 0, x2)
    kept = pruning.kept_Rk
    assert kept_x.shape == (2, 4, 8) and (kept == 5).any(dim=1).all()
    score = (x2 - x2.mean(1, keepdim=True)).square().sum(-1)
    assert torch.equal(kept, score.topk(4, dim=1).indices.sort(dim=1).values)
    out = pruning.output(2, kept_x * 3)
    up = update1.view(2, 2, 2, 8).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 16, 8)
    restored = x2 + up if restore == "cached" else x2
    for r in range(2):
        pruned = [i for i in range(16) if i not in kept[r]]
        torch.testing.assert_close(out[r, kept[r]], x2[r, kept[r]] * 3)
        torch.testing.assert_close(out[r, pruned], restored[r, pruned])


def test_an_images_guidance_rows_keep_the_same_positions():
    pruning = TokenPruning(Acceleration(prune_scales=1, keep_ratio=0.25, prune_from_layer=0, restore="input"),
                           [(1, 1), (4, 4)], items=1)
    x = torch.randn(2, 16, 8)  # the conditional and the unconditional row of one image
    pruning.block_input(1, 0, x)
    score = (x - x.mean(1, keepdim=True)).square().sum(-1).sum(0)
    assert torch.equal(pruning.kept_Rk, score.topk(4).indices.sort().values.expand(2, 4))


def test_infinity_pruning_gathers_the_rotary_angles_of_the_kept_tokens():
    model, tok = tiny_model(), tiny_tokenizer()
    text, mask = prompts()
    opts = InfinityOptions(cfg=3.0, tau=1.0, top_k=1, top_p=0.0, schedule=SCHEDULE)
    cond = TextCondition(text, mask)
    plain = sample_infinity(model, tok, cond, seed=0, options=opts)
    same = sample_infinity(model, tok, cond, seed=0, options=opts, hooks=SamplerHooks(
        accel=Acceleration(prune_scales=1, keep_ratio=1.0, prune_from_layer=1)))
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, same.bits))
    with BlockRows(model.block_list()) as seen:
        pruned = sample_infinity(model, tok, cond, seed=0, options=opts, hooks=SamplerHooks(
            accel=Acceleration(prune_scales=1, keep_ratio=0.5, prune_from_layer=1)))
    last = SCHEDULE.scales[-1][0] * SCHEDULE.scales[-1][1]
    assert seen.rows[0][-1] == (4, last) and seen.rows[3][-1] == (4, last // 2)  # the angles follow the kept rows
    assert all(torch.equal(a, b) for a, b in zip(plain.bits[:-1], pruned.bits[:-1]))


# -- guidance stop -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [GREEDY, SAMPLED])
def test_guidance_stop_drops_the_unconditional_rows(var, vae, options):
    B = len(LABELS)
    with BlockRows(var.blocks) as seen:
        tokens = var_run(var, vae, Acceleration(unguided_scales=2), options)
    assert seen.rows[0] == [(2 * B, pn * pn) for pn in PN[:-2]] + [(B, pn * pn) for pn in PN[-2:]]
    plain = var_run(var, vae, options=options)
    assert same_tokens(tokens, plain, range(K - 2))  # each item's draws before the stop are unchanged
    unguided = var_run(var, vae, options=dataclasses.replace(options, cfg=0.0))
    assert not same_tokens(tokens, unguided, range(K - 2))


def test_unguided_scales_sample_the_conditional_logits(var, vae):
    """After the stop the batch and the cache hold the conditional rows only, and their logits are those of a run
    that keeps the null rows (its conditional half)."""
    raw = {}
    forward_scale = var.forward_scale

    def spy(si, x_BlC, cond, cache, control=None, pruning=None):
        raw[si] = forward_scale(si, x_BlC, cond, cache, control, pruning)
        return raw[si]

    var.forward_scale = spy
    try:
        var_run(var, vae, Acceleration(unguided_scales=1))
        stopped_last = raw[K - 1]
        var_run(var, vae)
    finally:
        del var.forward_scale
    assert stopped_last.shape[0] == len(LABELS)
    torch.testing.assert_close(stopped_last, raw[K - 1][: len(LABELS)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["recent", "scalekv", "hack"])
def test_guidance_stop_and_shortcut_run_with_compressing_kv_policies(var, vae, policy):
    spec = KVPolicySpec(policy, budget=0.3)
    bound = spec.bind_scales(var.depth, var.config.num_heads, PN)
    plain = var_run(var, vae, kv_policy=spec.bind_scales(var.depth, var.config.num_heads, PN))
    tokens = var_run(var, vae, Acceleration(unguided_scales=2, shortcut_scales=1), kv_policy=bound)
    assert tokens.extra["kv_policy"] == policy and same_tokens(tokens, plain, range(K - 2))


# -- shortcut ----------------------------------------------------------------------------------------------------


def test_shortcut_scales_never_run_and_add_nothing_to_the_latent(var, vae):
    calls = []
    with BlockRows(var.blocks) as seen:
        tokens = var_run(var, vae, Acceleration(shortcut_scales=2), callback=lambda si, n, f: calls.append(si))
    assert [s[-1] for s in seen.rows[0]] == [pn * pn for pn in PN[:-2]] and calls == list(range(K))
    plain = var_run(var, vae)
    assert same_tokens(tokens, plain, range(K - 2))
    prefix = vae.indices_to_fhat(tokens.flat(), patch_nums=PN, upto=K - 2)
    torch.testing.assert_close(tokens.f_hat, prefix, rtol=0, atol=1e-5)  # the latent of the computed scales
    assert tokens.indices[-1].shape == (len(LABELS), PN[-1], PN[-1])
    assert torch.equal(tokens.indices[-1][:, ::2, ::2], tokens.indices[-3])  # the last computed map (4x4), upsampled


def test_infinity_shortcut_and_guidance_stop():
    model, tok = tiny_model(), tiny_tokenizer()
    text, mask = prompts()
    opts = InfinityOptions(cfg=3.0, tau=1.0, top_k=0, top_p=0.0, schedule=SCHEDULE)
    cond = TextCondition(text, mask)
    plain = sample_infinity(model, tok, cond, seed=2, options=opts)
    with BlockRows(model.block_list()) as seen:
        tokens = sample_infinity(model, tok, cond, seed=2, options=opts, hooks=SamplerHooks(
            accel=Acceleration(unguided_scales=2, shortcut_scales=1)))
    counts = [h * w for h, w in SCHEDULE.scales]
    assert seen.rows[0] == [(4, counts[0]), (4, counts[1]), (2, counts[2])]
    assert all(torch.equal(a, b) for a, b in zip(plain.bits[:2], tokens.bits[:2]))
    summed = tok.bits_to_summed_codes(tokens.bits[:-1], SCHEDULE.scales[-1])
    torch.testing.assert_close(tokens.summed_codes, summed, rtol=0, atol=1e-6)
    assert tokens.bits[-1].shape == plain.bits[-1].shape and tokens.extra["accel"] == "unguided 2, shortcut 1"


# -- collaborative decoding --------------------------------------------------------------------------------------


def test_collaborative_refiner_honours_the_acceleration(var, vae):
    accel = Acceleration(prune_scales=1, keep_ratio=0.5, prune_from_layer=1, unguided_scales=2, shortcut_scales=1)
    plain = var_run(var, vae, accel)
    out = sample_collaborative(var, var, vae, torch.tensor(LABELS), draft_scales=2, seed=5, options=GREEDY,
                               hooks=SamplerHooks(accel=accel))
    assert same_tokens(out, plain)
    torch.testing.assert_close(out.f_hat, plain.f_hat, rtol=0, atol=1e-5)
    with pytest.raises(NextScaleError, match="draft fewer scales"):
        sample_collaborative(var, var, vae, torch.tensor(LABELS), draft_scales=3, seed=5, options=GREEDY,
                             hooks=SamplerHooks(accel=accel))


# -- refusals ----------------------------------------------------------------------------------------------------


def test_settings_a_run_cannot_honour_are_refused(var, vae):
    with pytest.raises(NextScaleError, match="keep_ratio"):
        Acceleration(prune_scales=1, keep_ratio=0.0)
    with pytest.raises(NextScaleError, match="restore"):
        Acceleration(restore="nearest")
    with pytest.raises(NextScaleError, match="at most 5"):
        var_run(var, vae, Acceleration(prune_scales=3, shortcut_scales=3))
    with pytest.raises(NextScaleError, match="prune_from_layer"):
        var_run(var, vae, Acceleration(prune_scales=1, prune_from_layer=4))
    with pytest.raises(NextScaleError, match="control model"):
        var_run(var, vae, Acceleration(prune_scales=1), control=Control())
    policy = KVPolicySpec("scalekv", budget=0.3).bind_scales(var.depth, var.config.num_heads, PN)
    with pytest.raises(NextScaleError, match="'scalekv' KV policy"):
        var_run(var, vae, Acceleration(prune_scales=1), kv_policy=policy)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_dropping_rows_keeps_the_first_rows_of_either_kv_layout(packed):
    """Guidance stop narrows the cache to the conditional rows: in the packed layout (heads holding different
    numbers of tokens, rows one after another in one flat buffer) as in the dense one."""
    policy = type("Policy", (KVPolicy,), {"packed": packed})()
    cache = KVCache(1, 16, policy)
    kv = cache[0]
    cache.begin_scale(0)
    kv.extend(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8))
    if packed:  # heads keep 3, 1 and 2 of their 4 slots
        kv.keep(torch.tensor([2, 0, 1, 3]).expand(2, 3, 4), lengths_H=[3, 1, 2])
    cache.begin_scale(1)
    kv.extend(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))
    valid = kv.valid_BHS()
    valid = torch.ones(kv.k_BHSc.shape[:3], dtype=torch.bool) if valid is None else valid
    keys, values = kv.k_BHSc[valid].view(2, -1, 8), kv.v_BHSc[valid].view(2, -1, 8)
    assert not torch.equal(keys[0], keys[1])

    cache.keep_rows(1)
    assert kv.rows == 1 and kv.k_BHSc.shape[0] == 1
    valid_1 = valid[:1]
    torch.testing.assert_close(kv.k_BHSc[valid_1].view(1, -1, 8), keys[:1], rtol=0, atol=0)
    torch.testing.assert_close(kv.v_BHSc[valid_1].view(1, -1, 8), values[:1], rtol=0, atol=0)
