"""Infinity BSQ tokenizer: the official key layout (native and flat), strict loading, config inference, and the
multi-scale bit quantisation checked against a plain re-implementation of upstream's BSQ loop."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from nextscale.models.core.errors import NextScaleError
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer

TINY = BSQConfig(codebook_dim=4, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)  # downsample 2
D32 = BSQConfig(32)  # infinity_vae_d32reg / infinity_vae_d32
F8_D14 = BSQConfig(14, ch_mult=(1, 2, 4, 4))  # infinity_vae_d56_f8_14_patchify
PATH = "/models/nextscale/infinity_vae_test.pth"

# A sample of the d32 layout, written out by hand from upstream's flux_vqgan.py (base_ch 128, ch_mult (1,2,4,4,4)).
D32_SAMPLE = {
    "encoder.conv_in.conv.weight": (128, 3, 3, 3),
    "encoder.conv_in.conv.bias": (128,),
    "encoder.down.0.block.0.norm1.norm.weight": (128,),
    "encoder.down.0.block.1.conv2.conv.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.conv.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.conv.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.conv.bias": (512,),
    "encoder.down.3.downsample.conv.conv.bias": (512,),
    "encoder.down.4.block.1.norm2.norm.bias": (512,),
    "encoder.mid.block_2.conv1.conv.weight": (512, 512, 3, 3),
    "encoder.norm_out.norm.weight": (512,),
    "encoder.conv_out.conv.weight": (32, 512, 3, 3),
    "decoder.conv_in.conv.weight": (512, 32, 3, 3),
    "decoder.mid.block_1.norm1.norm.weight": (512,),
    "decoder.up.4.block.2.conv2.conv.weight": (512, 512, 3, 3),
    "decoder.up.4.upsample.conv.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.conv1.conv.weight": (256, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.conv.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.conv.bias": (256,),
    "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.norm2.norm.weight": (128,),
    "decoder.norm_out.norm.bias": (128,),
    "decoder.conv_out.conv.weight": (3, 128, 3, 3),
    "quantizer.lfq.mask": (32,),
}
D32_ABSENT = [
    "encoder.down.4.downsample.conv.conv.weight",
    "decoder.up.0.upsample.conv.conv.weight",
    "encoder.down.0.block.0.nin_shortcut.conv.weight",
    "encoder.down.3.block.0.nin_shortcut.conv.weight",
    "decoder.up.3.block.0.nin_shortcut.conv.weight",
    "encoder.mid.attn_1.q.conv.weight",
    "encoder.down.0.block.2.conv1.conv.weight",
    "decoder.up.0.block.3.conv1.conv.weight",
    "encoder.conv_in.weight",
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: one thread avoids inter-thread overhead on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def flat(key: str) -> str:
    """The flux/LDM name of a native key, written plainly: drop the wrapper component before weight/bias."""
    if key.endswith("lfq.mask"):
        return key
    head, wrapper, leaf = key.rsplit(".", 2)
    assert wrapper in ("conv", "norm"), key
    return f"{head}.{leaf}"


def meta_state_dict(shapes, layout="native"):
    out = {}
    for k, s in shapes.items():
        t = torch.empty(s, dtype=torch.int64 if k.endswith("lfq.mask") else torch.float32, device="meta")
        out[flat(k) if layout == "flat" else k] = t
    return out


def tiny_model(seed=0) -> BSQTokenizer:
    torch.manual_seed(seed)
    return BSQTokenizer(TINY).eval().requires_grad_(False)


def images(B, H, W=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, W or H, generator=g) * 2 - 1


# -- the official layout -----------------------------------------------------------------------------


def test_d32_key_table():
    shapes = BSQTokenizer.expected_shapes(D32)
    # encoder: conv_in 2 + 10 blocks * 8 + 2 shortcuts * 2 + 4 downsamples * 2 + mid 16 + norm_out 2 + conv_out 2
    # decoder: conv_in 2 + mid 16 + 15 blocks * 8 + 2 shortcuts * 2 + 4 upsamples * 2 + norm_out 2 + conv_out 2; mask
    assert len(shapes) == 114 + 154 + 1
    for key, shape in D32_SAMPLE.items():
        assert shapes[key] == shape, key
    assert not set(D32_ABSENT) & set(shapes)
    assert all(k.split(".")[-2] in ("conv", "norm") for k in shapes if k != "quantizer.lfq.mask")
    assert D32.downsample == 16 and F8_D14.downsample == 8


def test_d32_loads_in_both_layouts_on_meta():
    shapes = BSQTokenizer.expected_shapes(D32)
    for layout in ("native", "flat"):
        model = BSQTokenizer.from_state_dict(meta_state_dict(shapes, layout), PATH)
        assert model.config == D32 and not model.training
        assert model.codebook_dim == 32 and model.downsample == 16
        assert not any(p.requires_grad for p in model.parameters())
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    sd = meta_state_dict(shapes)
    del sd["quantizer.lfq.mask"]  # optional, rebuilt
    sd["quantize.lfq.mask"] = torch.empty(32, dtype=torch.int64, device="meta")  # upstream's second name for it
    assert BSQTokenizer.from_state_dict(sd, PATH).quantizer.lfq.mask.shape == (32,)


def test_d32_with_random_values_loads_from_a_nested_pth_and_decodes(tmp_path):
    """The published d32 key set in the flat layout with random values (110 M parameters, fp16 on disk like a
    download), nested under ['vae'] with the mask buffer: strict load, then 16x16 summed codes decode to 256 px."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in BSQTokenizer.expected_shapes(D32).items():
        if k.endswith("lfq.mask"):
            sd[k] = 2 ** torch.arange(31, -1, -1)
        else:
            sd[flat(k)] = (torch.randn(s, generator=g) * 0.02).half()
    path = tmp_path / "infinity_vae_d32reg.pth"
    torch.save({"vae": sd}, path)
    model = BSQTokenizer.from_file(str(path))
    assert model.config == D32 and model.downsample == 16
    bits = [torch.rand(1, n, n, 32, generator=g) > 0.5 for n in (1, 2, 4, 8, 16)]
    image = model.decode(model.bits_to_summed_codes(bits))
    assert image.shape == (1, 3, 256, 256) and torch.isfinite(image).all()



