"""KV-cache policies: exactness of the full cache, budgets counted in bytes, baselines, the packed per-head layout,
profiles, fidelity, and the nodes inside ComfyUI's python.

Tiny random models (test_sampler's generator and tokenizer) on the CPU; the fidelity test uses the embedded trained
model when ``weights/`` has it.
"""

import json
import math
import os
import textwrap

import pytest
import torch
from harness.testbed import REPO_ROOT, run_in_comfyui_python
from nextscale.kernels.attention import ENV_BACKEND, attention_torch
from nextscale.kernels.ragged import available_backends
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.kv_cache import KVCache, LayerKV, PackedLayerKV
from nextscale.models.kv.policies import (
    POLICIES,
    HACKPolicy,
    KVPolicySpec,
    RecentPolicy,
    ScaleKVPolicy,
    StridedPolicy,
    even_queries,
    grid_queries,
    scalekv_budgets,
    token_budget,
)
from nextscale.models.kv.profile import KVProfile, calibrate
from nextscale.models.kv.report import kv_report, run_with
from nextscale.models.var.family import FAMILY as VAR_FAMILY
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_sampler import CVAE, VOCAB

PN6 = (1, 2, 3, 4, 5, 6)  # 91 tokens: room for budgets between the scales
WEIGHTS = os.path.join(REPO_ROOT, "weights")
GEN_FILE = os.path.join(WEIGHTS, "nextscale_generator.safetensors")
TOK_FILE = os.path.join(WEIGHTS, "nextscale_tokenizer.safetensors")


