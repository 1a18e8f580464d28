"""FlexVAR without ComfyUI: strict loading of the official key layouts (written out here from upstream's ``FlexVAR``
and LlamaGen's ``VQModel``), the config from the shapes, the schedules a resolution and a step count imply, the
KV-cached scale loop against the whole-sequence pass, the sampler's per-scale rules, decoding any scale."""

from __future__ import annotations

import itertools

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import FAMILIES, Workload
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.kv_cache import KVCache
from nextscale.models.core.schedule import SCHEDULE_256, token_count
from nextscale.models.flexvar.family import FAMILY
from nextscale.models.flexvar.model import FlexVAR
from nextscale.models.flexvar.sampler import FlexVAROptions, sample_flexvar
from nextscale.models.flexvar.schedule import PUBLISHED, ScheduleReport, flex_schedule, parse_sides, resolution_side
from nextscale.models.flexvar.tokenizer import FlexVAE
from nextscale.models.kv.policies import KVPolicySpec
from nextscale.models.var.editing import inpaint
from nextscale.models.var.model import VAR, VARConfig
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_dd import block_keys

torch.set_num_threads(1)
VOCAB, CVAE = 16, 8


def generator_keys(depth=2, width=64, classes=10, pos_side=8) -> dict[str, tuple]:
    """Every key of upstream's ``FlexVAR`` (``shared_aln=False``, ``attn_l2_norm=True``)."""
    C = width
    keys = {
        "pos_start": (1, 1, C), "pos_1LC": (1, C, pos_side, pos_side), "word_embed.weight": (C, CVAE),
        "word_embed.bias": (C,), "class_emb.weight": (classes + 1, C), "head_nm.ada_lin.1.weight": (2 * C, C),
        "head_nm.ada_lin.1.bias": (2 * C,), "head.weight": (VOCAB, C), "head.bias": (VOCAB,),
        "attn_bias_for_masking": (1, 1, 30, 30),  # whatever schedule upstream's last training step drew
    }
    for i in range(depth):
        keys.update(block_keys(f"blocks.{i}.", C, heads=depth))
    return keys


def tokenizer_keys(ch=32, ch_mult=(1, 2), blocks=1, z=32) -> dict[str, tuple]:
    """Every key of LlamaGen's ``VQModel`` (FlexVAE) with these sizes."""
    keys = {"quantize.embedding.weight": (VOCAB, CVAE), "quantize.codebook_used": (65536,)}

    def conv(name, c_out, c_in, k):
        keys.update({f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)})

    def norm(name, c):
        keys.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def res(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    n = len(ch_mult)
    conv("encoder.conv_in", ch, 3, 3)
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(blocks):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, ch * m)
            c = ch * m
            if i == n - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", c)
        if i != n - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", c, c, 3)
    res("encoder.mid.0", c, c), attn("encoder.mid.1", c), res("encoder.mid.2", c, c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", z, c, 3)
    conv("decoder.conv_in", c, z, 3)
    res("decoder.mid.0", c, c), attn("decoder.mid.1", c), res("decoder.mid.2", c, c)
    for k, level in enumerate(reversed(range(n))):
        for j in range(blocks + 1):
            res(f"decoder.conv_blocks.{k}.res.{j}", c, ch * ch_mult[level])
            c = ch * ch_mult[level]
            if level == n - 1:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", c)
        if level != 0:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", 3, c, 3)
    conv("quant_conv", CVAE, z, 1), conv("post_quant_conv", z, CVAE, 1)
    return keys


def random_state_dict(keys: dict[str, tuple], seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in keys.items()}
    for k in sd:
        if k.endswith("zero_k_bias"):
            sd[k].zero_()
    return sd


def models(seed=0):
    return (FlexVAR.from_state_dict(random_state_dict(generator_keys(), seed)),
            FlexVAE.from_state_dict(random_state_dict(tokenizer_keys(), seed)))


def test_the_official_layouts_are_identified_and_load_strictly_with_the_config_from_the_shapes():
    gen_sd, tok_sd = random_state_dict(generator_keys()), random_state_dict(tokenizer_keys())
    assert str(FAMILIES.identify(gen_sd)) == "flexvar-generator"
    assert str(FAMILIES.identify(tok_sd)) == "flexvar-tokenizer"
    gen, tok = FlexVAR.from_state_dict(gen_sd), FlexVAE.from_state_dict(tok_sd)
    cfg = gen.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes, cfg.vocab_size, cfg.cvae, cfg.pos_side) == (
        2, 64, 2, 10, VOCAB, CVAE, 8)
    assert set(gen.state_dict()) == set(gen_sd) - {"attn_bias_for_masking"}
    assert (tok.config.ch, tok.config.ch_mult, tok.config.num_res_blocks, tok.config.z_channels) == (32, (1, 2), 1, 32)
    qkv = tok.state_dict()["encoder.down.1.attn.0.qkv.weight"]
    expected = torch.cat([tok_sd[f"encoder.conv_blocks.1.attn.0.{p}.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    assert torch.equal(tok.state_dict()["decoder.up.1.block.0.conv1.weight"],
                       tok_sd["decoder.conv_blocks.0.res.0.conv1.weight"])  # the decoder's lowest level comes first


def test_var_files_are_not_flexvar_and_a_missing_key_is_named():
    var = VAR(VARConfig(depth=1, embed_dim=64, num_heads=1, num_classes=10, vocab_size=VOCAB, cvae=CVAE,
                        patch_nums=(1, 2)))
    vqvae = MultiScaleVQVAE(TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1)))
    assert str(FAMILIES.identify(var.state_dict())) == "var-generator"
    assert str(FAMILIES.identify(vqvae.state_dict())) == "var-tokenizer"
    sd = random_state_dict(tokenizer_keys())
    del sd["encoder.conv_blocks.1.attn.0.k.weight"]
    with pytest.raises(NextScaleError, match=r"encoder\.conv_blocks\.1\.attn\.0\.k\.weight"):
        FlexVAE.from_state_dict(sd)
    sd = random_state_dict(generator_keys())
    sd["lvl_embed.weight"] = torch.zeros(4, 64)  # a VAR transformer's key: not FlexVAR's
    with pytest.raises(NextScaleError, match="lvl_embed"):
        FlexVAR.from_state_dict(sd)
    gen, _ = models()
    with pytest.raises(NextScaleError, match="FlexVAE"):
        FAMILY.check_pair(gen, vqvae)


