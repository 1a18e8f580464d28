"""VAR tokenizer: the official key layout, strict loading, config inference, image <-> tokens round trips."""

import json
from collections import Counter

import pytest
import torch
from nextscale.models.core.autoencoder import AttnBlock
from nextscale.models.core.checkpoint import save_safetensors
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.schedule import SCHEDULE_256, SCHEDULE_512
from nextscale.models.var.tokenizer import KIT, MultiScaleVQVAE, TokenizerConfig

# A sample of the official vae_ch160v4096z32.pth keys and shapes, written out by hand.
OFFICIAL_SAMPLE = {
    "encoder.conv_in.weight": (160, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (160,),
    "encoder.down.1.block.1.conv2.weight": (160, 160, 3, 3),
    "encoder.down.1.downsample.conv.weight": (160, 160, 3, 3),
    "encoder.down.2.block.0.conv1.weight": (320, 160, 3, 3),
    "encoder.down.2.block.0.norm2.bias": (320,),
    "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
    "encoder.down.3.downsample.conv.bias": (320,),
    "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
    "encoder.down.4.block.1.conv2.weight": (640, 640, 3, 3),
    "encoder.down.4.attn.0.qkv.weight": (1920, 640, 1, 1),
    "encoder.down.4.attn.1.qkv.bias": (1920,),
    "encoder.down.4.attn.1.proj_out.weight": (640, 640, 1, 1),
    "encoder.mid.block_2.conv1.weight": (640, 640, 3, 3),
    "encoder.mid.attn_1.norm.weight": (640,),
    "encoder.mid.attn_1.qkv.weight": (1920, 640, 1, 1),
    "encoder.norm_out.bias": (640,),
    "encoder.conv_out.weight": (32, 640, 3, 3),
    "decoder.conv_in.weight": (640, 32, 3, 3),
    "decoder.mid.attn_1.proj_out.bias": (640,),
    "decoder.up.0.block.2.conv1.weight": (160, 160, 3, 3),
    "decoder.up.1.block.0.norm1.weight": (320,),
    "decoder.up.1.block.0.conv1.weight": (160, 320, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
    "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
    "decoder.up.2.block.1.conv2.weight": (320, 320, 3, 3),
    "decoder.up.3.block.0.conv1.weight": (320, 640, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.bias": (320,),
    "decoder.up.3.upsample.conv.weight": (320, 320, 3, 3),
    "decoder.up.4.block.2.norm2.weight": (640,),
    "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1),
    "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
    "decoder.norm_out.weight": (160,),
    "decoder.conv_out.weight": (3, 160, 3, 3),
    "decoder.conv_out.bias": (3,),
    "quantize.ema_vocab_hit_SV": (10, 4096),
    "quantize.quant_resi.qresi_ls.0.weight": (32, 32, 3, 3),
    "quantize.quant_resi.qresi_ls.3.bias": (32,),
    "quantize.embedding.weight": (4096, 32),
    "quant_conv.weight": (32, 32, 3, 3),
    "post_quant_conv.bias": (32,),
}
ABSENT = [
    "encoder.down.0.block.0.nin_shortcut.weight",
    "encoder.down.4.downsample.conv.weight",
    "decoder.up.0.upsample.conv.weight",
    "encoder.down.3.attn.0.qkv.weight",
    "decoder.up.3.attn.0.qkv.weight",
    "quantize.embedding.bias",
    "encoder.down.4.block.2.conv1.weight",
]

SMALL = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)  # downsample 4
PATH = "/models/nextscale/vae_test.pth"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: one thread avoids inter-thread overhead on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def official_shapes():
    return MultiScaleVQVAE.expected_shapes(TokenizerConfig())


def meta_state_dict(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def small_model(config=SMALL, seed=0) -> MultiScaleVQVAE:
    torch.manual_seed(seed)
    model = MultiScaleVQVAE(config)
    with torch.no_grad():  # codes at the scale of the latents, so that many codes are used
        model.quantize.embedding.weight.normal_(0, 0.3)
    return model.eval().requires_grad_(False)


def images(B, H, W=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W or H, generator=g) * 2 - 1


# -- the official layout -----------------------------------------------------------------------------


def test_official_key_table(official_shapes):
    assert len(official_shapes) == 324
    assert Counter(k.split(".")[0] for k in official_shapes) == {
        "encoder": 132,
        "decoder": 178,
        "quantize": 10,
        "quant_conv": 2,
        "post_quant_conv": 2,
    }
    for key, shape in OFFICIAL_SAMPLE.items():
        assert official_shapes[key] == shape, key
    assert not set(ABSENT) & set(official_shapes)
    params = sum(torch.Size(s).numel() for k, s in official_shapes.items() if k != "quantize.ema_vocab_hit_SV")
    assert params == 108_948_355  # the official tokenizer's parameter count
    assert params + 10 * 4096 == 108_989_315
    assert TokenizerConfig().downsample == 16 and TokenizerConfig().image_size == 256


def test_official_model_state_dict_has_the_table(official_shapes):
    with torch.device("meta"):
        model = MultiScaleVQVAE()
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == official_shapes
    groups = [k.split(".")[0] for k in sd]  # state-dict order: encoder, decoder, quantiser, quant_conv, post_quant_conv
    assert [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g] == [
        "encoder",
        "decoder",
        "quantize",
        "quant_conv",
        "post_quant_conv",
    ]


def test_official_layout_loads_strictly(official_shapes):
    model = MultiScaleVQVAE.from_state_dict(meta_state_dict(official_shapes), PATH)
    assert model.config == TokenizerConfig() and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.downsample == 16 and model.patch_nums == SCHEDULE_256
    # the usage buffer is optional, and replaced when it was recorded for another number of scales
    for ema in (None, torch.empty(14, 4096, device="meta")):
        sd = meta_state_dict(official_shapes)
        sd.pop("quantize.ema_vocab_hit_SV") if ema is None else sd.update({"quantize.ema_vocab_hit_SV": ema})
        assert MultiScaleVQVAE.from_state_dict(sd, PATH, patch_nums=SCHEDULE_512).quantize.ema_vocab_hit_SV.shape == (
            10,
            4096,
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.pop("decoder.up.4.attn.2.qkv.weight"), ["missing", "decoder.up.4.attn.2.qkv.weight"]),
        (
            lambda sd: sd.update({"decoder.up.4.attn.3.qkv.weight": torch.empty(1920, 640, 1, 1)}),
            ["unexpected", "decoder.up.4.attn.3.qkv.weight"],
        ),
        (
            lambda sd: sd.update({"decoder.mid.block_1.conv2.weight": torch.empty(640, 640, 1, 1)}),
            ["decoder.mid.block_1.conv2.weight", "[640, 640, 3, 3]"],
        ),
        (
            lambda sd: sd.update({"quantize.ema_vocab_hit_SV": torch.empty(10, 512)}),
            ["quantize.ema_vocab_hit_SV", "[10, 4096]"],
        ),
        (lambda sd: sd.pop("encoder.conv_in.weight"), ["encoder.conv_in.weight", "not a VAR multi-scale VQ-VAE"]),
        (
            lambda sd: sd.update({"encoder.down.2.block.0.conv1.weight": torch.empty(321, 160, 3, 3)}),
            ["encoder.down.2.block.0.conv1.weight"],
        ),
    ],
    ids=["missing", "extra", "misshaped", "ema-vocab", "missing-inferred", "misshaped-inferred"],
)
def test_layout_errors_name_the_file_and_key(official_shapes, change, message):
    sd = meta_state_dict(official_shapes)
    change(sd)
    with pytest.raises(NextScaleError) as e:
        MultiScaleVQVAE.from_state_dict(sd, PATH)
    for part in [PATH, *message]:
        assert part in str(e.value)


def test_a_transformer_checkpoint_is_recognised():
    with pytest.raises(NextScaleError, match="generator"):
        MultiScaleVQVAE.infer_config(
            {"class_emb.weight": torch.empty(1001, 1024), "head.weight": torch.empty(4096, 1024)}, PATH
        )


# -- configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        TokenizerConfig(
            vocab_size=100,
            z_channels=4,
            ch=64,
            ch_mult=(1, 1, 2, 4),
            num_res_blocks=3,
            share_quant_resi=1,
            in_channels=1,
        ),
        TokenizerConfig(
            vocab_size=32,
            z_channels=16,
            ch=32,
            ch_mult=(2, 1),
            share_quant_resi=0,
            default_qresi_counts=6,
            using_sa=False,
        ),
        TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), share_quant_resi=3, using_mid_sa=False),
        TokenizerConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), quant_resi=0.0),
    ],
    ids=["small", "share1-gray", "nonshared-no-sa", "share3-no-mid-sa", "no-phi"],
)
def test_infer_config_recovers_small_configs(config):
    with torch.device("meta"):
        sd = MultiScaleVQVAE(config).state_dict()
    assert MultiScaleVQVAE.infer_config(sd, PATH) == config
    assert TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_validation():
    with pytest.raises(NextScaleError, match="multiple of 32"):
        TokenizerConfig(ch=48)
    with pytest.raises(NextScaleError, match="unknown"):
        TokenizerConfig.from_dict({"vocab_size": 16, "depth": 3})
    with pytest.raises(NextScaleError):
        TokenizerConfig(patch_nums=(1, 3, 2))


