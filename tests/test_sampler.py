"""The scale loop: parity with teacher forcing, seeds and batches, filters, more_smooth, hooks, KV cache."""

import math

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import Control, Guide, SamplerHooks
from nextscale.models.core.kv_cache import KVCache, KVPolicy
from nextscale.models.core.sampling import filter_top_k_top_p_
from nextscale.models.core.schedule import scale_slices
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig

PN = (1, 2, 3, 4)
NUM_CLASSES, VOCAB, CVAE = 10, 96, 8


@torch.no_grad()
def randomize_(var: VAR, seed: int = 0, adaln_gain: float = 0.3, head_gain: float = 3.0) -> VAR:
    """Random weights at O(1) scale: logits far from uniform, every block and modulation active,
    and one head of block 0 above the ln 100 cap of the per-head scale."""
    g = torch.Generator().manual_seed(seed)
    for name, p in var.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("scale_mul_1H11"):
            r = math.log(4.0) + 0.3 * r
        elif name.endswith("ada_gss"):
            r = adaln_gain * r
        elif p.dim() == 2 and not name.endswith(("class_emb.weight", "lvl_embed.weight")):
            gain = adaln_gain if "ada_lin" in name else head_gain if name == "head.weight" else 1.0
            r = r * gain / math.sqrt(p.shape[1])
        elif p.dim() == 1:
            r = 0.1 * r
        p.copy_(r)
    var.blocks[0].attn.scale_mul_1H11[0, 0] = math.log(200.0)
    return var.eval()


def make_var(shared_aln: bool = False, seed: int = 0) -> VAR:
    cfg = VARConfig(
        depth=3,
        embed_dim=64,
        num_heads=4,
        num_classes=NUM_CLASSES,
        vocab_size=VOCAB,
        cvae=CVAE,
        patch_nums=PN,
        shared_aln=shared_aln,
    )
    return randomize_(VAR(cfg), seed)