@pytest.mark.parametrize(
    "config",
    [
        F8_D14,
        BSQConfig(16),
        BSQConfig(24),
        BSQConfig(64),
        TINY,
        BSQConfig(8, base_ch=48, ch_mult=(1, 2, 3), num_res_blocks=3),
    ],
    ids=["f8-d14", "d16", "d24", "d64", "tiny", "odd"],
)
def test_config_is_inferred_from_keys(config):
    for layout in ("native", "flat"):
        sd = meta_state_dict(BSQTokenizer.expected_shapes(config), layout)
        assert BSQTokenizer.infer_config(sd, PATH) == config
    assert BSQConfig.from_dict(config.to_dict()) == config


def test_mask_values():
    assert BSQTokenizer(TINY).quantizer.lfq.mask.tolist() == [8, 4, 2, 1]
    assert BSQTokenizer.expected_shapes(BSQConfig(64))["quantizer.lfq.mask"] == (64,)


# -- strict loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, change, message",
    [
        (
            "native",
            lambda sd: sd.pop("decoder.up.2.block.1.conv2.conv.bias"),
            ["missing", "decoder.up.2.block.1.conv2.conv.bias"],
        ),
        ("flat", lambda sd: sd.pop("decoder.up.2.block.1.conv2.bias"), ["missing", "decoder.up.2.block.1.conv2.bias"]),
        (
            "native",
            lambda sd: sd.update({"decoder.up.1.block.3.norm1.norm.weight": torch.empty(256)}),
            ["unexpected", "decoder.up.1.block.3.norm1.norm.weight"],
        ),
        (
            "native",
            lambda sd: sd.update({"decoder.mid.block_1.conv2.conv.weight": torch.empty(512, 512, 1, 1)}),
            ["decoder.mid.block_1.conv2.conv.weight", "[512, 512, 3, 3]"],
        ),
        (
            "flat",
            lambda sd: sd.update({"decoder.conv_in.weight": torch.empty(512, 16, 3, 3)}),
            ["decoder.conv_in.weight", "[512, 32, 3, 3]"],
        ),
        (
            "native",
            lambda sd: sd.update({"quantizer.lfq.mask": torch.empty(16, dtype=torch.int64)}),
            ["quantizer.lfq.mask", "[32]"],
        ),
        (
            "native",
            lambda sd: sd.update({"quantizer.lfq.mask": torch.arange(32)}),
            ["quantizer.lfq.mask", "powers of two"],
        ),
        (
            "native",
            lambda sd: sd.update({"quantizer.lfq.mask": torch.empty(32)}),
            ["quantizer.lfq.mask", "integers"],
        ),
        (
            "native",
            lambda sd: sd.update({"decoder.conv_out.weight": sd.pop("decoder.conv_out.conv.weight")}),
            ["mixes two key layouts", "decoder.conv_out.weight"],
        ),
        (
            "native",
            lambda sd: sd.pop("encoder.conv_out.conv.weight"),
            ["encoder.conv_out.conv.weight", "not an Infinity"],
        ),
        (
            "native",
            lambda sd: sd.update({"encoder.down.2.block.0.conv1.conv.weight": torch.empty(500, 256, 3, 3)}),
            ["encoder.down.2.block.0.conv1.conv.weight", "base_ch=128"],
        ),
        (
            "native",
            lambda sd: sd.update({"encoder.mid.attn_1.q.conv.weight": torch.empty(512, 512, 1, 1)}),
            ["attention", "encoder.mid.attn_1.q.conv.weight"],
        ),
        (
            "native",
            lambda sd: sd.update({"encoder.down.4.downsample.conv.conv.weight": torch.empty(512, 512, 3, 3)}),
            ["downsamples on encoder levels [0, 1, 2, 3, 4]"],
        ),
        (
            "native",
            lambda sd: sd.update({"quantize.embedding.weight": torch.empty(4096, 32)}),
            ["unexpected", "quantize.embedding.weight"],
        ),
    ],
    ids=[
        "missing",
        "missing-flat",
        "extra",
        "misshaped",
        "misshaped-flat",
        "mask-shape",
        "mask-values",
        "mask-float",
        "mixed",
        "missing-inferred",
        "width",
        "attention",
        "downsample",
        "var-key",
    ],
)
def test_layout_errors_name_the_file_and_key(layout, change, message):
    sd = meta_state_dict(BSQTokenizer.expected_shapes(D32), layout)
    sd["quantizer.lfq.mask"] = 2 ** torch.arange(31, -1, -1)
    change(sd)
    with pytest.raises(NextScaleError) as e:
        BSQTokenizer.from_state_dict(sd, PATH)
    for part in [PATH, *message]:
        assert part in str(e.value)


