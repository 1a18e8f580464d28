"""Infinity transformer and schedules: official key layout, strict loading, and the math of one scale step
checked against an independent re-implementation of upstream's formulas (per-prompt packed text, complex RoPE)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.kv_cache import KVCache
from nextscale.models.core.rope import apply_rope
from nextscale.models.infinity.model import Infinity, InfinityConfig, parameter_count
from nextscale.models.infinity.schedule import (
    RESOLUTIONS,
    TEMPLATES,
    InfinitySchedule,
    nearest_template,
    rope_angles,
)

TINY = InfinityConfig(
    depth=4, embed_dim=64, num_heads=4, hidden_dim=128, token_dim=4, text_dim=32, text_maxlen=16, block_chunks=2,
    pool_heads=2,
)
SCHEDULE = InfinitySchedule.custom([(1, 1), (2, 2), (2, 3), (4, 6)])


def tiny_model(config: InfinityConfig = TINY, seed: int = 0) -> Infinity:
    torch.manual_seed(seed)
    model = Infinity(config).eval().requires_grad_(False)
    with torch.no_grad():  # gates and modulation far from the identity init, so every path matters
        for block in model.block_list():
            block.ada_gss.normal_(0, 0.3)
        model.head.weight.normal_(0, 0.2)
    return model


def prompts(B: int = 2, T: int = 7, Ct: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, T, Ct, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1:, T - 2 :] = False  # the second prompt is two tokens shorter (padded)
    return text, mask


# -- schedules ----------------------------------------------------------------------------------------


def test_templates_match_the_published_table():
    assert len(TEMPLATES) == 15
    totals = {1.0: (521, 2521, 6425, 10521), 1.25: (614, 2814, 6854, 10774), 2.0: (451, 2681, 7219, 11269)}
    for ratio, expected in totals.items():
        got = tuple(InfinitySchedule.from_template(ratio, r).num_tokens for r in ("0.06M", "0.25M", "0.60M", "1M"))
        assert got == expected
    assert InfinitySchedule.from_template(1.0, "0.06M").pixel_size() == (256, 256)
    assert InfinitySchedule.from_template(1.0, "1M").pixel_size() == (1024, 1024)
    assert InfinitySchedule.from_template(1.25, "1M").pixel_size() == (1120, 896)
    # inverse templates swap h and w, under upstream's truncated key
    assert TEMPLATES[0.8] == tuple((w, h) for h, w in TEMPLATES[1.25])
    assert TEMPLATES[0.333] == tuple((w, h) for h, w in TEMPLATES[3.0])
    assert [len(TEMPLATES[1.0][: n]) for n in RESOLUTIONS.values()] == [7, 10, 12, 13]


def test_nearest_template_and_errors():
    assert nearest_template(1.0) == 1.0
    assert nearest_template(1.3) == 1.333
    assert nearest_template(9 / 16) == 0.571
    assert nearest_template(10.0) == 3.0
    with pytest.raises(NextScaleError, match="positive"):
        nearest_template(0)
    with pytest.raises(NextScaleError, match="resolution"):
        InfinitySchedule.from_template(1.0, "2M")
    with pytest.raises(NextScaleError, match="shrink"):
        InfinitySchedule.custom([(2, 2), (1, 1)])


def test_rope_positions_are_normalised_to_the_1m_grid():
    sched = InfinitySchedule.from_template(1.0, "0.06M")  # last grid 16x16, positions on the 64x64 grid
    assert sched.rope_grid == (64, 64)
    pos = sched.rope_positions()
    starts = sched.starts()
    # scale (6, 6): rows round(i * 64 / 6)
    six = pos[starts[3] : starts[3] + 36].view(6, 6, 2)
    assert six[:, 0, 0].tolist() == [round(i * 64 / 6) for i in range(6)] == [0, 11, 21, 32, 43, 53]
    assert six[0, :, 1].tolist() == [0, 11, 21, 32, 43, 53]
    last = pos[starts[-1] :].view(16, 16, 2)
    assert last[:, 0, 0].tolist() == list(range(0, 64, 4))
    # a non-square template: rows follow H_1M / h, columns W_1M / w
    tall = InfinitySchedule.from_template(2.0, "0.06M")
    assert tall.rope_grid == (90, 45)
    p = tall.rope_positions()[tall.starts()[2] :][: 4 * 2].view(4, 2, 2)  # scale (4, 2)
    assert p[:, 0, 0].tolist() == [0, 22, 45, 68] and p[0, :, 1].tolist() == [0, 22]


def test_rope_rotation_matches_complex_multiplication():
    head_dim = 16
    ang = rope_angles(SCHEDULE, head_dim)  # (L, 8)
    x = torch.randn(2, 3, SCHEDULE.num_tokens, head_dim)
    got = apply_rope(x, ang.cos(), ang.sin())
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
                             * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the first quarter of the frequencies follows the row, the second the column, base 1e4 over head_dim / 2
    pos = SCHEDULE.rope_positions().float()
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(ang[:, :4], pos[:, :1] * inv)
    torch.testing.assert_close(ang[:, 4:], pos[:, 1:] * inv)


# -- the model ----------------------------------------------------------------------------------------


def test_cached_scales_match_the_teacher_forced_sequence():
    model = tiny_model()
    text, mask = prompts()
    for negative in (None, prompts(B=1, T=4, seed=5)):
        ctx = model.condition(text, mask, guided=True, negative=negative)
        R = ctx.cond_BD.shape[0]
        xs = [torch.randn(R, h * w, TINY.token_dim) for h, w in SCHEDULE.scales[1:]]
        full = model.forward_teacher(ctx, torch.cat(xs, 1), SCHEDULE)
        cache = KVCache(model.depth, SCHEDULE.num_tokens)
        outs = [model.forward_scale(0, model.first_token_map(ctx), ctx, cache, SCHEDULE)]
        for si, x in enumerate(xs, start=1):
            outs.append(model.forward_scale(si, model.scale_input(si, x), ctx, cache, SCHEDULE))
        cache.free()
        assert full.shape == (R, SCHEDULE.num_tokens, 2 * TINY.token_dim)
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def _reference_logits(model: Infinity, text, mask, x_BLCv, schedule) -> torch.Tensor:
    """Upstream's teacher-forced forward for the conditional rows, written from its formulas one prompt at a time:
    packed text of each prompt's true length, RMSNorm, attentive pooling, cos-attention with RoPE by complex
    numbers, cross-attention without padding, shared AdaLN, bitwise head."""
    cfg = model.config
    C, H = cfg.embed_dim, cfg.num_heads
    c = C // H
    counts = schedule.token_counts
    L = sum(counts)
    level = torch.tensor([si for si, n in enumerate(counts) for _ in range(n)])
    visible = level[:, None] >= level[None, :]
    pos = schedule.rope_positions().float()
    inv = 1.0 / 10000 ** (torch.arange(0, c // 2, 2).float() / (c // 2))
    rot = torch.polar(torch.ones(L, c // 2), torch.cat((pos[:, :1] * inv, pos[:, 1:] * inv), -1))

    def rope(t):  # (H, L, c)
        return torch.view_as_real(torch.view_as_complex(t.unflatten(-1, (-1, 2)).contiguous()) * rot).flatten(-2)

    def attend(q, k, v, scale, allowed=None):
        s = (q @ k.transpose(-1, -2)) * scale
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return s.softmax(-1) @ v

    out = []
    for b in range(text.shape[0]):
        t = text[b, mask[b]]  # the prompt's real tokens only
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * model.text_norm.weight
        pool = model.text_proj_for_sos.ca
        ph = pool.mat_q.shape[1]
        kv = F.linear(t, pool.mat_kv.weight).view(-1, 2, ph, C // ph)
        k, v = kv[:, 0].transpose(0, 1), (kv[:, 1] + pool.v_bias.view(ph, -1)).transpose(0, 1)
        pooled = attend(pool.mat_q[0][:, None], k, v, (C // ph) ** -0.5).reshape(1, C)
        cond = pool.proj(pooled)[0]
        src = model.text_proj_for_ca(t)
        shared = model.shared_ada_lin(cond[None]).view(1, 6, C)
        x = torch.cat((cond[None] + model.pos_start[0], model.word_embed(x_BLCv[b])), 0) + model.lvl_embed(level)
        for blk in model.block_list():
            g1, g2, s1, s2, b1, b2 = (blk.ada_gss[0] + shared)[0]
            h = F.layer_norm(x, (C,), eps=cfg.norm_eps) * (1 + s1) + b1
            qkv = h @ blk.sa.mat_qkv.weight.T + torch.cat((blk.sa.q_bias, torch.zeros(C), blk.sa.v_bias))
            q, k, v = qkv.view(L, 3, H, c).permute(1, 2, 0, 3)
            q = F.normalize(q, dim=-1) * blk.sa.scale_mul_1H11[0].clamp(max=math.log(100)).exp()
            k = F.normalize(k, dim=-1)
            a = attend(rope(q), rope(k), v, 1.0, visible).transpose(0, 1).reshape(L, C)
            x = x + blk.sa.proj(a) * g1
            hq = blk.ca.mat_q(blk.ca_norm(x)).view(L, H, c).transpose(0, 1)
            kv = F.linear(src, blk.ca.mat_kv.weight).view(-1, 2, H, c)
            ck, cv = kv[:, 0].transpose(0, 1), (kv[:, 1] + blk.ca.v_bias.view(H, c)).transpose(0, 1)
            x = x + blk.ca.proj(attend(hq, ck, cv, c**-0.5).transpose(0, 1).reshape(L, C))
            h = F.layer_norm(x, (C,), eps=cfg.norm_eps) * (1 + s2) + b2
            x = x + blk.ffn.fc2(F.gelu(blk.ffn.fc1(h), approximate="tanh")) * g2
        scale, shift = model.head_nm.ada_lin(cond[None]).view(2, C)
        out.append(model.head(F.layer_norm(x, (C,), eps=cfg.norm_eps) * (1 + scale) + shift))
    return torch.stack(out)


def test_forward_matches_an_independent_reference():
    model = tiny_model()
    text, mask = prompts()
    ctx = model.condition(text, mask, guided=False)
    x = torch.randn(2, SCHEDULE.num_tokens - 1, TINY.token_dim)
    got = model.forward_teacher(ctx, x, SCHEDULE)
    torch.testing.assert_close(got, _reference_logits(model, text, mask, x, SCHEDULE), atol=2e-5, rtol=1e-4)


def test_unconditional_rows_use_cfg_uncond_with_the_prompt_length():
    model = tiny_model()
    text, mask = prompts()
    ctx = model.condition(text, mask, guided=True)
    uncond_text = model.cfg_uncond[: text.shape[1]].expand(2, -1, -1) * mask[..., None]
    ref = model.condition(uncond_text, mask, guided=False)
    torch.testing.assert_close(ctx.cond_BD[2:], ref.cond_BD)
    # a padded prompt gives the same conditioning as the same prompt alone, unpadded
    alone = model.condition(text[1:, :5], mask[1:, :5], guided=False)
    torch.testing.assert_close(ctx.cond_BD[1], alone.cond_BD[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(NextScaleError, match="unconditional embedding covers 16"):
        model.condition(torch.randn(1, 20, 32), torch.ones(1, 20, dtype=torch.bool), guided=True)
    with pytest.raises(NextScaleError, match="text features must be"):
        model.condition(torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))


# -- checkpoints --------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_inference(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    assert "block_chunks.1.module.1.sa.mat_qkv.weight" in sd and "text_proj_for_sos.ca.mat_q" in sd
    loaded = Infinity.from_state_dict({k: v for k, v in sd.items() if not k.endswith("zero_k_bias")})
    assert loaded.config == TINY
    flat_cfg = InfinityConfig(**{**TINY.to_dict(), "block_chunks": 1})
    flat = Infinity.from_state_dict(tiny_model(flat_cfg).state_dict())
    assert flat.config.block_chunks == 1 and "blocks.3.ffn.fc1.weight" in flat.state_dict()
    path = tmp_path / "tiny_infinity.safetensors"
    model.save(str(path))
    again = Infinity.from_file(str(path))
    text, mask = prompts()
    a = model.forward_teacher(model.condition(text, mask, False), torch.zeros(2, SCHEDULE.num_tokens - 1, 4), SCHEDULE)
    b = again.forward_teacher(again.condition(text, mask, False), torch.zeros(2, SCHEDULE.num_tokens - 1, 4), SCHEDULE)
    torch.testing.assert_close(a, b)
    # upstream's .pth layout: the slim state dict, with the buffers upstream itself drops on load
    pth = tmp_path / "infinity_tiny.pth"
    torch.save({**sd, "attn_bias_for_masking": torch.zeros(1, 1, 4, 4),
                "lvl_1L": torch.zeros(1, 4, dtype=torch.long)}, pth)
    assert Infinity.from_file(str(pth)).config == TINY
    # a folder of shards with a Hugging Face index (the 8B's layout)
    from safetensors.torch import save_file

    folder = tmp_path / "infinity_tiny_weights"
    folder.mkdir()
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = Infinity.from_file(str(folder))
    assert sharded.config == TINY and torch.equal(sharded.head.weight, model.head.weight)


def test_official_2b_and_8b_layouts_load_strictly():
    for name, keys, params in (("2b", 694, 2.2e9), ("8b", 862, 8.4e9)):
        cfg = InfinityConfig.official(name)
        shapes = Infinity.expected_shapes(cfg)
        assert len(shapes) == keys
        assert abs(parameter_count(cfg) - params) / params < 0.01
        # a state dict with the published keys and shapes (meta tensors: no memory), zero_k_bias buffers dropped
        sd = {k: torch.empty(s, device="meta") for k, s in shapes.items() if not k.endswith("zero_k_bias")}
        assert Infinity.infer_config(sd) == cfg
        model = Infinity.from_state_dict(sd)
        assert model.config == cfg
    two = Infinity.expected_shapes(InfinityConfig.official("2b"))
    assert two["block_chunks.7.module.3.sa.mat_qkv.weight"] == (6144, 2048)
    assert two["block_chunks.0.module.0.ca.mat_kv.weight"] == (4096, 2048)
    assert two["text_proj_for_sos.ca.mat_q"] == (1, 16, 128)
    assert two["head.weight"] == (64, 2048) and two["word_embed.weight"] == (2048, 32)
    assert two["cfg_uncond"] == (512, 2048) and two["lvl_embed.weight"] == (15, 2048)
    eight = Infinity.expected_shapes(InfinityConfig.official("8b"))
    assert eight["block_chunks.7.module.4.ffn.fc1.weight"] == (14336, 3584)
    assert eight["text_proj_for_sos.ca.mat_q"] == (1, 16, 224) and eight["head.weight"] == (112, 3584)


def test_official_2b_with_random_values_loads_and_samples_two_scales():
    """The full 2B key set with random values: every tensor is a view of one random buffer (the largest tensor's
    size, 100 MB), so 2.2 B parameters cost no memory; strict load, then scales 0 and 1 of the 1:1 template."""
    cfg = InfinityConfig.official("2b")
    shapes = Infinity.expected_shapes(cfg)
    pool = torch.randn(max(math.prod(s) for s in shapes.values()), generator=torch.Generator().manual_seed(0)) * 0.02
    sd = {k: pool[: math.prod(s)].view(s) for k, s in shapes.items() if not k.endswith("zero_k_bias")}
    model = Infinity.from_state_dict(sd, path="infinity_2b_reg.pth")
    assert model.config == cfg
    sched = InfinitySchedule.from_template(1.0, "1M")
    ctx = model.condition(torch.randn(1, 5, 2048), torch.ones(1, 5, dtype=torch.bool), guided=True)
    cache = KVCache(model.depth, sched.num_tokens)
    logits0 = model.forward_scale(0, model.first_token_map(ctx), ctx, cache, sched)
    logits1 = model.forward_scale(1, model.scale_input(1, torch.randn(1, 4, 32)).repeat(2, 1, 1), ctx, cache, sched)
    cache.free()
    assert logits0.shape == (2, 1, 64) and logits1.shape == (2, 4, 64)
    assert torch.isfinite(logits0).all() and torch.isfinite(logits1).all()


def test_bad_files_give_clear_errors(tmp_path):
    sd = tiny_model().state_dict()
    missing = {k: v for k, v in sd.items() if k != "head_nm.ada_lin.1.bias"}
    with pytest.raises(NextScaleError, match=r"missing key.*head_nm.ada_lin.1.bias"):
        Infinity.from_state_dict(missing)
    bad = dict(sd, **{"block_chunks.0.module.1.ffn.fc2.weight": torch.zeros(64, 100)})
    with pytest.raises(NextScaleError, match=r"wrong shape.*ffn.fc2.weight"):
        Infinity.from_state_dict(bad)
    with pytest.raises(NextScaleError, match="bitwise head"):
        Infinity.from_state_dict(dict(sd, **{"head.weight": torch.zeros(4096, 64), "head.bias": torch.zeros(4096)}))
    with pytest.raises(NextScaleError, match="no transformer blocks"):
        Infinity.from_state_dict({k: v for k, v in sd.items() if not k.startswith("block_chunks")})
    from test_sampler import make_var  # a VAR generator handed to the Infinity loader

    path = tmp_path / "var.safetensors"
    make_var().save(str(path))
    with pytest.raises(NextScaleError, match="VAR generator"):
        Infinity.from_file(str(path))
