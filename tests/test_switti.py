"""Switti without ComfyUI: strict loading of the official key layout (written out here from upstream's architecture),
the config inferred from shapes, a hub config.json or the metadata, and the scale loop (cached scales against the
whole sequence at once, guidance window, seeds per item, refusals)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import FAMILIES, Workload
from nextscale.models.core.hooks import Control, SamplerHooks
from nextscale.models.core.kv_cache import KVPolicy
from nextscale.models.core.schedule import SCHEDULE_256, SCHEDULE_512, SCHEDULE_1024, token_count
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.switti.model import Switti, SwittiText, rope_angles
from nextscale.models.switti.sampler import SwittiCondition, SwittiOptions, sample_switti
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig

torch.set_num_threads(1)
SMALL = (1, 2, 3, 4)


def official_keys(depth: int, width: int, vocab: int, cvae: int, scales: int, tokens: int) -> dict[str, tuple]:
    """Every key of upstream's ``Switti`` (RoPE, SwiGLU, crop condition) and its shape, as its modules name them."""
    C, hidden = width, int(width * 8 / 3)
    keys = {
        "pos_start": (1, 1, C), "lvl_1L": (1, tokens), "attn_bias_for_masking": (1, 1, tokens, tokens),
        "word_embed.weight": (C, cvae), "word_embed.bias": (C,),
        "text_pooler.weight": (C, 1280), "text_pooler.bias": (C,),
        "lvl_embed.weight": (scales, C),
        "crop_embed.weight": (C // 8,), "crop_proj.weight": (C, C), "crop_proj.bias": (C,),
        "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (vocab, C), "head.bias": (vocab,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({
            b + "attn.to_qkv.weight": (3 * C, C), b + "attn.to_qkv.bias": (3 * C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "cross_attn.to_q.weight": (C, C), b + "cross_attn.to_q.bias": (C,),
            b + "cross_attn.to_kv.weight": (2 * C, 2048), b + "cross_attn.to_kv.bias": (2 * C,),
            b + "cross_attn.proj.weight": (C, C), b + "cross_attn.proj.bias": (C,),
            b + "ffn.up_proj.weight": (hidden, C), b + "ffn.down_proj.weight": (C, hidden),
            b + "ffn.gate_proj.weight": (hidden, C),
            b + "attention_y_norm.weight": (2048,),
            b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,),
            b + "crop_cond_scales": (1, C),
        })
        for norm in ("self_attention_norm", "cross_attention_norm", "ffn_norm"):
            keys.update({b + f"{norm}1.weight": (C,), b + f"{norm}2.weight": (C,)})
    return keys


def official_state_dict(depth=2, width=64, vocab=32, cvae=8, patch_nums=SMALL, causal=False, seed=0):
    """Random weights under the official keys; the buffers as upstream registers them."""
    L = token_count(patch_nums)
    g = torch.Generator().manual_seed(seed)
    shapes = official_keys(depth, width, vocab, cvae, len(patch_nums), L)
    sd = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    sd["head.weight"] *= 0.02  # upstream's head initialisation: logits of order 1, so that draws vary
    level = torch.tensor([si for si, pn in enumerate(patch_nums) for _ in range(pn * pn)])
    sd["lvl_1L"] = level[None]
    allowed = level[None, :] <= level[:, None] if causal else level[None, :] == level[:, None]
    sd["attn_bias_for_masking"] = torch.zeros(L, L).masked_fill(~allowed, float("-inf"))[None, None]
    return sd


def text(rows: int, lengths, seed: int = 1) -> SwittiText:
    g = torch.Generator().manual_seed(seed)
    bias = torch.full((rows, 77), float("-inf"))
    for r, n in enumerate(lengths):
        bias[r, :n] = 0
    return SwittiText(torch.randn(rows, 77, 2048, generator=g), torch.randn(rows, 1280, generator=g), bias)


def tokenizer(patch_nums=SMALL, vocab=32, cvae=8) -> MultiScaleVQVAE:
    torch.manual_seed(0)
    return MultiScaleVQVAE(TokenizerConfig(vocab_size=vocab, z_channels=cvae, ch=32, ch_mult=(1, 1),
                                           patch_nums=patch_nums)).eval()