def make_pair(patch_nums=PN6, depth=3, heads=4, seed=0):
    from test_sampler import randomize_

    cfg = VARConfig(depth=depth, embed_dim=16 * heads, num_heads=heads, num_classes=10, vocab_size=VOCAB, cvae=CVAE,
                    patch_nums=patch_nums)
    torch.manual_seed(seed)
    tcfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                           patch_nums=patch_nums)
    return randomize_(VAR(cfg), seed), MultiScaleVQVAE(tcfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def profile(pair):
    var, vae = pair
    return calibrate(var, vae, [1, 2], seed=0)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


def test_full_policy_and_budget_one_equal_no_policy_exactly(pair, profile):
    var, vae = pair
    labels = torch.tensor([1, 4])
    plain = sample(var, vae, labels, seed=7)
    for policy in POLICIES:
        tokens, bound = run_with(var, vae, labels, 7, KVPolicySpec(policy, 1.0, profile))
        assert same(plain, tokens), policy
        full_bytes = var.depth * var.num_tokens * 4 * var.config.embed_dim * 2 * 4  # 4 rows, k and v, fp32
        if bound.packed:  # grown scale by scale: at the last one, a layer's previous buffer and its successor
            assert bound.stats.peak_bytes == VAR_FAMILY.kv_geometry(var).cache_bytes(4, 4, bound) > full_bytes
        else:
            assert bound.stats.peak_bytes <= full_bytes, policy  # the last scale's cache need not be kept
    full = KVPolicySpec("full").bind(var, 2)
    assert KVCache(var.depth, var.num_tokens, full)[0].capacity == var.num_tokens


@pytest.mark.parametrize("policy", ["recent", "strided", "scalekv", "hack"])
@pytest.mark.parametrize("budget", [0.1, 0.3])
def test_every_policy_keeps_exactly_its_budget(pair, profile, policy, budget):
    var, vae = pair
    spec = KVPolicySpec(policy, budget, profile)
    tokens, bound = run_with(var, vae, torch.tensor([1, 4]), 3, spec)
    rows, H, c = 4, var.config.num_heads, var.config.embed_dim // var.config.num_heads
    per_token = 2 * c * 4  # k and v, fp32
    dense_bytes = sum(bound.capacity(layer, var.num_tokens) for layer in range(var.depth)) * rows * H * per_token
    for si in range(len(PN6)):
        held = 0
        for layer in range(var.depth):
            before, budget_H, after = bound.stats.kept[(si, layer)]
            assert torch.equal(after, torch.minimum(before, budget_H.expand(rows, -1))), (si, layer)
            assert budget_H.tolist() == bound.budgets_after(layer, si)
            held += int(after.sum())
        # allocated once the scale is done: the tokens held (packed, HACK) or the budget buffers (dense)
        assert bound.stats.scale_bytes[si] == (held * per_token if bound.packed else dense_bytes)
    # the budgets average the uniform budget over layers (ScaleKV) and heads (HACK) once the cache exceeds it
    b = token_budget(budget, var.num_tokens)
    last = len(PN6) - 2
    carried = sum(sum(bound.head_budgets(layer, last)) for layer in range(var.depth))
    assert carried <= var.depth * var.config.num_heads * b
    assert carried >= var.depth * var.config.num_heads * b * (0.9 if policy == "hack" else 1.0)
    assert bound.stats.carried_bytes() == (carried * rows * per_token if bound.packed else dense_bytes)
    full_bytes = var.depth * var.config.num_heads * var.num_tokens * rows * per_token
    assert bound.stats.peak_bytes < full_bytes
    # the memory planner's figure: exact for the packed layout, an upper bound for the dense one
    planned = VAR_FAMILY.kv_geometry(var).cache_bytes(rows, 4, bound)
    assert bound.stats.peak_bytes == planned if bound.packed else bound.stats.peak_bytes <= planned
    # scales that fit the budget are sampled exactly as with the full cache
    plain = sample(var, vae, torch.tensor([1, 4]), seed=3)
    fits = [si for si in range(len(PN6)) if sum(p * p for p in PN6[: si + 1]) <= min(
        min(bound.head_budgets(layer, si)) for layer in range(var.depth))]
    assert all(torch.equal(tokens.indices[si], plain.indices[si]) for si in fits)


def layer_with_slots(policy, S_prev: int, si: int, rows=2):
    """A one-layer cache holding ``S_prev`` earlier tokens whose keys encode their slot, after scale ``si``'s
    attention; returns the kv."""
    H, c, pn = policy.num_heads, 8, policy.patch_nums[si]
    cache = KVCache(1, policy.num_tokens, policy)
    cache.begin_scale(si)
    kv = cache[0]
    g = torch.Generator().manual_seed(0)
    total = S_prev + pn * pn
    k = torch.nn.functional.normalize(torch.randn(rows, H, total, c, generator=g), dim=-1)
    v = torch.arange(total, dtype=torch.float32).view(1, 1, total, 1).expand(rows, H, total, c).contiguous()
    policy._pos[0] = torch.arange(S_prev).expand(rows, H, S_prev)  # S_prev = where scale si starts
    kv.extend(k, v)  # earlier and current tokens at once (a working copy when over the capacity)
    q = torch.randn(rows, H, pn * pn, c, generator=g) * 4
    kv.after_attention(q)
    return kv


def test_baselines_are_what_they_say():
    pns = (1, 2, 3, 4, 5, 6)
    recent = RecentPolicy(1, 2, pns, budget=10)
    kv = layer_with_slots(recent, 30, 4)  # 30 earlier + 25 current = 55 slots
    assert kv.length == 10 and kv.v_BHSc[..., 0].eq(torch.arange(45, 55.0)).all()
    strided = StridedPolicy(1, 2, pns, budget=10)
    kv = layer_with_slots(strided, 30, 4)
    assert kv.v_BHSc[0, 0, :, 0].tolist() == [float(i) for i in even_queries(55, 10)]
    assert even_queries(55, 10)[0] == 0 and even_queries(55, 10)[-1] == 54


def test_scalekv_keeps_window_and_top_attention():
    pns = (1, 2, 3, 4, 5, 6)
    policy = ScaleKVPolicy(1, 2, pns, 24, [[24] * len(pns)])
    kv = layer_with_slots(policy, 30, 4)
    kept = kv.v_BHSc[..., 0].long()
    assert kv.length == 24
    window = {30 + i for i in grid_queries(5)}
    assert len(window) == 16 and all(window <= set(kept[b, h].tolist()) for b in range(2) for h in range(2))
    assert grid_queries(3) == list(range(9)) and len(grid_queries(16)) == 16
    b = scalekv_budgets([[False, True], [False, False], [False, False]], budget=4, patch_nums=(2, 3), decay=0.5)
    assert [sum(col) for col in zip(*b)] == [12, 12] and b[0][1] > b[1][1] == b[2][1]
    assert all(x <= 4 for x in (b[0][0], b[1][0], b[2][0]))  # scale 0 holds 4 tokens: capped


def test_hack_packed_layout_holds_the_kept_tokens_only_and_attends_like_the_dense_reference(monkeypatch):
    pns = (1, 2, 3, 4, 5, 6)
    contextual = [[True, False, True, False]]
    policy = HACKPolicy(1, 4, pns, 12, contextual, [[5, 20, 5, 20]])
    kv = layer_with_slots(policy, 30, 4)
    assert isinstance(kv, PackedLayerKV)
    assert kv.valid_counts().tolist() == [[5, 20, 5, 20]] * 2 and kv.length == 20
    assert kv.cache.nbytes() == 2 * 2 * (5 + 20 + 5 + 20) * 8 * 4  # (k, v) x rows x tokens held x c x fp32
    structural = kv.v_BHSc[0, 1, :20, 0].long().tolist()
    assert {0, 1, 2, 3, 4} <= set(structural)  # the first two scales (5 tokens)
    # the dense reference of the next scale: the held tokens (padded view, padding masked) followed by the new ones
    g = torch.Generator().manual_seed(1)
    k_new, v_new = torch.randn(2, 4, 36, 8, generator=g), torch.randn(2, 4, 36, 8, generator=g)
    q = torch.randn(2, 4, 36, 8, generator=g)
    k_ref, v_ref = torch.cat((kv.k_BHSc, k_new), dim=2), torch.cat((kv.v_BHSc, v_new), dim=2)
    valid_ref = torch.cat((kv.valid_BHS(), torch.ones(2, 4, 36, dtype=torch.bool)), dim=2)
    mask_ref = torch.zeros(valid_ref.shape).masked_fill_(~valid_ref, float("-inf"))[:, :, None]
    ref = attention_torch(q, k_ref, v_ref, mask_ref)
    kv.cache.begin_scale(5)
    kv.extend(k_new, v_new)
    assert kv.valid_counts().tolist() == [[41, 56, 41, 56]] * 2
    assert kv.cache.nbytes() == 2 * 2 * (41 + 56 + 41 + 56) * 8 * 4
    assert torch.equal(kv.k_BHSc[kv.valid_BHS()], k_ref[valid_ref])  # the packed buffer holds what the view shows
    outs = {}
    for backend in available_backends():  # padded SDPA, the torch reference, the Triton kernel (interpreter on CPU)
        monkeypatch.setenv(ENV_BACKEND, backend)
        outs[backend] = kv.attention(q, None)
        torch.testing.assert_close(outs[backend], ref, rtol=1e-5, atol=1e-5)
    assert "triton" in outs and "sdpa" in outs
    with pytest.raises(ValueError, match="takes no attention mask"):
        kv.attention(q, mask_ref)


def test_packed_layout_samples_the_dense_layouts_tokens_at_equal_budgets(pair):
    var, vae = pair
    spec = KVPolicySpec("hack", 0.2)  # uncalibrated: every head structural, one budget, so the dense layout fits
    packed, dense = spec.bind(var, 2), spec.bind(var, 2)
    dense.packed = False
    greedy = SamplingOptions(cfg=2.0, top_k=1)
    runs = {}
    for name, policy in (("packed", packed), ("dense", dense)):
        runs[name] = sample(var, vae, torch.tensor([1, 4]), seed=5, options=greedy,
                            hooks=SamplerHooks(kv_policy=policy))
    assert same(runs["packed"], runs["dense"])
    assert packed.stats.carried_bytes() == dense.stats.carried_bytes()
    assert packed.stats.peak_bytes <= dense.stats.peak_bytes


def test_packed_hack_run_gives_the_same_greedy_tokens_on_every_ragged_backend(pair, profile, monkeypatch):
    var, vae = pair
    spec = KVPolicySpec("hack", 0.2, profile)
    tokens = {}
    for backend in available_backends():
        monkeypatch.setenv(ENV_BACKEND, backend)
        tokens[backend] = sample(var, vae, torch.tensor([1, 4]), seed=5, options=SamplingOptions(cfg=2.0, top_k=1),
                                 hooks=SamplerHooks(kv_policy=spec.bind(var, 2)))
    assert "triton" in tokens
    assert all(same(tokens["sdpa"], t) for t in tokens.values())


def test_the_reports_memory_is_the_bytes_of_the_caches_tensors(pair, profile, monkeypatch):
    """Every tensor the layers hold is walked (not the cache's own count) once each layer is done with a scale:
    what the report says is carried is what was allocated, and its peak is the planner's figure."""
    var, vae = pair
    walked: dict[str, dict[int, list[int]]] = {}
    after_attention = LayerKV.after_attention

    def walk(kv, q_BHlc):
        after_attention(kv, q_BHlc)
        held = sum(t.nbytes for layer in kv.cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))
        walked.setdefault(kv.cache.policy.name, {}).setdefault(kv.cache.scale, []).append(held)

    monkeypatch.setattr(LayerKV, "after_attention", walk)
    spec = KVPolicySpec("hack", 0.2, profile)
    report = kv_report(var, vae, [1, 4], 3, spec, SamplingOptions(cfg=2.0))
    between = range(len(PN6) - 1)  # the last scale's cache is carried nowhere
    assert report.carried_bytes == max(walked["hack"][si][-1] for si in between)
    assert report.full_carried_bytes == max(walked["full"][si][-1] for si in between)
    geometry, rows = VAR_FAMILY.kv_geometry(var), 4
    assert report.peak_bytes == spec.bind(var, 2).cache_bytes(geometry, rows, 4)
    assert report.peak_bytes >= max(max(held) for held in walked["hack"].values())
    assert report.full_peak_bytes == geometry.cache_bytes(rows, 4) == max(walked["full"][0])
    assert report.carried_bytes < report.full_carried_bytes and "peak KV bytes" in report.text()