def test_a_var_tokenizer_is_named():
    with pytest.raises(NextScaleError, match="VAR tokenizer"):
        BSQTokenizer.infer_config(
            {"quantize.embedding.weight": torch.empty(4096, 32), "decoder.conv_in.weight": torch.empty(1)}, PATH
        )


def test_config_validation():
    bad_configs = [
        {"codebook_dim": 0},
        {"codebook_dim": 65},
        {"codebook_dim": 8, "base_ch": 40},
        {"codebook_dim": 8, "ch_mult": ()},
    ]
    for bad in bad_configs:
        with pytest.raises(NextScaleError):
            BSQConfig(**bad)
    with pytest.raises(NextScaleError, match="unknown"):
        BSQConfig.from_dict({"codebook_dim": 8, "patch_size": 16})


# -- round trips -------------------------------------------------------------------------------------


def test_state_dict_round_trip_in_both_layouts():
    model = tiny_model()
    x = images(2, 8, 12)
    h = model.encode_latent(x)
    assert h.shape == (2, 4, 4, 6) and h.dtype == torch.float32
    img = model.decode(h)
    assert img.shape == (2, 3, 8, 12) and img.abs().max() <= 1
    sd = model.state_dict()
    for state in (dict(sd), {flat(k): v.clone() for k, v in sd.items()}):
        loaded = BSQTokenizer.from_state_dict(state, PATH)
        assert loaded.config == TINY
        assert torch.equal(loaded.encode_latent(x), h)
        assert torch.equal(loaded.decode(h), img)