def test_the_official_layout_loads_strictly_and_the_config_comes_from_the_shapes():
    sd = official_state_dict()
    assert str(FAMILIES.identify(sd)) == "switti-generator"
    model = Switti.from_state_dict(sd)
    cfg = model.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim, cfg.vocab_size, cfg.cvae) == (2, 64, 2, 170, 32, 8)
    assert cfg.patch_nums == SMALL and not cfg.causal and cfg.crop_cond
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    # the buffers are optional (rebuilt); the AR mask says Switti-AR
    unmasked = {k: v for k, v in sd.items() if k != "attn_bias_for_masking"}
    assert Switti.from_state_dict(unmasked).config.patch_nums == SMALL
    assert Switti.from_state_dict(official_state_dict(causal=True)).config.causal


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda sd: sd.pop("blocks.1.cross_attn.to_q.bias"), "missing key(s): blocks.1.cross_attn.to_q.bias"),
        (lambda sd: sd.update({"blocks.0.attn.q_norm.weight": torch.ones(64)}), "unexpected key(s): blocks.0.attn"),
        (lambda sd: sd.update({"head.bias": torch.zeros(31)}), "head.bias is [31], expected [32]"),
        (lambda sd: sd.pop("word_embed.weight"), "has no key 'word_embed.weight'"),
    ],
)
def test_a_file_off_the_layout_is_refused_by_key(change, needle):
    sd = official_state_dict()
    change(sd)
    with pytest.raises(NextScaleError, match="Switti transformer") as e:
        Switti.from_state_dict(sd, "switti.safetensors")
    assert needle in str(e.value)


def test_schedules_from_the_buffers_and_the_hub_config(tmp_path):
    # the 1024 px models: 14 scales, 9451 tokens, told by lvl_1L (no 357 MB mask needed)
    level = torch.tensor([si for si, pn in enumerate(SCHEDULE_1024) for _ in range(pn * pn)])
    sd = {k: v for k, v in official_state_dict(patch_nums=(1, 2)).items() if k != "attn_bias_for_masking"}
    sd.update({"lvl_1L": level[None], "lvl_embed.weight": torch.zeros(14, 64)})
    assert Switti.infer_config(sd).patch_nums == SCHEDULE_1024
    # a Hugging Face folder: config.json says Switti-AR even without the mask
    folder = tmp_path / "Switti-AR"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"depth": 2, "use_ar": True, "rope_theta": 5000, "reso": 512}))
    known = Switti.hub_fields(str(folder))
    assert known == {"causal": True, "rope_theta": 5000.0}
    small = {k: v for k, v in official_state_dict().items() if k != "attn_bias_for_masking"}
    cfg = Switti.from_state_dict(small, known=known).config
    assert cfg.causal and cfg.rope_theta == 5000.0
    (tmp_path / "plain.json").write_text(json.dumps({"rope": False}))
    with pytest.raises(NextScaleError, match="without RoPE or SwiGLU"):
        Switti.hub_fields(str(tmp_path / "plain.safetensors"))
    # saved by NextScale: the config travels in the metadata
    model = Switti.from_state_dict(official_state_dict(causal=True))
    path = os.path.join(tmp_path, "mine.safetensors")
    model.save(path)
    assert Switti.config_from_file(path) == model.config
    assert Switti.from_file(path).config == model.config


def test_rope_spans_every_grid_from_0_to_rope_size():
    angles = rope_angles((1, 3), head_dim=8, theta=10000.0, size=128.0)
    assert tuple(angles.shape) == (10, 4)
    assert torch.equal(angles[0], torch.zeros(4))
    # token 1 + 8 of the 3x3 grid: column 2, row 2 -> 128 at the first frequency of both halves
    assert torch.allclose(angles[9], torch.tensor([128.0, 128.0 * 0.01, 128.0, 128.0 * 0.01]))