def test_schedules_for_a_resolution_and_steps():
    assert flex_schedule(16, 10) == SCHEDULE_256
    assert flex_schedule(32, 15) == PUBLISHED[(32, 15)]
    for side, steps in [(16, 4), (16, 16), (24, 8), (32, 10), (64, 12), (5, 5)]:
        pn = flex_schedule(side, steps)
        assert len(pn) == steps and pn[0] == 1 and pn[-1] == side
        assert all(b > a for a, b in itertools.pairwise(pn))
    assert flex_schedule(16, 16) == tuple(range(1, 17))
    assert resolution_side(512) == 32
    with pytest.raises(NextScaleError, match="multiple of FlexVAE's 16 px"):
        resolution_side(500)
    with pytest.raises(NextScaleError, match="use 2 to 4 steps"):
        flex_schedule(4, 6)
    with pytest.raises(NextScaleError, match="32 to 1024 px on a side, got 16 px"):
        flex_schedule(1, 2)
    assert parse_sides("1_2_3_4_5_7_10_13_16") == PUBLISHED[(16, 9)]
    report = ScheduleReport(PUBLISHED[(16, 13)]).text()
    assert "13 steps, 256x256 px, 981 tokens" in report
    assert report.count("greedy") == 4  # sides 7, 9, 12 and 14 were never trained


def test_kv_cached_scales_match_the_whole_sequence_on_any_schedule():
    gen, tok = models()
    labels = torch.tensor([3, 10])
    for patch_nums in [(1, 2, 3, 5), (1, 3, 4)]:
        g = torch.Generator().manual_seed(1)
        indices = [torch.randint(VOCAB, (2, pn, pn), generator=g) for pn in patch_nums]
        teacher = gen.forward_teacher(labels, tok.teacher_input(indices, patch_nums), patch_nums)
        cache = KVCache(gen.depth, token_count(patch_nums))
        cond = gen.condition(labels, patch_nums)
        x, begin, cached = gen.first_token_map(cond), 0, []
        for si, pn in enumerate(patch_nums):
            cached.append(gen.forward_scale(si, x, cond, cache))
            begin += pn * pn
            if si + 1 < len(patch_nums):
                x = gen.scale_input(begin, tok.next_input(indices[si], patch_nums[si + 1]), cond)
        torch.testing.assert_close(torch.cat(cached, dim=1), teacher, atol=1e-4, rtol=1e-4)