def test_small_state_dict_loads_bitwise_and_files_round_trip(tmp_path):
    config = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, quant_resi=0.25)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in MultiScaleVQVAE(config).state_dict().items()}
    model = MultiScaleVQVAE.from_state_dict(sd, PATH, config=config)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # safetensors with the config in its metadata: the non-default Phi ratio survives
    model.save(str(tmp_path / "tok.safetensors"))
    assert MultiScaleVQVAE.config_from_file(str(tmp_path / "tok.safetensors")) == config
    again = MultiScaleVQVAE.from_file(str(tmp_path / "tok.safetensors"))
    assert again.config == config and all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())
    # a plain .pth, nested like a training checkpoint: the config is inferred (Phi ratio assumed 0.5)
    torch.save({"vae": sd, "epoch": 3}, tmp_path / "tok.pth")
    assert MultiScaleVQVAE.config_from_file(str(tmp_path / "tok.pth")) is None
    assert MultiScaleVQVAE.from_file(str(tmp_path / "tok.pth"), patch_nums=(1, 2, 4, 8)).config == TokenizerConfig(
        **{**config.to_dict(), "quant_resi": 0.5, "patch_nums": (1, 2, 4, 8)}
    )
    save_safetensors(sd, str(tmp_path / "bad.safetensors"), {"nextscale_config": "{not json"})
    with pytest.raises(NextScaleError, match=r"bad.safetensors"):
        MultiScaleVQVAE.from_file(str(tmp_path / "bad.safetensors"))