@pytest.fixture(scope="module")
def vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    return MultiScaleVQVAE(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def var() -> VAR:
    return make_var()


def teacher_logits(var, vae, tokens, labels):
    """Conditional and null-class teacher-forced logits on the sampled tokens."""
    x_BLCv = vae.quantize.teacher_forcing_input(tokens.flat(), PN)
    with torch.no_grad():
        return var.forward_teacher(labels, x_BLCv), var.forward_teacher(torch.full_like(labels, NUM_CLASSES), x_BLCv)


class RecordLogits(Control):
    """A control that only records the guided logits of each scale."""

    def __init__(self):
        self.seen = {}

    def logits(self, si, logits_BlV):
        self.seen[si] = logits_BlV.clone()
        return logits_BlV


@pytest.mark.parametrize(
    "shared_aln,cfg,schedule", [(False, 0.0, "linear"), (False, 3.0, "linear"), (True, 2.0, "constant")]
)
def test_greedy_sampling_matches_teacher_forcing(vae, shared_aln, cfg, schedule):
    var = make_var(shared_aln, seed=3)  # a seed whose greedy margins are >= 1e-2 in all three cases
    labels = torch.tensor([1, 4, 9, NUM_CLASSES])
    record = RecordLogits()
    opts = SamplingOptions(cfg=cfg, top_k=1, top_p=0.0, cfg_schedule=schedule)
    tokens = sample(var, vae, labels, seed=0, options=opts, hooks=SamplerHooks(control=record))
    cond_BLV, null_BLV = teacher_logits(var, vae, tokens, labels)
    for si, sl in enumerate(scale_slices(PN)):
        t = opts.guidance(si, len(PN))
        guided_BlV = (1 + t) * cond_BLV[:, sl] - t * null_BLV[:, sl] if t else cond_BLV[:, sl]
        top2 = guided_BlV.topk(2, dim=-1).values
        assert (top2[..., 0] - top2[..., 1]).min() > 1e-3  # far from a tie: greedy is well defined
        assert torch.equal(guided_BlV.argmax(-1), tokens.flat()[si]), f"scale {si}"
        torch.testing.assert_close(record.seen[si], guided_BlV, rtol=0, atol=1e-5 * (1 + 2 * t))
    assert tokens.indices[-1].unique().numel() > 5  # diverse tokens: the weights are not near-uniform


def test_cached_logits_match_teacher_logits(var, vae):
    """Raw logits of both CFG halves from the cached loop against the masked full-sequence forward."""
    labels = torch.tensor([2, 7])
    raw = {}
    forward_scale = var.forward_scale

    def spy(si, x_BlC, cond, cache, control=None, pruning=None):
        raw[si] = forward_scale(si, x_BlC, cond, cache, control, pruning)
        return raw[si]

    var.forward_scale = spy
    try:
        tokens = sample(var, vae, labels, seed=3, options=SamplingOptions(cfg=4.0))
    finally:
        del var.forward_scale
    cond_BLV, null_BLV = teacher_logits(var, vae, tokens, labels)
    assert cond_BLV.abs().max() > 5  # O(1)-scale weights give peaked logits
    for si, sl in enumerate(scale_slices(PN)):
        torch.testing.assert_close(raw[si], torch.cat((cond_BLV[:, sl], null_BLV[:, sl])), rtol=0, atol=1e-5)


def test_same_seed_same_tokens_and_different_seeds_differ(var, vae):
    labels = torch.tensor([3, 3])
    a = sample(var, vae, labels, seed=11, options=SamplingOptions())
    b = sample(var, vae, labels, seed=11, options=SamplingOptions())
    c = sample(var, vae, labels, seed=12, options=SamplingOptions())
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert any(not torch.equal(x, y) for x, y in zip(a.indices, c.indices))
    assert not torch.equal(a.indices[-1][0], a.indices[-1][1])  # two items of one batch differ
    assert a.extra["seed"] == 11 and a.source == "sampled" and a.f_hat is None and torch.equal(a.labels, labels)


@pytest.mark.parametrize("more_smooth", [False, True])
def test_batch_item_i_equals_batch_of_one_with_seed_plus_i(var, vae, more_smooth):
    labels = torch.tensor([5, 0, 5])
    opts = SamplingOptions(cfg=3.0, top_k=50, top_p=0.9, more_smooth=more_smooth)
    batch = sample(var, vae, labels, seed=40, options=opts)
    for i in range(3):
        alone = sample(var, vae, labels[i : i + 1], seed=40 + i, options=opts)
        for si in range(len(PN)):
            assert torch.equal(batch.indices[si][i], alone.indices[si][0]), (i, si)
        if more_smooth:
            torch.testing.assert_close(batch.f_hat[i], alone.f_hat[0], rtol=0, atol=1e-3)  # soft weights: rounding only
    top = sample(var, vae, labels[:1], seed=2**64 - 1, options=opts)  # seeds wrap modulo 2**64
    wrapped = sample(var, vae, torch.tensor([5, 5]), seed=2**64 - 2, options=opts)
    assert all(torch.equal(x[0], y[1]) for x, y in zip(top.indices, wrapped.indices))


def test_top_k_keeps_ties():
    logits = torch.tensor([[[3.0, 1.0, 3.0, 2.0, 0.5]]])
    out = filter_top_k_top_p_(logits.clone(), top_k=1)
    assert torch.equal(torch.isfinite(out), torch.tensor([[[True, False, True, False, False]]]))
    out = filter_top_k_top_p_(logits.clone(), top_k=3)  # threshold 2.0: three survive
    assert torch.isfinite(out).sum() == 3
    out = filter_top_k_top_p_(torch.tensor([[[1.0, 2.0, 2.0, 2.0]]]), top_k=2)  # tie at the threshold: all 2s kept
    assert torch.isfinite(out).sum() == 3
    assert torch.equal(filter_top_k_top_p_(logits.clone(), top_k=0), logits)  # off
    assert torch.equal(filter_top_k_top_p_(logits.clone(), top_k=99), logits)  # k >= V: nothing to remove


def test_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3)
    out = filter_top_k_top_p_(logits.clone(), top_p=0.6)  # ascending cumsum 0.2, 0.5, 1.0: drop <= 0.4
    assert torch.equal(torch.isfinite(out)[0, 0], torch.tensor([True, True, False]))
    out = filter_top_k_top_p_(logits.clone(), top_p=1e-9)  # only the max survives
    assert torch.equal(torch.isfinite(out)[0, 0], torch.tensor([True, False, False]))
    peaked = torch.tensor([[[0.0, 50.0, 0.0]]])
    assert torch.isfinite(filter_top_k_top_p_(peaked, top_p=0.5)).sum() == 1
    assert torch.equal(filter_top_k_top_p_(logits.clone(), top_p=1.0), logits)  # keeps everything


