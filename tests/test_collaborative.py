"""Collaborative decoding: same model twice == the plain sampler, the prefill against teacher forcing, KV policies,
mismatch errors, released drafter/refiner files, and the node inside ComfyUI's python."""

import textwrap

import pytest
import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.control.adapters import ControlStack
from nextscale.models.core.checkpoint import read_state_dict
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import identify
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.kv_cache import KVPolicy
from nextscale.models.core.schedule import SCHEDULE_256, scale_slices
from nextscale.models.var.collaborative import sample_collaborative
from nextscale.models.var.editing import inpaint
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_control import car_teacher, control_image, make_car, make_var4
from test_editing import hole, random_reference
from test_sampler import CVAE, NUM_CLASSES, PN, VOCAB, RecordLogits, make_var, randomize_, teacher_logits

K = len(PN)
LABELS = (1, 4, NUM_CLASSES)


@pytest.fixture(scope="module")
def vae() -> MultiScaleVQVAE:
    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    return MultiScaleVQVAE(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def var() -> VAR:
    return make_var()


def small_refiner(seed: int = 5, **changes) -> VAR:
    """A smaller generator of the same family (another depth and width)."""
    cfg = dict(depth=2, embed_dim=32, num_heads=2, num_classes=NUM_CLASSES, vocab_size=VOCAB, cvae=CVAE, patch_nums=PN)
    return randomize_(VAR(VARConfig(**{**cfg, **changes})), seed)


def assert_same(a, b, atol=0.0):
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert (a.f_hat is None) == (b.f_hat is None)
    if a.f_hat is not None:
        torch.testing.assert_close(a.f_hat, b.f_hat, rtol=0, atol=atol)


OPTIONS = {
    "plain": dict(cfg=0.0, top_k=0, top_p=0.0),
    "cfg top-k top-p": dict(cfg=3.0, top_k=20, top_p=0.9, temperature=[1.1, 1.1, 1.0, 0.9]),
    "constant cfg": dict(cfg=2.0, cfg_schedule="constant"),
    "more_smooth": dict(cfg=2.0, more_smooth=True),
}


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("N", range(K + 1))
def test_same_model_twice_equals_the_plain_sampler(var, vae, options, N):
    labels, opts = torch.tensor(LABELS), SamplingOptions(**OPTIONS[options])
    plain = sample(var, vae, labels, seed=11, options=opts)
    twin = make_var()  # same weights, another object: no shortcut for drafter is refiner
    for refiner in (var, twin):
        out = sample_collaborative(var, refiner, vae, labels, draft_scales=N, seed=11, options=opts)
        # more_smooth's soft latent differs by the rounding of the prefill only: up to 1.4e-4 on an AMD EPYC
        # (AVX-512), under 1e-4 on the Intel CPUs before it; a wrong token would move f_hat by a codebook vector
        assert_same(out, plain, atol=1e-3)
        assert out.extra == {**plain.extra, "draft_scales": N}


@pytest.mark.parametrize("N", [0, 2, K])
@pytest.mark.parametrize("mode", ["tokens", "latent blend"])
def test_same_model_twice_with_a_guide(var, vae, N, mode):
    spec = inpaint(random_reference(2), hole(), mode=mode)
    labels, opts = torch.tensor((2, 3)), SamplingOptions(cfg=2.5, top_k=30, top_p=0.95)
    plain = sample(var, vae, labels, seed=4, options=opts, hooks=SamplerHooks(guide=spec.bind(vae, PN, 2)))
    out = sample_collaborative(
        var, make_var(), vae, labels, draft_scales=N, seed=4, options=opts,
        hooks=SamplerHooks(guide=spec.bind(vae, PN, 2)),
    )
    assert_same(out, plain)


@pytest.mark.parametrize("N", [1, 2, 3])
def test_each_model_predicts_its_scales(var, vae, N):
    """Drafted scales come from the drafter, refined ones from the refiner: each model's guided logits (recorded by
    a control) equal its teacher-forced logits on the final tokens; the first N scales are the drafter's draws."""
    refiner = small_refiner()
    labels, opts = torch.tensor(LABELS), SamplingOptions(cfg=2.0, top_k=0, top_p=0.0)
    seen_d, seen_r, calls = RecordLogits(), RecordLogits(), []
    hooks = SamplerHooks(control=seen_r, callback=lambda si, n, f_hat: calls.append(si))
    out = sample_collaborative(
        var, refiner, vae, labels, draft_scales=N, seed=2, options=opts, hooks=hooks, drafter_control=seen_d
    )
    assert calls == list(range(K))
    assert sorted(seen_d.seen) == list(range(N)) and sorted(seen_r.seen) == list(range(N, K))
    drafted_alone = sample(var, vae, labels, seed=2, options=opts)
    assert all(torch.equal(out.indices[si], drafted_alone.indices[si]) for si in range(N))
    assert not all(torch.equal(a, b) for a, b in zip(out.indices[N:], drafted_alone.indices[N:]))
    for model, seen in ((var, seen_d), (refiner, seen_r)):
        cond_BLV, null_BLV = teacher_logits(model, vae, out, labels)
        for si, sl in enumerate(scale_slices(PN)):
            if si in seen.seen:
                t = opts.guidance(si, K)
                guided_BlV = (1 + t) * cond_BLV[:, sl] - t * null_BLV[:, sl]
                torch.testing.assert_close(seen.seen[si], guided_BlV, rtol=0, atol=1e-4)


@pytest.mark.parametrize("N", [1, 2, K - 1])
def test_a_car_control_through_the_refiners_prefill(vae, N):
    """CAR runs its own branch scale by scale: the refiner's block-causal prefill over the drafted scales gives each
    scale's segment that scale's branch output. One image, one control image: the same generator as drafter and
    refiner (the control on both, as the node binds it) draws the plain sampler's tokens, and with another drafter
    the refiner's guided logits are CAR's teacher-forced ones on the final tokens."""
    var4, car, img = make_var4(), make_car(), control_image()
    labels, opts = torch.tensor([4]), SamplingOptions(cfg=2.0, top_k=0, top_p=0.0)
    plain = sample(var4, vae, labels, seed=3, options=opts, hooks=SamplerHooks(control=car.bind(var4, img)))
    control = car.bind(var4, img)
    out = sample_collaborative(var4, var4, vae, labels, draft_scales=N, seed=3, options=opts,
                               hooks=SamplerHooks(control=control), drafter_control=control)
    assert_same(out, plain, atol=1e-4)

    seen = RecordLogits()
    out = sample_collaborative(make_var4(seed=1), var4, vae, labels, draft_scales=N, seed=3, options=opts,
                               hooks=SamplerHooks(control=ControlStack([car.bind(var4, img), seen])))
    x_BLCv = vae.quantize.teacher_forcing_input(out.flat(), PN)
    with torch.no_grad():
        cond_BLV = car_teacher(var4, car, labels, x_BLCv, img)
        null_BLV = car_teacher(var4, car, torch.full_like(labels, NUM_CLASSES), x_BLCv, img)
    assert sorted(seen.seen) == list(range(N, K))
    for si, sl in enumerate(scale_slices(PN)):
        if si in seen.seen:
            t = opts.guidance(si, K)
            torch.testing.assert_close(seen.seen[si], (1 + t) * cond_BLV[:, sl] - t * null_BLV[:, sl],
                                       rtol=1e-4, atol=1e-4)


class CountingPolicy(KVPolicy):
    """Keeps everything but overrides after_attention: the refiner must show it the drafted scales one by one."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def after_attention(self, kv, si, q_BHlc):
        self.calls.append((kv.layer, si, kv.length))


class FullNamedPolicy(KVPolicy):
    name = "full-too"


def test_kv_policies(var, vae):
    labels, opts = torch.tensor(LABELS), SamplingOptions(cfg=2.0)
    refiner, N = small_refiner(), 2
    one_pass = sample_collaborative(var, refiner, vae, labels, draft_scales=N, seed=3, options=opts)
    drafter_policy, refiner_policy = CountingPolicy(), CountingPolicy()
    hooks = SamplerHooks(kv_policy=refiner_policy)
    by_scale = sample_collaborative(
        var, refiner, vae, labels, draft_scales=N, seed=3, options=opts, hooks=hooks, drafter_kv_policy=drafter_policy
    )
    assert_same(by_scale, one_pass)
    lengths = (1, 5, 14, 30)
    assert drafter_policy.calls == [(layer, si, lengths[si]) for si in range(N) for layer in range(var.depth)]
    assert refiner_policy.calls == [(layer, si, lengths[si]) for si in range(K) for layer in range(refiner.depth)]
    assert by_scale.extra["kv_policy"] == "counting"
    named = sample_collaborative(
        var, refiner, vae, labels, draft_scales=N, seed=3, options=opts, hooks=SamplerHooks(kv_policy=FullNamedPolicy())
    )
    assert_same(named, one_pass)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(patch_nums=(1, 2, 4)), "schedule (1, 2, 3, 4) vs (1, 2, 4)"),
        (dict(vocab_size=VOCAB + 1), f"vocabulary {VOCAB} vs {VOCAB + 1}"),
        (dict(cvae=CVAE * 2), f"latent channels {CVAE} vs {2 * CVAE}"),
        (dict(num_classes=NUM_CLASSES + 1), f"classes {NUM_CLASSES} vs {NUM_CLASSES + 1}"),
    ],
)
def test_mismatched_pairs_fail_before_sampling(var, vae, changes, message):
    calls = []
    hooks = SamplerHooks(callback=lambda *a: calls.append(a))
    for drafter, refiner in ((var, small_refiner(**changes)), (small_refiner(**changes), var)):
        with pytest.raises(NextScaleError, match="drafter and the refiner do not belong together") as err:
            sample_collaborative(drafter, refiner, vae, torch.tensor([1]), draft_scales=2, seed=0, hooks=hooks)
        assert (message if drafter is var else message.split(" ")[0]) in str(err.value)
    assert calls == []


def test_other_errors(var, vae):
    def named(names):
        return small_refiner(class_names=names)

    names = tuple(f"c{i}" for i in range(NUM_CLASSES))
    with pytest.raises(NextScaleError, match="class names differ"):
        sample_collaborative(named(names), named(names[::-1]), vae, torch.tensor([1]), draft_scales=1, seed=0)
    sample_collaborative(named(names), var, vae, torch.tensor([1]), draft_scales=1, seed=0)  # one without names: ok
    for N in (-1, K + 1):
        with pytest.raises(NextScaleError, match=f"draft_scales must lie in 0..{K}"):
            sample_collaborative(var, var, vae, torch.tensor([1]), draft_scales=N, seed=0)
    wrong_vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB * 2, z_channels=CVAE, ch=32, ch_mult=(1, 1),
                                                num_res_blocks=1, patch_nums=PN))
    with pytest.raises(NextScaleError, match="use the tokenizer the generator was trained with"):
        sample_collaborative(var, var, wrong_vae, torch.tensor([1]), draft_scales=2, seed=0)
    with pytest.raises(NextScaleError, match="temperatures given for 4 scales"):
        sample_collaborative(var, var, vae, torch.tensor([1]), draft_scales=4, seed=0,
                             options=SamplingOptions(temperature=[1.0, 1.0]))


def upstream_state_dict(depth: int, seed: int) -> dict:
    """A state dict with the key layout of upstream VAR (and of CoDe's drafter_N.pth / refiner_N.pth): every
    parameter plus the buffers lvl_1L, attn_bias_for_masking and blocks.i.attn.zero_k_bias, 256-px schedule."""
    cfg = VARConfig(depth=depth, embed_dim=32 * depth, num_heads=depth, patch_nums=SCHEDULE_256)
    torch.manual_seed(seed)
    sd = VAR(cfg).state_dict()
    assert {"lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias"} <= set(sd)
    return sd


def test_released_pairs_load_with_the_generator_loader(tmp_path):
    for name, depth in (("drafter_6.pth", 3), ("refiner_6.pth", 2)):
        sd = upstream_state_dict(depth, seed=depth)
        torch.save(sd, tmp_path / name)  # as CoDe publishes them: a plain state dict in a .pth
        loaded = read_state_dict(str(tmp_path / name), what="generator")
        assert str(identify(loaded)) == "var-generator"
        var = VAR.from_file(str(tmp_path / name))
        assert var.config == VARConfig(depth=depth, embed_dim=32 * depth, num_heads=depth, patch_nums=SCHEDULE_256)
        assert all(torch.equal(v, sd[k]) for k, v in var.state_dict().items())
    drafter, refiner = VAR.from_file(str(tmp_path / "drafter_6.pth")), VAR.from_file(str(tmp_path / "refiner_6.pth"))
    from nextscale.models.var.collaborative import check_collaborators

    vae_cfg = TokenizerConfig(vocab_size=4096, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1)
    check_collaborators(drafter, refiner, MultiScaleVQVAE(vae_cfg), 6)


NODE_CHECK = textwrap.dedent(
    """
    import torch
    from comfy_api.latest import io
    from nextscale.models.core.errors import NextScaleError
    from nextscale.models.var.sampler import SamplingOptions, sample
    from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
    from nextscale.models.var.model import VAR, VARConfig
    from nextscale.nodes import NODE_MODULES
    from nextscale.nodes.collaborative import NextScaleCollaborativeSampler
    from nextscale.nodes.generator import NextScaleSampler
    from test_sampler import CVAE, PN, VOCAB, make_var, randomize_

    schema = NextScaleCollaborativeSampler.define_schema()
    assert any(NextScaleCollaborativeSampler in m.NODES for m in NODE_MODULES)
    assert schema.node_id == "NextScaleCollaborativeSampler" and schema.outputs[0].io_type == "NEXTSCALE_TOKENS"
    sampler_inputs = {i.id: i for i in NextScaleSampler.define_schema().inputs}
    ids = [i.id for i in schema.inputs]
    assert ids[:4] == ["drafter", "refiner", "tokenizer", "draft_scales"], ids
    assert ids[4:] == ["class_name", "seed", "cfg", "top_k", "top_p", "more_smooth", "batch_size", "class_list",
                       "options", "guide", "control", "kv_policy", "accel"], ids
    assert all(sampler_inputs[i.id].tooltip == i.tooltip for i in schema.inputs[4:-3])
    assert all(i.tooltip for i in schema.inputs) and [i.optional for i in schema.inputs[-5:]] == [True] * 5

    from nextscale.nodes.service import adopt  # a module as the NextScaleModel a socket carries

    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    vae, var = MultiScaleVQVAE(cfg).eval(), make_var()
    NextScaleSampler.hidden = io.HiddenHolder.from_dict({})
    NextScaleCollaborativeSampler.hidden = io.HiddenHolder.from_dict({})
    plain = NextScaleSampler.execute(adopt(var), adopt(vae), "3", 5, 2.0, 10, 0.9, False, 2, "1, 2",
                                     {"preview": False}).result[0]
    for N in (0, 2, 4):
        got = NextScaleCollaborativeSampler.execute(adopt(var), adopt(make_var()), adopt(vae), N, "3", 5, 2.0, 10, 0.9,
                                                    False, 2, "1, 2", {"preview": False}).result[0]
        assert all(torch.equal(a, b) for a, b in zip(got.indices, plain.indices)), N
        assert got.extra["draft_scales"] == N and torch.equal(got.labels, plain.labels)

    small = randomize_(VAR(VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=VOCAB, cvae=CVAE,
                                     patch_nums=PN)), 1)
    got = NextScaleCollaborativeSampler.execute(adopt(var), adopt(small), adopt(vae), 2, "3", 5, 2.0, 0, 0.0, True,
                                                1, "", {"preview": False}).result[0]
    assert got.f_hat is not None and got.batch_size == 1
    for bad, message in ((dict(vocab_size=VOCAB * 2), "do not belong together"),
                         (dict(num_classes=11), "drafter and the refiner do not belong together")):
        cfg = dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=VOCAB, cvae=CVAE, patch_nums=PN)
        other = VAR(VARConfig(**{**cfg, **bad}))
        try:
            NextScaleCollaborativeSampler.execute(adopt(var), adopt(other), adopt(vae), 2, "3", 5, 2.0, 0, 0.0, False,
                                                  1)
            raise AssertionError(bad)
        except NextScaleError as e:
            assert message in str(e), e
    try:
        NextScaleCollaborativeSampler.execute(adopt(var), adopt(var), adopt(vae), 7, "3", 5, 2.0, 0, 0.0, False, 1)
        raise AssertionError("draft_scales 7")
    except NextScaleError as e:
        assert "draft_scales must lie in 0..4" in str(e), e
    from nextscale.nodes.generator import class_choices
    assert NextScaleCollaborativeSampler.validate_inputs(class_choices()[0]) is True
    assert "not one of the choices" in NextScaleCollaborativeSampler.validate_inputs("no such class")
    print("nodes ok")
    """
)


def test_nodes_in_comfyui(tmp_path):
    """The collaborative sampler node, called in ComfyUI's python, against NextScale Sampler."""
    result = run_in_comfyui_python(NODE_CHECK, cwd=tmp_path)
    assert result.returncode == 0 and "nodes ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
