"""The Infinity scale loop on a tiny random model and tokenizer: text -> bits -> image on CPU, guidance, seeds,
image-to-image by kept scales, the 8B's patchify path, and KV policies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import Guide, SamplerHooks
from nextscale.models.core.kv_cache import KVCache
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.infinity.family import FAMILY
from nextscale.models.infinity.model import InfinityConfig
from nextscale.models.infinity.sampler import InfinityOptions, KeepScales, TextCondition, sample_infinity
from nextscale.models.infinity.schedule import InfinitySchedule
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.kv.profile import KVProfile, record_profile
from test_infinity import SCHEDULE, TINY, prompts, tiny_model

D = TINY.token_dim  # 4 bits per latent cell


def tiny_tokenizer(d: int = D, seed: int = 3) -> BSQTokenizer:
    torch.manual_seed(seed)
    tok = BSQTokenizer(BSQConfig(codebook_dim=d, base_ch=32, ch_mult=(1, 2), num_res_blocks=1))
    return tok.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def run(model, tok, text, mask, seed=0, schedule=SCHEDULE, negative=None, **kw):
    opts = kw.pop("options", InfinityOptions(cfg=3.0, tau=1.0, top_k=0, top_p=0.0))
    opts = dataclasses.replace(opts, schedule=schedule)
    return sample_infinity(model, tok, TextCondition(text, mask, negative), seed=seed, options=opts, **kw)


def test_text_to_image_end_to_end(model, tok):
    text, mask = prompts()
    tokens = run(model, tok, text, mask, seed=7)
    assert tokens.scales == SCHEDULE.scales and tokens.batch_size == 2
    assert [tuple(b.shape) for b in tokens.bits] == [(2, h, w, D) for h, w in SCHEDULE.scales]
    assert all(b.dtype == torch.bool for b in tokens.bits)
    torch.testing.assert_close(tokens.summed_codes, tok.bits_to_summed_codes(tokens.bits), atol=1e-6, rtol=1e-6)
    image = tok.decode(tokens.summed_codes)
    assert image.shape == (2, 3, 4 * tok.downsample, 6 * tok.downsample)
    assert torch.isfinite(image).all() and image.abs().max() <= 1
    again = run(model, tok, text, mask, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, again.bits))
    other = run(model, tok, text, mask, seed=8)
    assert not all(torch.equal(a, b) for a, b in zip(tokens.bits, other.bits))


def test_bfloat16_weights_sample_and_decode():
    """The loaders' bfloat16 on Infinity and its tokenizer: the loop runs in the mixed-precision blocks, draws bits
    and decodes to a finite image; greedy bits mostly agree with the fp32 model's."""
    text, mask = prompts()
    greedy = InfinityOptions(cfg=3.0, tau=1.0, top_k=1, top_p=0.0)
    full = run(tiny_model(), tiny_tokenizer(), text, mask, options=greedy)
    half_tok = tiny_tokenizer().to(torch.bfloat16)
    half = run(tiny_model().to(torch.bfloat16), half_tok, text, mask, options=greedy)
    assert all(b.dtype == torch.bool for b in half.bits)
    image = half_tok.decode(half.summed_codes.to(torch.bfloat16))
    assert image.dtype == torch.bfloat16 and torch.isfinite(image.float()).all()
    agree = torch.cat([(a == b).flatten() for a, b in zip(full.bits, half.bits)]).float().mean()
    assert agree > 0.8, agree


def test_batch_item_i_is_the_single_run_with_seed_plus_i(model, tok):
    text, mask = prompts()
    batch = run(model, tok, text, mask, seed=100)
    for i in range(2):
        single = run(model, tok, text[i : i + 1], mask[i : i + 1], seed=100 + i)
        assert all(torch.equal(a[i : i + 1], b) for a, b in zip(batch.bits, single.bits))