# -- images <-> tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_nums", [SCHEDULE_256, SCHEDULE_512], ids=["256-style", "512-style"])
def test_round_trip(patch_nums):
    model = small_model(TokenizerConfig(**{**SMALL.to_dict(), "patch_nums": patch_nums}))
    side = patch_nums[-1] * model.downsample  # 64 px (latent 16) or 128 px (latent 32)
    img = images(2, side)
    indices = model.img_to_indices(img)
    assert [tuple(i.shape) for i in indices] == [(2, pn * pn) for pn in patch_nums]
    assert indices[-1].unique().numel() > 8  # a real encoding, not one code everywhere
    _, f_hat = model.quantize.f_to_indices_and_fhat(model.encode_latent(img), patch_nums)
    assert torch.equal(model.indices_to_fhat(indices), f_hat)
    rec = model.indices_to_img(indices)
    assert rec.shape == img.shape and rec.abs().max() <= 1
    assert torch.equal(rec, model.fhat_to_img(f_hat))
    # deterministic: a second run is bitwise identical
    again = model.img_to_indices(img)
    assert all(torch.equal(a, b) for a, b in zip(indices, again)) and torch.equal(model.indices_to_img(again), rec)
    # partial images for previews
    assert torch.equal(model.indices_to_img(indices, upto=3), model.fhat_to_img(model.indices_to_fhat(indices[:3])))


def test_any_multiple_of_the_downsampling_works():
    model = small_model()
    f = model.encode_latent(images(1, 36, 20))  # non-square, 9x5 cells
    assert f.shape == (1, 8, 9, 5)
    assert model.fhat_to_img(f).shape == (1, 3, 36, 20)
    with pytest.raises(NextScaleError, match="multiple"):
        model.encode_latent(images(1, 34, 20))
    with pytest.raises(NextScaleError, match="64x64"):
        model.img_to_indices(images(1, 64, 60))
    with pytest.raises(NextScaleError, match="64x64"):
        model.img_to_indices(images(1, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_runs_channels_last(dtype):
    """On CPU ``fhat_to_img`` feeds the decoder a channels-last input (oneDNN's fast layout) and returns a
    contiguous image equal to the plain contiguous decode up to float rounding."""
    model = small_model().to(dtype)
    f_hat = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    seen = []
    hook = model.post_quant_conv.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        got = model.fhat_to_img(f_hat)
        hook.remove()
        plain = model.decoder(model.post_quant_conv(f_hat.contiguous())).clamp(-1, 1)
    assert seen == [True] and got.is_contiguous() and got.dtype == dtype
    diff = (got.float() - plain.float()).abs()
    if dtype == torch.float32:
        assert diff.max() < 1e-5, diff.max()
    else:  # a few bf16 steps (1/128 near 1) at most, far less on average
        assert diff.max() < 0.07 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_attention_is_single_head_over_q_k_v_channel_blocks():
    torch.manual_seed(0)
    attn = AttnBlock(KIT, 64).eval()
    x = torch.randn(2, 64, 5, 3)
    with torch.no_grad():
        qkv = attn.qkv(attn.norm(x)).flatten(2)  # (B, 3C, HW)
        q, k, v = qkv[:, :64], qkv[:, 64:128], qkv[:, 128:]
        w = torch.softmax(q.transpose(1, 2) @ k / 8.0, dim=-1)  # (B, HW_q, HW_k), scale C**-0.5
        expected = x + attn.proj_out((v @ w.transpose(1, 2)).view(2, 64, 5, 3))
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_encoder_and_decoder_resolutions():
    model = small_model()
    x = images(1, 16)
    h = model.encoder.conv_in(x)
    for i, level in enumerate(model.encoder.down[:-1]):
        h = level.downsample(level(h))
        assert h.shape[-1] == 16 // 2 ** (i + 1)  # pad (0, 1, 0, 1) + stride-2 conv halves exactly
    assert model.encoder.down[-1].attn and not model.encoder.down[0].attn
    assert model.decoder.up[-1].attn and not hasattr(model.decoder.up[0], "upsample")
