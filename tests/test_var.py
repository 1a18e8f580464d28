"""VAR transformer: official key layout and shapes, config inference, strict loading, saving."""

import math

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.schedule import SCHEDULE_256, SCHEDULE_512
from nextscale.models.var.model import VAR, VARConfig

BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
TINY = VARConfig(depth=2, embed_dim=64, num_heads=4, num_classes=5, vocab_size=48, cvae=8, patch_nums=(1, 2, 3, 4))
TINY_SHARED = VARConfig(
    depth=3, embed_dim=64, num_heads=2, num_classes=3, vocab_size=32, cvae=4, patch_nums=(1, 2, 4), shared_aln=True
)


def _meta_state_dict(config):
    return {k: torch.empty(s, device="meta") for k, s in VAR.expected_shapes(config).items()}


def _num_params(shapes):
    return sum(math.prod(s) for k, s in shapes.items() if not k.endswith(BUFFERS))


def test_official_configs():
    d16, d36 = VARConfig.official(16), VARConfig.official(36)
    assert (d16.depth, d16.embed_dim, d16.num_heads, d16.hidden_dim, d16.shared_aln) == (16, 1024, 16, 4096, False)
    assert (
        d16.patch_nums == SCHEDULE_256 and d16.num_tokens == 680 and d16.num_classes == 1000 and d16.vocab_size == 4096
    )
    assert (d36.embed_dim, d36.num_heads, d36.shared_aln, d36.patch_nums, d36.num_tokens) == (
        2304,
        36,
        True,
        SCHEDULE_512,
        2240,
    )
    assert VARConfig.from_dict(d36.to_dict()) == d36


def test_d16_keys_and_shapes():
    shapes = VAR.expected_shapes(VARConfig.official(16))
    assert len(shapes) == 220
    assert list(shapes)[:8] == [
        "pos_start",
        "pos_1LC",
        "lvl_1L",
        "attn_bias_for_masking",
        "word_embed.weight",
        "word_embed.bias",
        "class_emb.weight",
        "lvl_embed.weight",
    ]
    assert list(shapes)[-4:] == ["head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias"]
    expected = {
        "pos_start": (1, 1, 1024),
        "pos_1LC": (1, 680, 1024),
        "lvl_1L": (1, 680),
        "attn_bias_for_masking": (1, 1, 680, 680),
        "word_embed.weight": (1024, 32),
        "word_embed.bias": (1024,),
        "class_emb.weight": (1001, 1024),
        "lvl_embed.weight": (10, 1024),
        "head_nm.ada_lin.1.weight": (2048, 1024),
        "head_nm.ada_lin.1.bias": (2048,),
        "head.weight": (4096, 1024),
        "head.bias": (4096,),
    }
    per_block = {
        "attn.scale_mul_1H11": (1, 16, 1, 1),
        "attn.q_bias": (1024,),
        "attn.v_bias": (1024,),
        "attn.zero_k_bias": (1024,),
        "attn.mat_qkv.weight": (3072, 1024),
        "attn.proj.weight": (1024, 1024),
        "attn.proj.bias": (1024,),
        "ffn.fc1.weight": (4096, 1024),
        "ffn.fc1.bias": (4096,),
        "ffn.fc2.weight": (1024, 4096),
        "ffn.fc2.bias": (1024,),
        "ada_lin.1.weight": (6144, 1024),
        "ada_lin.1.bias": (6144,),
    }
    for i in (0, 7, 15):
        expected.update({f"blocks.{i}.{k}": s for k, s in per_block.items()})
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "blocks.0.attn.mat_qkv.bias" not in shapes and "blocks.16.ffn.fc1.weight" not in shapes
    assert [k[len("blocks.3.") :] for k in shapes if k.startswith("blocks.3.")] == list(
        per_block
    )  # 13 keys, upstream order


def test_param_count_formula():
    for depth, exact in ((16, 310_283_520), (30, 2_010_020_356)):
        cfg = VARConfig.official(depth)
        C, H, L, K = cfg.embed_dim, cfg.num_heads, cfg.num_tokens, cfg.num_scales
        formula = depth * (18 * C * C + 14 * C + H) + C * (L + K + 5131) + 2 * C * C + 2 * C + 4096
        assert _num_params(VAR.expected_shapes(cfg)) == formula == exact
    cfg = VARConfig.official(36)
    C, H, L, K = cfg.embed_dim, cfg.num_heads, cfg.num_tokens, cfg.num_scales
    formula = 36 * (12 * C * C + 14 * C + H) + 6 * C * C + 6 * C + C * (L + K + 5131) + 2 * C * C + 2 * C + 4096
    assert _num_params(VAR.expected_shapes(cfg)) == formula == 2_353_893_904