def test_temperature(var, vae):
    labels = torch.tensor([1, 6])
    greedy = sample(var, vae, labels, seed=0, options=SamplingOptions(cfg=1.0, top_k=1, top_p=0))
    cold = sample(var, vae, labels, seed=5, options=SamplingOptions(cfg=1.0, top_k=0, top_p=0, temperature=1e-4))
    assert all(torch.equal(x, y) for x, y in zip(greedy.indices, cold.indices))
    per_scale = SamplingOptions(cfg=1.0, top_k=0, top_p=0, temperature=[1e-4, 1e-4, 1e-4, 1e-4])
    assert all(
        torch.equal(x, y) for x, y in zip(greedy.indices, sample(var, vae, labels, seed=9, options=per_scale).indices)
    )
    hot = sample(
        var, vae, labels, seed=5, options=SamplingOptions(cfg=1.0, top_k=0, top_p=0, temperature=[1, 1, 1, 50])
    )
    assert all(
        torch.equal(x, y)
        for x, y in zip(
            hot.indices[:3],
            sample(var, vae, labels, seed=5, options=SamplingOptions(cfg=1.0, top_k=0, top_p=0)).indices[:3],
        )
    )
    with pytest.raises(NextScaleError, match="3 temperatures given for 4 scales"):
        sample(var, vae, labels, seed=0, options=SamplingOptions(temperature=[1.0, 1.0, 1.0]))
    with pytest.raises(NextScaleError, match="positive"):
        SamplingOptions(temperature=0.0)


def test_more_smooth_keeps_a_soft_f_hat(var, vae):
    labels = torch.tensor([2, 8])
    tokens = sample(var, vae, labels, seed=1, options=SamplingOptions(cfg=2.0, more_smooth=True))
    assert (
        tokens.f_hat is not None
        and tokens.f_hat.shape == (2, CVAE, PN[-1], PN[-1])
        and torch.isfinite(tokens.f_hat).all()
    )
    hard_fhat = vae.indices_to_fhat(tokens.flat(), PN)
    assert not torch.allclose(tokens.f_hat, hard_fhat, atol=1e-3)  # the mixture is not the codes of the indices
    assert vae.fhat_to_img(tokens.f_hat).shape == (2, 3, 8, 8)


def test_sampled_f_hat_equals_the_indices_f_hat(var, vae):
    seen = []
    tokens = sample(
        var,
        vae,
        torch.tensor([4]),
        seed=2,
        options=SamplingOptions(),
        hooks=SamplerHooks(callback=lambda si, K, f_hat: seen.append(f_hat.clone())),
    )
    assert [f.shape for f in seen] == [(1, CVAE, 4, 4)] * 4
    for k in range(1, 5):
        torch.testing.assert_close(seen[k - 1], vae.indices_to_fhat(tokens.flat(), PN, upto=k), rtol=0, atol=1e-6)


class CaptureCache(KVPolicy):
    """Full cache that remembers the cache it served (to check it is freed)."""

    name = "capture"

    def __init__(self):
        self.cache, self.calls = None, []

    def after_attention(self, kv, si, q_BHlc):
        self.cache = kv.cache
        self.calls.append((kv.layer, si, kv.length))


def test_callback_once_per_scale_and_kv_policy_hook(var, vae):
    calls, policy = [], CaptureCache()
    hooks = SamplerHooks(kv_policy=policy, callback=lambda si, K, f_hat: calls.append((si, K, tuple(f_hat.shape))))
    tokens = sample(var, vae, torch.tensor([1, 2]), seed=0, options=SamplingOptions(), hooks=hooks)
    assert calls == [(si, 4, (2, CVAE, 4, 4)) for si in range(4)]
    assert policy.calls == [(layer, si, n) for si, n in enumerate((1, 5, 14, 30)) for layer in range(3)]
    assert policy.cache.nbytes() == 0 and tokens.extra["kv_policy"] == "capture"


def test_callback_exception_propagates_and_frees_the_cache(var, vae):
    policy = CaptureCache()

    def interrupt(si, K, f_hat):
        if si == 2:
            assert policy.cache.nbytes() == 3 * 2 * 2 * 4 * 30 * 16 * 4  # layers x (k, v) x rows x H x L x c x fp32
            raise KeyboardInterrupt("stop")

    with pytest.raises(KeyboardInterrupt, match="stop"):
        sample(
            var,
            vae,
            torch.tensor([1]),
            seed=0,
            options=SamplingOptions(),
            hooks=SamplerHooks(kv_policy=policy, callback=interrupt),
        )
    assert policy.cache.nbytes() == 0