def test_greedy_bits_follow_the_guided_teacher_forced_logits(model, tok):
    """Greedy sampling (top_k = 1) must pick, bit by bit, the larger of upstream's guided logits
    ``cfg * cond + (1 - cfg) * uncond`` (after 1/tau), recomputed from the sampled bits in one teacher-forced pass."""
    text, mask = prompts()
    cfg, tau = 2.5, 0.7
    tokens = run(model, tok, text, mask, options=InfinityOptions(cfg=cfg, tau=tau, top_k=1, top_p=0.0))
    # rebuild the inputs of scales 1.. from the bits, as upstream's loop does
    H, W = SCHEDULE.scales[-1]
    summed = torch.zeros(2, D, H, W)
    inputs = []
    for si, bits in enumerate(tokens.bits[:-1]):
        summed = summed + tok.upsample_codes(tok.bits_to_codes(bits), (H, W))
        nxt = tok.downsample_codes(summed, SCHEDULE.scales[si + 1])
        inputs.append(nxt.flatten(2).transpose(1, 2))
    ctx = model.condition(text, mask, guided=True)
    x = torch.cat(inputs, 1).repeat(2, 1, 1)
    logits = model.forward_teacher(ctx, x, SCHEDULE) / tau
    guided = cfg * logits[:2] + (1 - cfg) * logits[2:]
    want = guided.view(2, SCHEDULE.num_tokens, D, 2).argmax(-1).bool()
    got = torch.cat([b.reshape(2, -1, D) for b in tokens.bits], 1)
    assert torch.equal(got, want)


def test_cfg_one_runs_the_conditional_rows_only(model, tok):
    text, mask = prompts()
    seen = []

    class Spy:  # counts the rows entering block 0
        def block_input(self, si, layer, x):
            if layer == 0:
                seen.append(x.shape[0])
            return x

    run(model, tok, text, mask, options=InfinityOptions(cfg=1.0, tau=1.0), hooks=SamplerHooks(control=Spy()))
    assert set(seen) == {2}
    seen.clear()
    run(model, tok, text, mask, options=InfinityOptions(cfg=[1.0, 1.0, 2.0, 1.0], tau=1.0),
        hooks=SamplerHooks(control=Spy()))
    assert set(seen) == {4}


def test_negative_prompt_replaces_the_learned_unconditional_rows(model, tok):
    text, mask = prompts()
    opts = InfinityOptions(cfg=4.0, tau=1.0, top_k=1, top_p=0.0)
    plain = run(model, tok, text, mask, options=opts)
    neg = run(model, tok, text, mask, options=opts, negative=prompts(B=1, T=3, seed=9))
    assert not all(torch.equal(a, b) for a, b in zip(plain.bits, neg.bits))


def test_keep_scales_is_image_to_image(model, tok):
    text, mask = prompts(B=1)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 4 * tok.downsample, 6 * tok.downsample) * 2 - 1
    encoded = tok.encode_bits(image, SCHEDULE.scales)
    full = run(model, tok, text, mask, hooks=SamplerHooks(guide=KeepScales(encoded, SCHEDULE.num_scales)))
    assert all(torch.equal(a, b) for a, b in zip(full.bits, encoded))
    two = run(model, tok, text, mask, hooks=SamplerHooks(guide=KeepScales(encoded, 2)), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(two.bits[:2], encoded[:2]))
    none = run(model, tok, text, mask, hooks=SamplerHooks(guide=KeepScales(encoded, 0)), seed=3)
    plain = run(model, tok, text, mask, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(none.bits, plain.bits))
    with pytest.raises(NextScaleError, match=r"keep must lie in 0..4"):
        KeepScales(encoded, 5)
    with pytest.raises(NextScaleError, match="must be a bitwise guide"):  # a token guide is refused, not ignored
        run(model, tok, text, mask, hooks=SamplerHooks(guide=Guide()))


def test_patchified_model_samples_on_a_twice_finer_latent():
    """The 8B's layout: 4 d bits per token, un-patchified onto a 2h x 2w latent of d-bit cells."""
    cfg = InfinityConfig(**{**TINY.to_dict(), "token_dim": 4 * D})
    model, tok = tiny_model(cfg), tiny_tokenizer()
    text, mask = prompts(B=1)
    tokens = run(model, tok, text, mask)
    assert tokens.scales == tuple((2 * h, 2 * w) for h, w in SCHEDULE.scales)
    assert tuple(tokens.bits[-1].shape) == (1, 8, 12, D)
    with pytest.raises(NextScaleError, match="bits per token"):
        run(tiny_model(InfinityConfig(**{**TINY.to_dict(), "token_dim": 6})), tok, text, mask)