def test_profile_round_trip_and_clear_errors(tmp_path, pair, profile):
    var, _ = pair
    path = profile.save(str(tmp_path / "p.json"))
    back = KVProfile.load(path)
    assert back == profile and back.samples == 2
    assert len(back.zscore) == var.depth and len(back.head_variance[0]) == var.config.num_heads
    assert sum(map(sum, back.contextual_heads(0.5))) == 6 and sum(map(sum, back.drafters(1))) == len(PN6)
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({**d, "schema": "x"}), "not a 'nextscale-kv-profile' file"),
        (json.dumps({**d, "version": 99}), "schema version 99"),
        (json.dumps({**d, "hack": {"head_variance": [[0.1]]}}), "'head_variance' must be 3 rows of 4 numbers"),
        (json.dumps({**d, "scalekv": {"asi": d["scalekv"]["asi"]}}), "missing or malformed field"),
    ]
    for text, message in cases:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(NextScaleError, match=message):
            KVProfile.load(str(tmp_path / "bad.json"))
    with pytest.raises(NextScaleError, match="does not exist"):
        KVProfile.load(str(tmp_path / "missing.json"))
    other, _ = make_pair(depth=2)
    with pytest.raises(NextScaleError, match=r"calibrated on a generator with 3 layers.*has 2 layers"):
        KVPolicySpec("hack", 0.2, back).bind(other)
    with pytest.raises(NextScaleError, match="not one of full, recent"):
        KVPolicySpec("snapkv")