def test_other_depths_and_d36_layout():
    assert len(VAR.expected_shapes(VARConfig.official(20))) == 272
    assert len(VAR.expected_shapes(VARConfig.official(24))) == 324
    d30 = VAR.expected_shapes(VARConfig.official(30))
    assert len(d30) == 402 and d30["blocks.29.ada_lin.1.weight"] == (11520, 1920) and d30["pos_1LC"] == (1, 680, 1920)
    d36 = VAR.expected_shapes(VARConfig.official(36))
    assert len(d36) == 446 == 12 * 36 + 14
    assert not any(".ada_lin." in k for k in d36 if k.startswith("blocks."))
    assert d36["blocks.35.ada_gss"] == (1, 1, 6, 2304) and d36["blocks.0.attn.scale_mul_1H11"] == (1, 36, 1, 1)
    assert d36["shared_ada_lin.1.weight"] == (13824, 2304) and d36["shared_ada_lin.1.bias"] == (13824,)
    assert d36["head_nm.ada_lin.1.weight"] == (4608, 2304) and d36["pos_1LC"] == (1, 2240, 2304)
    assert d36["attn_bias_for_masking"] == (1, 1, 2240, 2240) and d36["blocks.0.attn.mat_qkv.weight"] == (6912, 2304)
    keys = list(d36)
    assert keys.index("shared_ada_lin.1.weight") == keys.index("lvl_embed.weight") + 1
    assert keys[keys.index("shared_ada_lin.1.bias") + 1] == "blocks.0.ada_gss"  # a block's first key


@pytest.mark.parametrize("depth", [16, 20, 24, 30, 36])
def test_infer_config_of_official_layouts(depth):
    sd = _meta_state_dict(VARConfig.official(depth))
    assert VAR.infer_config(sd, "var.pth") == VARConfig.official(depth)
    del sd["lvl_1L"]  # schedule from (L, K) alone
    assert VAR.infer_config(sd, "var.pth") == VARConfig.official(depth)
    model = VAR.from_state_dict(sd, "var.pth")  # the strict load of the official key set, on the meta device
    assert model.config == VARConfig.official(depth) and model.lvl_1L.is_meta
    sd["head.bias"] = torch.empty(4095, device="meta")
    with pytest.raises(NextScaleError, match=r"'var.pth'.*head\.bias is \[4095\], expected \[4096\]"):
        VAR.from_state_dict(sd, "var.pth")


def test_infer_config_reads_schedule_from_levels():
    cfg = VARConfig(depth=2, embed_dim=64, num_heads=4, num_classes=5, vocab_size=48, cvae=8, patch_nums=(1, 3, 4, 7))
    sd = VAR(cfg).state_dict()
    assert VAR.infer_config(sd) == cfg
    del sd["lvl_1L"]
    with pytest.raises(NextScaleError, match=r"'my.pth'.*no known schedule has 75 tokens over 4 scales"):
        VAR.infer_config(sd, "my.pth")


@pytest.mark.parametrize("config", [TINY, TINY_SHARED], ids=["adaln", "shared_aln"])
def test_strict_round_trip(config):
    var = VAR(config)
    sd = var.state_dict()
    loaded = VAR.from_state_dict(sd, "tiny.safetensors")
    assert loaded.config == config and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # rebuildable buffers may be missing; they are rebuilt identically
    slim = {k: v for k, v in sd.items() if not k.endswith(BUFFERS)}
    assert len(slim) == len(sd) - 2 - config.depth
    rebuilt = VAR.from_state_dict(slim, "slim.pth", config)  # a custom schedule needs lvl_1L or a config
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert rebuilt.lvl_1L.dtype == torch.long and rebuilt.attn_bias_for_masking.isinf().any()


def test_load_errors_name_file_and_key():
    sd = VAR(TINY).state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.bias"}
    with pytest.raises(NextScaleError, match=r"'gen.pth'.*1 missing key\(s\): blocks\.1\.ffn\.fc2\.bias"):
        VAR.from_state_dict(missing, "gen.pth")
    extra = {**sd, "blocks.0.attn.mat_qkv.bias": torch.zeros(192)}
    with pytest.raises(NextScaleError, match=r"'gen.pth'.*unexpected key\(s\): blocks\.0\.attn\.mat_qkv\.bias"):
        VAR.from_state_dict(extra, "gen.pth")
    wrong = {**sd, "blocks.0.attn.proj.weight": torch.zeros(64, 32)}
    with pytest.raises(
        NextScaleError, match=r"'gen.pth'.*blocks\.0\.attn\.proj\.weight is \[64, 32\], expected \[64, 64\]"
    ):
        VAR.from_state_dict(wrong, "gen.pth")
    bad_buffer = {**sd, "attn_bias_for_masking": torch.zeros(1, 1, 5, 5)}
    with pytest.raises(NextScaleError, match="attn_bias_for_masking is"):
        VAR.from_state_dict(bad_buffer, "gen.pth")
    no_class = {k: v for k, v in sd.items() if k != "class_emb.weight"}
    with pytest.raises(NextScaleError, match=r"'gen.pth' has no key 'class_emb.weight'"):
        VAR.from_state_dict(no_class, "gen.pth")
    with pytest.raises(NextScaleError, match="tokenizer"):
        VAR.infer_config({"quantize.embedding.weight": torch.zeros(4, 2)}, "vae.pth")
    levels = {**sd, "lvl_1L": torch.zeros(1, 1, dtype=torch.long)}
    with pytest.raises(NextScaleError, match=r"'gen.pth'.*'lvl_1L' describes 1 scales"):
        VAR.from_state_dict(levels, "gen.pth")