def test_kv_policies_plug_into_the_text_sampler(model, tok):
    text, mask = prompts()
    opts = InfinityOptions(cfg=3.0, tau=1.0, top_k=1, top_p=0.0)
    plain = run(model, tok, text, mask, options=opts)
    full = KVPolicySpec("full").bind_scales(model.depth, model.num_heads, SCHEDULE.scales)
    same = run(model, tok, text, mask, options=opts, hooks=SamplerHooks(kv_policy=full))
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, same.bits))
    for name in ("recent", "strided", "scalekv", "hack"):
        policy = KVPolicySpec(name, budget=0.3).bind_scales(model.depth, model.num_heads, SCHEDULE.scales)
        tokens = run(model, tok, text, mask, options=opts, hooks=SamplerHooks(kv_policy=policy))
        assert tokens.extra["kv_policy"] == name and len(tokens.bits) == SCHEDULE.num_scales
        assert policy.stats.peak_bytes > 0  # the cache was compacted at least once


def test_kv_profiles_calibrate_an_infinity_run_and_fit_its_schedule_only(model, tok, tmp_path):
    """ScaleKV / HACK calibration on Infinity: a profile over the run's (h, w) grids, saved and loaded as they are,
    drives the calibrated policies on that schedule and is refused on another."""
    text, mask = prompts(B=1)
    opts = InfinityOptions(cfg=3.0, tau=1.0, top_k=1, top_p=0.0, schedule=SCHEDULE)
    profile = record_profile(FAMILY, model, tok, [TextCondition(text, mask)] * 2, seed=4, options=opts,
                             schedule=SCHEDULE)
    assert profile.patch_nums == SCHEDULE.scales and profile.samples == 2
    assert len(profile.zscore) == model.depth and len(profile.head_variance[0]) == model.num_heads
    assert any(v != 0 for row in profile.asi for v in row[1:]) and all(row[0] == 0 for row in profile.asi)
    back = KVProfile.load(profile.save(str(tmp_path / "infinity.json")))
    assert back == profile
    for name in ("scalekv", "hack"):
        policy = KVPolicySpec(name, 0.3, back).bind_scales(model.depth, model.num_heads, SCHEDULE.scales)
        tokens = run(model, tok, text, mask, options=opts, hooks=SamplerHooks(kv_policy=policy))
        assert tokens.extra["kv_policy"] == name and policy.stats.peak_bytes > 0
    scalekv = KVPolicySpec("scalekv", 0.3, back).bind_scales(model.depth, model.num_heads, SCHEDULE.scales)
    assert len({row[-1] for row in scalekv.budgets_LK}) > 1  # the drafter layers keep more than the refiners
    hack = KVPolicySpec("hack", 0.3, back).bind_scales(model.depth, model.num_heads, SCHEDULE.scales)
    assert sum(map(sum, hack.contextual_LH)) == model.depth * model.num_heads // 2  # half the heads contextual
    other = InfinitySchedule.from_template(0.5, "0.06M").scales
    with pytest.raises(NextScaleError, match=r"calibrated on .* scales \[\(1, 1\).* at this resolution"):
        KVPolicySpec("scalekv", 0.3, back).bind_scales(model.depth, model.num_heads, other)


def test_official_schedule_runs_and_the_callback_sees_every_scale(model, tok):
    sched = InfinitySchedule.from_template(0.5, "0.06M")  # 2:1 landscape: (11, 22) latent at 0.06M
    text, mask = prompts(B=1)
    calls = []
    tokens = run(model, tok, text, mask, schedule=sched,
                 hooks=SamplerHooks(callback=lambda si, K, s: calls.append((si, K))))
    assert calls == [(si, 7) for si in range(7)] and tokens.scales[-1] == (11, 22)

    def stop(si, K, summed):
        if si == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(model, tok, text, mask, schedule=sched, hooks=SamplerHooks(callback=stop))


def test_cache_is_freed_after_an_error(model, tok, monkeypatch):
    text, mask = prompts(B=1)
    made = []
    original = KVCache.__init__

    def track(self, *a, **k):
        original(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(KVCache, "__init__", track)
    with pytest.raises(RuntimeError, match="boom"):
        run(model, tok, text, mask,
            hooks=SamplerHooks(callback=lambda si, K, s: (_ for _ in ()).throw(RuntimeError("boom"))))
    assert made and made[0].nbytes() == 0