class ForceScales(Guide):
    """Teacher-forces whole scales to given tokens and, optionally, replaces f_hat after the last one."""

    def __init__(self, indices, upto, zero_fhat=False):
        self.indices, self.upto, self.zero_fhat = indices, upto, zero_fhat

    def apply(self, si, idx_Bl):
        return self.indices[si] if si < self.upto else idx_Bl

    def forced(self, si):
        return torch.full(self.indices[si].shape, si < self.upto)

    def override_fhat(self, si, f_hat):
        return torch.zeros_like(f_hat) if self.zero_fhat and si == len(PN) - 1 else None


@pytest.mark.parametrize("more_smooth", [False, True])
def test_guide_forces_tokens(var, vae, more_smooth):
    labels = torch.tensor([3, 3])
    reference = sample(var, vae, labels, seed=100, options=SamplingOptions())
    opts = SamplingOptions(more_smooth=more_smooth)
    forced = sample(
        var, vae, labels, seed=7, options=opts, hooks=SamplerHooks(guide=ForceScales(reference.flat(), upto=2))
    )
    assert all(torch.equal(forced.indices[si], reference.indices[si]) for si in range(2))
    everything = sample(
        var, vae, labels, seed=7, options=opts, hooks=SamplerHooks(guide=ForceScales(reference.flat(), upto=4))
    )
    assert all(torch.equal(x, y) for x, y in zip(everything.indices, reference.indices))
    if more_smooth:  # every token forced: the hard codes, so f_hat equals the reference's
        torch.testing.assert_close(everything.f_hat, vae.indices_to_fhat(reference.flat(), PN), rtol=0, atol=1e-6)
    zeroed = sample(
        var,
        vae,
        labels,
        seed=7,
        options=SamplingOptions(),
        hooks=SamplerHooks(guide=ForceScales(reference.flat(), 0, zero_fhat=True)),
    )
    assert zeroed.f_hat is not None and zeroed.f_hat.abs().max() == 0


def test_guidance_schedules(var, vae):
    opts = SamplingOptions(cfg=4.0)
    assert [opts.guidance(si, 5) for si in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [SamplingOptions(cfg=1.5, cfg_schedule="constant").guidance(si, 5) for si in range(5)] == [1.5] * 5
    labels = torch.tensor([1])
    linear = sample(var, vae, labels, seed=0, options=SamplingOptions(cfg=5.0, top_k=1, top_p=0))
    constant = sample(
        var, vae, labels, seed=0, options=SamplingOptions(cfg=5.0, top_k=1, top_p=0, cfg_schedule="constant")
    )
    assert not all(torch.equal(x, y) for x, y in zip(linear.indices, constant.indices))
    with pytest.raises(NextScaleError, match="cfg_schedule 'cosine'"):
        SamplingOptions(cfg_schedule="cosine")


def test_input_errors(var, vae):
    with pytest.raises(NextScaleError, match=r"labels must lie in 0\.\.10"):
        sample(var, vae, torch.tensor([11]), seed=0)
    with pytest.raises(NextScaleError, match="1-D integer"):
        sample(var, vae, torch.tensor([[1]]), seed=0)
    other = MultiScaleVQVAE(
        TokenizerConfig(vocab_size=64, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    )
    with pytest.raises(NextScaleError, match=r"64 codes x 8 channels.*96 codes x 8 channels"):
        sample(var, other, torch.tensor([1]), seed=0)
    with pytest.raises(NextScaleError, match="top_k must be >= 0"):
        SamplingOptions(top_k=-1)


def test_kv_cache_keep_and_capacity():
    class Budget(KVPolicy):
        name = "tiny-budget"

        def capacity(self, layer, num_tokens):
            return 6

    cache = KVCache(num_layers=1, num_tokens=30, policy=Budget())
    kv = cache[0]
    k = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    kv.extend(k, -k)
    assert torch.equal(kv.k_BHSc, k) and torch.equal(kv.v_BHSc, -k) and kv.length == 5
    index = torch.tensor([4, 0]).expand(2, 3, 2)
    kv.keep(index)
    assert kv.length == 2 and torch.equal(kv.k_BHSc, k[:, :, [4, 0]]) and torch.equal(kv.v_BHSc, -k[:, :, [4, 0]])
    kv.extend(k[:, :, :4], k[:, :, :4])
    assert kv.length == 6 and torch.equal(kv.k_BHSc[:, :, 2:], k[:, :, :4])
    with pytest.raises(NextScaleError, match=r"layer 0 holds 6 tokens but needs 7.*'tiny-budget'"):
        kv.extend(k[:, :, :1], k[:, :, :1])
    cache.free()
    assert cache.nbytes() == 0