def test_the_sampler_draws_per_item_and_takes_untrained_sides_greedily():
    gen, tok = models()
    options = FlexVAROptions(patch_nums=(1, 2, 3, 7), cfg=1.5)
    both = sample_flexvar(gen, tok, torch.tensor([1, 2]), seed=5, options=options)
    second = sample_flexvar(gen, tok, torch.tensor([2]), seed=6, options=options)
    for a, b in zip(both.indices, second.indices):
        assert torch.equal(a[1:], b)
    assert [tuple(i.shape) for i in both.indices] == [(2, 1, 1), (2, 2, 2), (2, 3, 3), (2, 7, 7)]
    assert options.top_k_at(3) == 1 and options.top_k_at(2) == 900
    assert FlexVAROptions(max_pn=2).top_k_at(2) == 1
    ramp = FlexVAROptions(patch_nums=PUBLISHED[(16, 13)], cfg=2.0)
    assert ramp.guidance(0) == 0 and ramp.guidance(9) == 2.0 and ramp.guidance(12) == pytest.approx(2.0 * 12 / 9)
    assert FlexVAROptions(patch_nums=PUBLISHED[(32, 15)], cfg=3.0).guidance(13) == 3.0  # side 23 > max_pn
    with pytest.raises(NextScaleError, match="control"):
        sample_flexvar(gen, tok, torch.tensor([1]), seed=0, hooks=SamplerHooks(control=object()))


def test_an_inpaint_guide_keeps_the_reference_tokens_where_the_mask_keeps():
    gen, tok = models()
    options = FlexVAROptions(patch_nums=(1, 2, 4), cfg=1.5, top_k=0, top_p=0)
    reference = sample_flexvar(gen, tok, torch.tensor([1]), seed=0, options=options)
    regenerate = torch.zeros(1, 8, 8)
    regenerate[:, :, 4:] = 1  # the right half
    guide = inpaint(reference, regenerate).bind(tok, options.patch_nums, 2)
    edited = sample_flexvar(gen, tok, torch.tensor([2, 5]), seed=9, options=options, hooks=SamplerHooks(guide=guide))
    free = sample_flexvar(gen, tok, torch.tensor([2, 5]), seed=9, options=options)
    assert torch.equal(edited.indices[0], reference.indices[0].expand(2, -1, -1))  # 1 token: kept whole
    for si, kept in ((1, 1), (2, 2)):  # the left columns of the 2x2 and 4x4 maps
        assert torch.equal(edited.indices[si][..., :kept], reference.indices[si][..., :kept].expand(2, -1, -1))
    assert not all(torch.equal(a[..., 2:], b[..., 2:]) for a, b in zip(edited.indices[1:], free.indices[1:]))


def test_a_kv_policy_and_the_callback_run_and_each_scale_decodes_on_its_own():
    gen, tok = models()
    seen = []
    policy = KVPolicySpec("recent", budget=0.5).bind_scales(gen.depth, gen.config.num_heads, (1, 2, 4))
    hooks = SamplerHooks(kv_policy=policy, callback=lambda si, k, codes: seen.append((si, k, tuple(codes.shape))))
    tokens = FAMILY.sample(gen, tok, torch.tensor([4]), seed=0, options=FlexVAROptions(patch_nums=(1, 2, 4)),
                           hooks=hooks)
    assert seen == [(0, 3, (1, CVAE, 1, 1)), (1, 3, (1, CVAE, 2, 2)), (2, 3, (1, CVAE, 4, 4))]
    assert tokens.extra["kv_policy"] != "full"
    image = FAMILY.decode(tok, tokens)
    assert image.shape == (1, 3, 8, 8) and image.abs().max() <= 1
    coarse = torch.nn.functional.interpolate(tok.indices_to_img(tokens.indices[1]), size=(8, 8), mode="bicubic")
    torch.testing.assert_close(FAMILY.decode(tok, tokens, upto=2), coarse.clamp(-1, 1))


def test_encoding_takes_the_nearest_normalised_code_at_every_scale():
    _, tok = models()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    tokens = FAMILY.encode(tok, images, (1, 2, 4))
    assert [tuple(i.shape) for i in tokens.indices] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    h = tok.encoder(images)
    codebook = torch.nn.functional.normalize(tok.quantize.embedding.weight, dim=-1)
    for idx, pn in zip(tokens.indices, (1, 2, 4)):
        z = torch.nn.functional.normalize(tok.quant_conv(torch.nn.functional.adaptive_avg_pool2d(h, pn)), dim=1)
        distance = torch.cdist(z.flatten(2).transpose(1, 2), codebook[None].expand(2, -1, -1))
        assert torch.equal(idx.flatten(1), distance.argmin(dim=-1))
    with pytest.raises(NextScaleError, match="no fixed schedule"):
        FAMILY.encode(tok, images)


def test_memory_grows_with_the_schedule():
    gen, tok = models()
    small = FAMILY.memory(gen, tok, Workload(schedule=(1, 2, 4), decode_batch=1))
    large = FAMILY.memory(gen, tok, Workload(schedule=(1, 2, 4, 8), decode_batch=1))
    assert 0 < small.kv_cache < large.kv_cache and small.decode < large.decode
    assert small.kv_cache == FAMILY.kv_geometry(gen, (1, 2, 4)).cache_bytes(2, 4)