@pytest.mark.parametrize("causal", [False, True])
def test_the_scale_loop_gives_the_logits_of_the_whole_sequence(causal):
    """Scale by scale (Switti: within each scale; Switti-AR: through the KV cache) equals the whole sequence at once
    under the training mask, for the tokens drawn."""
    model = Switti.from_state_dict(official_state_dict(causal=causal)).double()
    tok = tokenizer().double()
    prompts = text(2, [5, 12])
    seen = []
    hooks = SamplerHooks(callback=lambda si, K, f_hat: seen.append(si))
    original = model.logits
    logits_per_scale = []
    model.logits = lambda x, cond: logits_per_scale.append(original(x, cond)) or logits_per_scale[-1]
    options = SwittiOptions(cfg=0.0, top_k=0, top_p=0.0)
    tokens = sample_switti(model, tok, SwittiCondition(prompts, text(1, [2], seed=2)), seed=3, options=options,
                           hooks=hooks)
    del model.logits
    assert seen == [0, 1, 2, 3]
    x_BLCv = tok.quantize.teacher_forcing_input(tokens.flat(), SMALL).double()
    double = SwittiText(prompts.context_BTC.double(), prompts.pooled_BC.double(), prompts.bias_BT.double())
    with torch.no_grad():
        whole = model.forward_teacher(double, x_BLCv)
    scaled = torch.cat(logits_per_scale, dim=1)
    assert float((scaled - whole).abs().max() / whole.abs().max()) < 1e-6  # fp32 logits of a float64 model


@pytest.mark.parametrize("causal", [False, True])
def test_after_guidance_stops_only_the_prompt_rows_run(causal):
    """From guidance_stop on the null rows leave the batch (and Switti-AR's cache): the prompts' logits are still
    those of the whole sequence at once, with the null rows run only while guidance is on."""
    model = Switti.from_state_dict(official_state_dict(causal=causal)).double()
    tok = tokenizer().double()
    prompts = text(2, [5, 12])
    original, rows, logits_per_scale = model.logits, [], []
    model.logits = lambda x, cond: (out := original(x, cond), logits_per_scale.append(out[:2]))[0]
    model_forward = model.forward_scale
    model.forward_scale = lambda si, x, *a, **k: rows.append(x.shape[0]) or model_forward(si, x, *a, **k)
    options = SwittiOptions(cfg=4.0, guidance_stop=2, top_k=0, top_p=0.0)
    tokens = sample_switti(model, tok, SwittiCondition(prompts, text(1, [2], seed=2)), seed=3, options=options)
    del model.logits, model.forward_scale
    assert rows == [4, 4, 2, 2]
    x_BLCv = tok.quantize.teacher_forcing_input(tokens.flat(), SMALL).double()
    double = SwittiText(prompts.context_BTC.double(), prompts.pooled_BC.double(), prompts.bias_BT.double())
    with torch.no_grad():
        whole = model.forward_teacher(double, x_BLCv)
    scaled = torch.cat(logits_per_scale, dim=1)
    assert float((scaled - whole).abs().max() / whole.abs().max()) < 1e-6


def test_guidance_window_seeds_and_temperature():
    model = Switti.from_state_dict(official_state_dict())
    tok, prompts, null = tokenizer(), text(2, [5, 12]), text(1, [2], seed=2)

    def run(condition=None, seed=5, **kw):
        condition = condition or SwittiCondition(prompts, null)
        return sample_switti(model, tok, condition, seed=seed, options=SwittiOptions(**kw)).indices

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    guided = run(cfg=4.0)
    assert same(guided, run(cfg=4.0)) and not same(guided, run(cfg=4.0, seed=6))
    # guidance off at every scale (stop 0, or start past the end) is cfg 0, null rows never computed
    assert same(run(cfg=0.0), run(cfg=4.0, guidance_stop=0)) and same(run(cfg=0.0), run(cfg=4.0, guidance_start=4))
    assert not same(guided, run(cfg=0.0))
    # item i of a batch draws what a batch of one with seed + i draws
    second = SwittiCondition(SwittiText(prompts.context_BTC[1:], prompts.pooled_BC[1:], prompts.bias_BT[1:]), null)
    assert same([t[1:] for t in guided], run(second, seed=6, cfg=4.0))
    # the temperature acts from guidance_stop on only; a near-zero one is greedy there
    cooled = run(cfg=4.0, guidance_stop=2, temperature=1e-4)
    assert same(run(cfg=4.0, guidance_stop=2)[:2], cooled[:2]) and not same(run(cfg=4.0, guidance_stop=2), cooled)
    smooth = sample_switti(model, tok, SwittiCondition(prompts, null), seed=5,
                           options=SwittiOptions(more_smooth=True, smooth_start=1))
    assert smooth.f_hat is not None and same(smooth.indices[:1], guided[:1])