def test_files_round_trip(tmp_path):
    model = tiny_model(seed=1)
    x = images(1, 8)
    ref = model.decode(model.encode_latent(x))
    st = str(tmp_path / "tiny.safetensors")
    model.save(st)
    assert BSQTokenizer.config_from_file(st) == TINY
    loaded = BSQTokenizer.from_file(st)
    assert loaded.config == TINY and torch.equal(loaded.decode(loaded.encode_latent(x)), ref)
    # upstream's .pth nests the weights under 'vae' (or 'ema'), in either key layout
    flat_sd = {flat(k): v for k, v in model.state_dict().items()}
    for name, obj in (("vae.pth", {"vae": model.state_dict()}), ("ema.pth", {"ema": flat_sd, "step": 3})):
        torch.save(obj, tmp_path / name)
        assert BSQTokenizer.config_from_file(str(tmp_path / name)) is None
        loaded = BSQTokenizer.from_file(str(tmp_path / name))
        assert loaded.config == TINY and torch.equal(loaded.decode(loaded.encode_latent(x)), ref)


# -- multi-scale bits --------------------------------------------------------------------------------

SCALES = [(1, 1), (2, 3), (3, 4), (4, 6)]  # 8x12 px with the downsample-2 tiny model


def plain_quantize(h, scales):
    """Upstream's multi-scale BSQ written out directly: per-scale bits, the accumulated codes and the residual norms."""
    _, d, H, W = h.shape
    s = 1 / math.sqrt(d)
    residual = h.clone().unsqueeze(2)  # (B, d, 1, H, W)
    accumulated = torch.zeros_like(residual)
    bits, norms = [], [residual.norm().item()]
    for hs, ws in scales:
        if (hs, ws) == (H, W):
            small = residual
        else:
            small = F.interpolate(residual, size=(1, hs, ws), mode="area")
        unit = small / small.norm(dim=1, keepdim=True).clamp_min(1e-12)
        code = torch.where(unit > 0, torch.full_like(unit, s), torch.full_like(unit, -s))
        bits.append((code > 0)[:, :, 0].permute(0, 2, 3, 1))
        if (hs, ws) != (H, W):
            code = F.interpolate(code, size=(1, H, W), mode="trilinear")
        accumulated = accumulated + code
        residual = residual - code
        norms.append(residual.norm().item())
    return bits, accumulated[:, :, 0], norms


def test_encode_bits_matches_a_plain_implementation():
    model = tiny_model()
    x = images(2, 8, 12, seed=3)
    bits = model.encode_bits(x, SCALES)
    assert [tuple(b.shape) for b in bits] == [(2, h, w, 4) for h, w in SCALES]
    assert all(b.dtype == torch.bool for b in bits)
    want_bits, want_sum, _ = plain_quantize(model.encode_latent(x), SCALES)
    assert all(torch.equal(b, w) for b, w in zip(bits, want_bits))
    summed = model.bits_to_summed_codes(bits)
    assert summed.shape == (2, 4, 4, 6) and summed.dtype == torch.float32
    torch.testing.assert_close(summed, want_sum, rtol=0, atol=1e-6)
    img = model.decode(summed)
    assert img.shape == x.shape and img.abs().max() <= 1


def test_residual_shrinks_over_scales():
    """On a latent like a trained encoder's (close to a sum of per-scale codes; a random encoder's latent is far
    smaller than one unit code, so it would be overshot), every scale takes something off the residual."""
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    h = 0.05 * torch.randn(2, 4, 4, 6, generator=g)
    for hs, ws in SCALES:
        code = torch.where(torch.rand(2, 4, 1, hs, ws, generator=g) > 0.5, 0.5, -0.5)
        h = h + F.interpolate(code, size=(1, 4, 6), mode="trilinear")[:, :, 0]
    bits, summed = model.quantize_latent(h, SCALES)
    want_bits, want_sum, norms = plain_quantize(h, SCALES)
    assert all(torch.equal(b, w) for b, w in zip(bits, want_bits))
    torch.testing.assert_close(summed, want_sum, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.bits_to_summed_codes(bits), want_sum, rtol=0, atol=1e-6)
    assert all(a > b for a, b in itertools.pairwise(norms)), norms
    assert norms[-1] < 0.5 * norms[0]
    assert (h - summed).norm().item() == pytest.approx(norms[-1], rel=1e-5)