def test_config_validation():
    with pytest.raises(NextScaleError, match="not divisible"):
        VARConfig(depth=2, embed_dim=64, num_heads=5)
    with pytest.raises(NextScaleError, match="2 class names for 3 classes"):
        VARConfig(depth=2, embed_dim=64, num_heads=4, num_classes=3, class_names=("a", "b"))
    with pytest.raises(NextScaleError, match="unknown field"):
        VARConfig.from_dict({**TINY.to_dict(), "width": 3})
    with pytest.raises(NextScaleError, match="starts with a 1x1"):
        VARConfig(depth=2, embed_dim=64, num_heads=4, patch_nums=(2, 4))


def test_save_and_load_file_with_class_names(tmp_path):
    cfg = VARConfig(**{**TINY.to_dict(), "class_names": ["a", "b", "c", "d", "e"], "patch_nums": (1, 3, 5)})
    var = VAR(cfg)
    path = str(tmp_path / "gen.safetensors")
    var.save(path)
    loaded = VAR.from_file(path)
    assert loaded.config == cfg and loaded.class_names == ["a", "b", "c", "d", "e"] and loaded.patch_nums == (1, 3, 5)
    assert VAR.config_from_file(path) == cfg
    pth = str(tmp_path / "gen.pth")
    torch.save(var.state_dict(), pth)
    assert VAR.config_from_file(pth) is None
    official_like = VAR.from_file(pth)  # inferred from the keys (lvl_1L gives the custom schedule); no names
    assert official_like.class_names is None and official_like.patch_nums == (1, 3, 5)
    for k, v in official_like.state_dict().items():
        assert torch.equal(v, var.state_dict()[k])


def test_meta_construction_is_cheap_and_complete():
    with torch.device("meta"):
        var = VAR(VARConfig.official(16))
    assert sum(p.numel() for p in var.parameters()) == 310_283_520
    assert var.num_classes == 1000 and var.class_names is None and var.patch_nums == SCHEDULE_256


def test_forward_teacher_shapes_and_determinism():
    torch.manual_seed(0)
    var = VAR(TINY)
    x_BLCv = torch.randn(3, TINY.num_tokens - 1, TINY.cvae)
    labels = torch.tensor([0, 4, 5])  # 5 = null class
    logits = var.forward_teacher(labels, x_BLCv)
    assert logits.shape == (3, TINY.num_tokens, TINY.vocab_size) and logits.dtype == torch.float32
    assert torch.equal(logits, var(labels, x_BLCv))  # no label dropout
    prefix = var.forward_teacher(labels, x_BLCv[:, :4])  # scales 0-1 only: the block-causal mask hides the rest
    torch.testing.assert_close(prefix, logits[:, :5], rtol=1e-5, atol=1e-5)
    with pytest.raises(NextScaleError, match="teacher forcing"):
        var.forward_teacher(labels, torch.randn(3, TINY.num_tokens, TINY.cvae))


def test_per_head_scale_is_capped():
    torch.manual_seed(1)
    var = VAR(TINY)
    x = torch.randn(2, TINY.num_tokens - 1, TINY.cvae)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        var.blocks[0].attn.scale_mul_1H11[0, 1] = math.log(100.0)
        capped = var.forward_teacher(labels, x)
        var.blocks[0].attn.scale_mul_1H11[0, 1] = math.log(1000.0)
        assert torch.equal(var.forward_teacher(labels, x), capped)


def test_bfloat16_weights_give_fp32_logits():
    var = VAR(TINY).to(torch.bfloat16)
    logits = var.forward_teacher(torch.tensor([1]), torch.randn(1, TINY.num_tokens - 1, TINY.cvae))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bfloat16_weights_run_in_mixed_precision():
    """bf16 weights: the blocks hand on an fp32 residual stream, and the logits stay within bf16 rounding of the
    fp32 model's (about what rounding the weights alone costs)."""
    from test_sampler import randomize_

    cfg = VARConfig(depth=4, embed_dim=64, num_heads=4, num_classes=5, vocab_size=48, cvae=8, patch_nums=(1, 2, 3, 4))
    full = randomize_(VAR(cfg), seed=3)
    half = randomize_(VAR(cfg), seed=3).to(torch.bfloat16)
    labels, x = torch.tensor([1, 4]), torch.randn(2, cfg.num_tokens - 1, cfg.cvae,
                                                  generator=torch.Generator().manual_seed(0))
    block_out = half.blocks[0](torch.randn(2, 3, 64), half.condition(labels).ada_B16C[0])
    assert block_out.dtype == torch.float32
    ref, got = full.forward_teacher(labels, x), half.forward_teacher(labels, x)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.01, rel
    # the same weights, rounded to bf16 but computed in fp32, give what the bf16 model gives up to matmul rounding:
    rounded = randomize_(VAR(cfg), seed=3).to(torch.bfloat16).float()
    assert ((got - rounded.forward_teacher(labels, x)).norm() / ref.norm()).item() < rel