def fidelity_models():
    """The embedded trained model when present, else a random-weight 256 px-schedule model (d4 x 4 heads)."""
    if os.path.isfile(GEN_FILE) and os.path.isfile(TOK_FILE):
        return VAR.from_file(GEN_FILE).eval(), MultiScaleVQVAE.from_file(TOK_FILE).eval(), True
    var, vae = make_pair(patch_nums=(1, 2, 3, 4, 5, 6, 8), depth=4, heads=4, seed=1)
    return var, vae, False


def test_fidelity_ordering():
    """Trained model: ScaleKV within 1 dB of the recent window at 25 % and 50 %, HACK within 2 dB at 25 % (mean PSNR
    over four classes and seeds). Random weights (no attention structure): budget 1 is exact, every policy's first
    scales (which fit the budget) agree, and more budget is at least as faithful on average over the policies."""
    var, vae, trained = fidelity_models()
    labels = list(range(min(4, var.num_classes)))
    profile = calibrate(var, vae, labels[:2], seed=100)
    options = SamplingOptions(cfg=2.0)
    psnr = {}
    for policy in ("recent", "strided", "scalekv", "hack"):
        for budget in (0.25, 0.5, 1.0):
            values = []
            for i, label in enumerate(labels):
                r = kv_report(var, vae, [label], i, KVPolicySpec(policy, budget, profile), options)
                values.append(min(r.psnr, 60.0))
                # at most the full cache, plus one layer's buffer for the packed layout (HACK) near budget 1
                assert r.token_agreement[0] == 1.0 and r.peak_bytes <= r.full_peak_bytes * (1 + 1 / var.depth)
            psnr[policy, budget] = sum(values) / len(values)
    assert all(psnr[p, 1.0] == 60.0 for p in ("recent", "strided", "scalekv", "hack"))
    mean = lambda b: sum(psnr[p, b] for p in ("recent", "strided", "scalekv", "hack")) / 4  # noqa: E731
    assert mean(0.5) >= mean(0.25) - 1.0, psnr
    if trained:
        # Measured on the embedded models (bench/RESULTS.md, `bench/bench_kv.py --part embedded`): on 6- and 8-layer,
        # 4-head models the order among the policies moves with the weights (at 25 % ScaleKV led the recent window by
        # 1.8, -0.4, 1.0, -1.1, -0.7 and -0.5 dB on six successive models; HACK trailed it by 0.6, 1.7, 0.7, 0.4, 0.9
        # and 0.1 dB), so these are regression guards with a margin for that spread; a broken policy loses far more
        # (10 % reads ~5 dB below 25 %).
        assert psnr["scalekv", 0.25] >= psnr["recent", 0.25] - 1.5, psnr
        assert psnr["scalekv", 0.5] >= psnr["recent", 0.5] - 1.0, psnr
        assert psnr["hack", 0.25] >= psnr["recent", 0.25] - 2.0, psnr
    assert all(math.isfinite(v) for v in psnr.values())