def test_bits_to_codes_and_resampling():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(2, 3, 5, 4, generator=g) > 0.5
    codes = model.bits_to_codes(bits)
    assert codes.shape == (2, 4, 3, 5) and codes.dtype == torch.float32
    torch.testing.assert_close(codes, torch.where(bits, 0.5, -0.5).permute(0, 3, 1, 2))  # +-1/sqrt(4), unit length
    assert torch.equal(model.bits_to_codes(bits.long()), codes)
    # with one frame, trilinear on (B, d, 1, h, w) is bilinear (align_corners=False) in both directions
    up = model.upsample_codes(codes, (7, 9))
    torch.testing.assert_close(up, F.interpolate(codes, size=(7, 9), mode="bilinear", align_corners=False))
    down = model.downsample_codes(up, (2, 3))
    torch.testing.assert_close(down, F.interpolate(up, size=(2, 3), mode="bilinear", align_corners=False))
    assert model.upsample_codes(codes, (3, 5)) is codes
    # partial sums: the first k scales at the full size
    few = [torch.zeros(1, 1, 1, 4, dtype=torch.bool), torch.ones(1, 2, 2, 4, dtype=torch.bool)]
    assert torch.allclose(model.bits_to_summed_codes(few, (4, 4)), torch.zeros(1, 4, 4, 4), atol=1e-7)


@pytest.mark.parametrize(
    "scales, message",
    [
        ([(1, 1), (2, 2), (4, 4)], ["4x6 (h x w) latent", "ends at 4x4", "8x8 px"]),
        ([], ["empty"]),
        ([(1, 1), (5, 6), (4, 6)], ["larger"]),
        ([(1,), (4, 6)], ["(h, w) pair"]),
    ],
)
def test_schedule_errors(scales, message):
    with pytest.raises(NextScaleError) as e:
        tiny_model().encode_bits(images(1, 8, 12), scales)
    for part in message:
        assert part in str(e.value)


def test_input_errors():
    model = tiny_model()
    with pytest.raises(NextScaleError, match="multiple of"):
        model.encode_latent(images(1, 7, 8))
    with pytest.raises(NextScaleError, match=r"\(B, h, w, 4\)"):
        model.bits_to_codes(torch.zeros(1, 2, 2, 3, dtype=torch.bool))
    with pytest.raises(NextScaleError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize("bands", [2, 3, 8, 64])
def test_decoding_in_bands_gives_the_whole_decode(bands):
    """Every norm's statistics over the whole map and a neighbour row each side of every band: no seam, the same
    images up to fp32 rounding (also with more bands than rows at the lowest level, and a non-square latent)."""
    torch.manual_seed(3)
    tok = BSQTokenizer(BSQConfig(codebook_dim=8, base_ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)).eval()
    with torch.no_grad():  # norms far from the identity, so that their statistics matter
        for norm in (m for m in tok.decoder.modules() if isinstance(m, torch.nn.GroupNorm)):
            norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
    summed = torch.randn(2, 8, 12, 20) * 2 + 0.5
    with torch.inference_mode():
        whole, banded = tok.decode(summed), tok.decode(summed, bands)
    assert banded.shape == whole.shape == (2, 3, 48, 80)
    assert (banded - whole).abs().max() < 1e-5


def test_a_decoder_that_attends_is_not_decoded_in_bands():
    from nextscale.models.core.autoencoder import decode_in_bands
    from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig

    vae = MultiScaleVQVAE(TokenizerConfig(vocab_size=16, z_channels=8, ch=32, ch_mult=(1, 1)))
    with pytest.raises(ValueError, match="a decoder that attends cannot decode in bands"):
        decode_in_bands(vae.decoder, torch.zeros(1, 8, 4, 4), 2)