def test_refusals_and_the_family():
    model = Switti.from_state_dict(official_state_dict())
    ar = Switti.from_state_dict(official_state_dict(causal=True))
    tok, condition = tokenizer(), SwittiCondition(text(1, [4]), text(1, [2]))
    family = FAMILIES.get("switti")
    with pytest.raises(NextScaleError, match="KV policies apply to Switti-AR only"):
        family.sample(model, tok, condition, seed=0, hooks=SamplerHooks(kv_policy=KVPolicy()))
    assert family.sample(ar, tok, condition, seed=0, hooks=SamplerHooks(kv_policy=KVPolicy())).batch_size == 1
    with pytest.raises(NextScaleError, match="does not support the control hook"):
        family.sample(model, tok, condition, seed=0, hooks=SamplerHooks(control=Control()))
    with pytest.raises(NextScaleError, match="use VQVAE-Switti"):
        family.check_pair(model, tokenizer(vocab=64))
    with pytest.raises(NextScaleError, match="DualCLIPLoader"):
        SwittiText(torch.zeros(1, 77, 2048), torch.zeros(1, 768), torch.zeros(1, 77))
    with pytest.raises(NextScaleError, match="has 10 scales but this Switti model has 4"):
        model.schedule(SCHEDULE_256)
    with pytest.raises(NextScaleError, match="take a text prompt"):
        family.class_names(model)
    # Switti keeps no self-attention cache; Switti-AR's is declared with the run's rows
    work = Workload(batch_size=2, guided=True)
    assert family.working_memory(ar, None, work) - family.working_memory(model, None, work) == (
        family.kv_geometry(ar).cache_bytes(4, 4)
    )


def test_a_512_model_samples_the_256_schedule():
    sd = official_state_dict(patch_nums=SCHEDULE_512, width=32, depth=1)
    model = Switti.from_state_dict({k: v for k, v in sd.items() if k != "attn_bias_for_masking"})
    assert model.config.patch_nums == SCHEDULE_512
    tokens = sample_switti(model, tokenizer(SCHEDULE_256), SwittiCondition(text(1, [3]), text(1, [2])), seed=0,
                           options=SwittiOptions(schedule=SCHEDULE_256, top_k=1))
    assert tokens.patch_nums == SCHEDULE_256


@pytest.mark.parametrize("policy", [None, "recent", "scalekv", "hack"])
def test_switti_ar_declares_the_kv_cache_its_run_allocates(monkeypatch, policy):
    from test_family import LiveKV

    ar, family = Switti.from_state_dict(official_state_dict(causal=True)), FAMILIES.get("switti")
    geometry = family.kv_geometry(ar)
    bound = None if policy is None else KVPolicySpec(policy, 0.2).bind_scales(
        geometry.layers, geometry.heads, geometry.scales
    )
    live = LiveKV(monkeypatch)
    tokens = family.sample(ar, tokenizer(), SwittiCondition(text(2, [3, 5]), text(1, [2])), seed=0,
                           options=SwittiOptions(guidance_stop=3), hooks=SamplerHooks(kv_policy=bound))
    assert tokens.extra["kv_policy"] == (bound or KVPolicy()).name  # the null rows left the cache after scale 2
    declared = geometry.cache_bytes(4, 4, bound)
    assert declared >= live.peak > 0
    assert family.working_memory(ar, None, Workload(batch_size=2, kv_policy=bound)) > declared