NODE_CHECK = textwrap.dedent(
    """
    import os
    out = script_args[0]
    import torch
    import folder_paths
    from comfy_api.latest import io
    from nextscale.models.core.errors import NextScaleError
    from nextscale.models.kv.policies import KVPolicySpec
    from nextscale.models.kv.profile import KVProfile
    from nextscale.nodes import NODE_MODULES
    from nextscale.nodes.generator import NextScaleSampler
    from nextscale.nodes.kv import NextScaleKVCalibrate, NextScaleKVPolicy, NextScaleKVReport
    from test_kv_policies import make_pair

    folder_paths.set_output_directory(out)
    assert all(any(n in m.NODES for m in NODE_MODULES) for n in (NextScaleKVPolicy, NextScaleKVCalibrate, NextScaleKVReport))
    for node in (NextScaleKVPolicy, NextScaleKVCalibrate, NextScaleKVReport):
        schema = node.define_schema()
        assert schema.node_id.startswith("NextScale") and schema.category == "NextScale/kv" and schema.description
        assert all(i.tooltip for i in schema.inputs), node
    assert NextScaleKVPolicy.define_schema().outputs[0].io_type == "NEXTSCALE_KV_POLICY"
    assert NextScaleKVCalibrate.define_schema().outputs[0].io_type == "NEXTSCALE_KV_PROFILE"
    assert NextScaleKVPolicy.validate_inputs("hack") is True
    assert "not one of the choices" in NextScaleKVPolicy.validate_inputs("h2o")

    from nextscale.nodes.service import adopt  # a module as the NextScaleModel a socket carries

    var, vae = make_pair()
    NextScaleKVCalibrate.hidden = io.HiddenHolder.from_dict({})
    profile, path = NextScaleKVCalibrate.execute(adopt(var), adopt(vae), 2, 0, 2.0, "", "my profile").result
    assert isinstance(profile, KVProfile) and path == os.path.join(out, "nextscale_kv", "my_profile.json"), path
    assert KVProfile.load(path) == profile
    spec = NextScaleKVPolicy.execute("hack", 0.25, None, "nextscale_kv/my_profile.json").result[0]
    assert isinstance(spec, KVPolicySpec) and spec.profile == profile
    try:
        NextScaleKVPolicy.execute("scalekv", 0.25, None, "nextscale_kv/missing.json")
        raise AssertionError("no error")
    except NextScaleError as e:
        assert "does not exist" in str(e)
    text, images = NextScaleKVReport.execute(adopt(var), adopt(vae), spec, "3", 5, 2.0, 2).result
    assert "peak KV bytes" in text and "PSNR" in text and images.shape == (2, 12, 24, 3), (text, images.shape)

    NextScaleSampler.hidden = io.HiddenHolder.from_dict({})
    run = lambda kv: NextScaleSampler.execute(adopt(var), adopt(vae), "3", 5, 2.0, 0, 0.0, False, 2, "",
                                              {"preview": False}, kv_policy=kv).result[0]
    plain = run(None)
    exact = run(NextScaleKVPolicy.execute("scalekv", 1.0, profile).result[0])
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, exact.indices))
    small = run(NextScaleKVPolicy.execute("scalekv", 0.1, profile).result[0])
    assert small.extra["kv_policy"] == "scalekv"
    print("nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def test_nodes_in_comfyui(tmp_path):
    """The KV nodes and the sampler's kv_policy input, called in ComfyUI's python."""
    result = run_in_comfyui_python(NODE_CHECK, str(tmp_path), cwd=tmp_path, timeout=900)
    assert result.returncode == 0 and "nodes ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
