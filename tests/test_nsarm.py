"""NSARM: the official key layout (Infinity-8B plus the transformation network, built from the architecture),
strict loading and identification, the network against torch's own encoder layers, the upscaling run on a tiny
random model (mapped scales kept, the rest predicted, area resampling of the next input), tiling and colour fixes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.family import identify
from nextscale.models.core.hooks import Guide, SamplerHooks
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer
from nextscale.models.infinity.model import Infinity, InfinityConfig
from nextscale.models.infinity.schedule import InfinitySchedule
from nextscale.models.nsarm.mapper import PREFIX, MapperConfig, ScaleMapper
from nextscale.models.nsarm.model import NSARM, NSARMConfig
from nextscale.models.nsarm.sampler import (
    AreaNextInput,
    UpscaleCondition,
    UpscaleOptions,
    input_size,
    output_size,
    sample_nsarm,
)
from nextscale.models.nsarm.tiles import (
    adain,
    color_fix,
    tile_count,
    tile_starts,
    upscale_tiled,
    upscale_whole,
    wavelet,
)
from torch import nn

D = 4
TINY = NSARMConfig(
    InfinityConfig(depth=2, embed_dim=32, num_heads=2, hidden_dim=64, token_dim=D, text_dim=32, text_maxlen=8,
                   block_chunks=2, pool_heads=2),
    MapperConfig(channels=D, grid=4, sides=(1, 2, 4), widths=(8, 16, 16), layers=(1, 1, 2), heads=(1, 2, 4),
                 stem=(8, 8), resolution="0.06M"),
)


def randomised(module: nn.Module, seed: int, gain: float = 0.3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * gain)
    return module.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model() -> NSARM:
    return randomised(NSARM(TINY), 0)


@pytest.fixture(scope="module")
def tok() -> BSQTokenizer:
    torch.manual_seed(3)
    return BSQTokenizer(BSQConfig(codebook_dim=D, base_ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()


def images(B: int = 2, side: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- the official layout ------------------------------------------------------------------------------


def upstream_layout(cfg: MapperConfig) -> nn.Module:
    """The network as upstream writes it, from torch's layers (``TransformerEncoderLayer``, ``LayerNorm`` over
    ``(C, G, G)``): the reference for key names, shapes and outputs."""
    d, G = cfg.channels, cfg.grid

    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.LayerNorm([cout, G, G]), nn.GELU()]

    net = nn.Module()
    net.feature_extractor = nn.Sequential(*stage(d, cfg.stem[0]), *stage(cfg.stem[0], cfg.stem[1]),
                                          *stage(cfg.stem[1], d))
    net.feature_transforms = nn.ModuleList(nn.Sequential(*stage(d, w // 2), *stage(w // 2, w)) for w in cfg.widths)
    net.transformers = nn.ModuleList(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(w, h, cfg.mlp_ratio * w, dropout=0.1, batch_first=True), n,
                              enable_nested_tensor=False)
        for w, h, n in zip(cfg.widths, cfg.heads, cfg.layers)
    )
    net.output_projs = nn.ModuleList(
        nn.Sequential(nn.Linear(w, w // 2), nn.LayerNorm(w // 2), nn.GELU(), nn.Linear(w // 2, d)) for w in cfg.widths
    )
    return net


def upstream_forward(net: nn.Module, cfg: MapperConfig, x: torch.Tensor) -> list[torch.Tensor]:
    features = net.feature_extractor(x)
    out = []
    for i, side in enumerate(cfg.sides):
        pooled = nn.AdaptiveAvgPool2d((side, side))(net.feature_transforms[i](features))
        seq = pooled.permute(0, 2, 3, 1).reshape(x.shape[0], side * side, cfg.widths[i])
        out.append(net.output_projs[i](net.transformers[i](seq)))
    return out


def test_the_network_has_upstreams_keys_and_computes_as_torchs_encoder_layers():
    cfg = TINY.mapper
    ref = randomised(upstream_layout(cfg), 5)
    ours = ScaleMapper(cfg)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, D, cfg.grid, cfg.grid, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(ours.double()(x), upstream_forward(ref.double(), cfg, x)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    bits = ours.bits(x)
    codes = ours(x)[2]
    assert torch.equal(bits[2], (codes.reshape(2, D, 4, 4) > 0).permute(0, 2, 3, 1))  # a reshape, not a transpose


def test_the_tokens_reading_gives_each_token_its_own_cells_channels(tmp_path, model):
    import dataclasses

    cfg = dataclasses.replace(TINY.mapper, reading="tokens")
    net = ScaleMapper(cfg)
    net.load_state_dict(model.map_transformer.state_dict())
    x = torch.randn(2, D, cfg.grid, cfg.grid)
    with torch.no_grad():
        codes, bits = net(x)[2], net.bits(x)[2]
    assert torch.equal(bits, (codes > 0).reshape(2, 4, 4, D))  # token y*4 + x is cell (y, x), its D channels
    assert not torch.equal(bits, model.map_transformer.bits(x)[2])  # same weights, upstream's reading differs
    assert MapperConfig.from_dict(cfg.to_dict()) == cfg and MapperConfig().reading == "reshape"
    path = str(tmp_path / "tokens.safetensors")
    NSARM(dataclasses.replace(TINY, mapper=cfg)).save(path)
    assert NSARM.from_file(path).setup.mapper.reading == "tokens"  # the file's metadata carries it
    with pytest.raises(NextScaleError, match=r"reading 'columns' is not one of reshape, tokens"):
        dataclasses.replace(cfg, reading="columns")


def official_state_dict() -> dict[str, torch.Tensor]:
    """Every key of the released NSARM.pth with its shape (meta tensors): Infinity-8B and the 8B's network as
    upstream builds them."""
    with torch.device("meta"):
        transformer = Infinity(InfinityConfig.official("8b")).state_dict()
        network = upstream_layout(MapperConfig.official()).state_dict()
    return {**transformer, **{PREFIX + k: v for k, v in network.items()}}


def test_the_released_layout_is_identified_and_its_config_inferred_from_the_keys():
    sd = official_state_dict()
    assert str(identify(sd)) == "nsarm-upscaler"
    assert str(identify({k: v for k, v in sd.items() if not k.startswith(PREFIX)})) == "infinity-generator"
    assert NSARM.infer_config(sd) == NSARMConfig.official()
    assert set(NSARM.expected_shapes(NSARMConfig.official())) == set(sd)
    assert sum(k.startswith(PREFIX) for k in sd) == 12 + 7 * (8 + 6) + 12 * sum((4, 6, 8, 10, 12, 14, 16))


def test_loading_is_strict_and_round_trips(tmp_path, model):
    path = str(tmp_path / "tiny.safetensors")
    model.save(path)
    again = NSARM.from_file(path)
    assert again.setup == TINY
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    sd = dict(model.state_dict())
    sd.pop(PREFIX + "output_projs.0.3.bias")
    with pytest.raises(NextScaleError, match=r"1 missing key\(s\): map_transformer.output_projs.0.3.bias"):
        NSARM.from_state_dict(sd, "x.pth", TINY)
    with pytest.raises(NextScaleError, match=r"not the released NSARM's .* save it with NextScale"):
        NSARM.infer_config(model.state_dict(), "x.pth")


def test_a_file_of_another_kind_is_refused_with_what_it_is(tmp_path, tok):
    infinity = Infinity(TINY.infinity)
    infinity.save(str(tmp_path / "inf.safetensors"))
    with pytest.raises(NextScaleError, match=r"is an Infinity transformer.*; expected an NSARM super-resolution model"):
        NSARM.from_file(str(tmp_path / "inf.safetensors"))
    tok.save(str(tmp_path / "tok.safetensors"))
    with pytest.raises(NextScaleError, match=r"is an Infinity BSQ tokenizer.*; expected an NSARM"):
        NSARM.from_file(str(tmp_path / "tok.safetensors"))


# -- the upscaling run ----------------------------------------------------------------------------------


def test_an_upscale_keeps_the_mapped_scales_and_predicts_the_rest(model, tok):
    lq = images()
    assert (input_size(model, tok), output_size(model, tok)) == (8, 32)
    tokens = sample_nsarm(model, tok, UpscaleCondition(lq), seed=3)
    sched = InfinitySchedule.from_template(1.0, "0.06M")
    assert tokens.scales == sched.scales and tokens.batch_size == 2
    mapped = model.map_transformer.bits(tok.encode_latent(lq))
    assert all(torch.equal(tokens.bits[si], mapped[si]) for si in range(3))
    assert tok.decode(tokens.summed_codes).shape == (2, 3, 32, 32)
    again = sample_nsarm(model, tok, UpscaleCondition(lq), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(tokens.bits, again.bits))
    one = sample_nsarm(model, tok, UpscaleCondition(lq[1:]), seed=4)  # item i draws with seed + i
    assert all(torch.equal(a[1:], b) for a, b in zip(tokens.bits, one.bits))
    free = sample_nsarm(model, tok, UpscaleCondition(lq), seed=3, options=UpscaleOptions(input_scales=1))
    assert torch.equal(free.bits[0], mapped[0]) and not torch.equal(free.bits[2], mapped[2])


def test_a_prompt_changes_the_prediction_and_the_empty_prompt_is_the_learned_row(model, tok):
    lq = images(B=1)
    text, mask = model.empty_prompt(1, "cpu")
    assert text.shape == (1, 1, 32) and torch.equal(text[0, 0], model.cfg_uncond[0])
    plain = sample_nsarm(model, tok, UpscaleCondition(lq), seed=0)
    same = sample_nsarm(model, tok, UpscaleCondition(lq, text, mask), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, same.bits))
    prompt = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(9))
    other = sample_nsarm(model, tok, UpscaleCondition(lq, prompt, torch.ones(1, 5, dtype=torch.bool)), seed=0)
    assert not all(torch.equal(a, b) for a, b in zip(plain.bits, other.bits))


def test_the_next_input_is_averaged_onto_its_grid(tok):
    summed = torch.randn(1, D, 16, 16)
    area = AreaNextInput(tok).downsample_codes(summed, (6, 6))
    torch.testing.assert_close(area, F.interpolate(summed[:, :, None], size=(1, 6, 6), mode="area")[:, :, 0])
    assert not torch.allclose(area, tok.downsample_codes(summed, (6, 6)))
    assert AreaNextInput(tok).codebook_dim == D


def test_bad_input_is_refused_clearly(model, tok):
    with pytest.raises(NextScaleError, match=r"NSARM takes \(8 x 8 px\) RGB images"):
        sample_nsarm(model, tok, UpscaleCondition(images(side=16)), seed=0)
    with pytest.raises(NextScaleError, match=r"input_scales = 4: this model maps 0\.\.3"):
        sample_nsarm(model, tok, UpscaleCondition(images()), seed=0, options=UpscaleOptions(input_scales=4))
    with pytest.raises(NextScaleError, match="a guide cannot be connected"):
        sample_nsarm(model, tok, UpscaleCondition(images()), seed=0, hooks=SamplerHooks(guide=Guide()))
    torch.manual_seed(0)
    wide = BSQTokenizer(BSQConfig(codebook_dim=8, base_ch=32, ch_mult=(1, 2), num_res_blocks=1))
    with pytest.raises(NextScaleError, match="the tokenizer codes 8 bits"):
        sample_nsarm(model, wide, UpscaleCondition(images()), seed=0)


# -- tiling and colour ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,tile,overlap", [(100, 32, 4), (32, 32, 8), (33, 32, 0), (257, 64, 16), (20, 32, 4)])
def test_tiles_cover_the_image_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and (starts[-1] + tile >= length)
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts)) and starts == sorted(set(starts))
    if length > tile:
        assert starts[-1] + tile == length


def nearest_x4(tile: torch.Tensor, _: int) -> torch.Tensor:
    return F.interpolate(tile, scale_factor=4, mode="nearest")


@pytest.mark.parametrize("blend", ["seamless", "none"])
@pytest.mark.parametrize("hw", [(20, 36), (8, 8), (5, 13)])
def test_tiles_reassemble_the_image_a_tile_model_upscales(blend, hw):
    img = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = upscale_tiled(nearest_x4, img, (4 * hw[0], 4 * hw[1]), 8, 32, 0.25, blend)
    torch.testing.assert_close(out, nearest_x4(img, 0), rtol=0, atol=1e-6)
    assert tile_count((4 * hw[0], 4 * hw[1]), 8, 32, 0.25) >= math.ceil(hw[0] / 8) * math.ceil(hw[1] / 8)


def test_the_seamless_blend_leaves_no_step_between_tiles():
    def flat(tile, index):  # every tile a different constant
        return torch.full((1, 3, 32, 32), -1 + 0.5 * index)

    img = torch.zeros(1, 3, 8, 20)
    seamless = upscale_tiled(flat, img, (32, 80), 8, 32, 0.5, "seamless")
    hard = upscale_tiled(flat, img, (32, 80), 8, 32, 0.5, "none")
    steps = lambda x: x.diff(dim=-1).abs().max().item()  # noqa: E731
    assert steps(hard) >= 0.5 and steps(seamless) < 0.1
    whole = upscale_whole(lambda t, i: nearest_x4(t, i), torch.rand(1, 3, 6, 10) * 2 - 1, (24, 40), 8)
    assert whole.shape == (1, 3, 24, 40)


def test_colour_fixes_take_the_inputs_colours():
    g = torch.Generator().manual_seed(4)
    result, reference = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g) * 0.5
    fixed = adain(result, reference)
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)))
    torch.testing.assert_close(fixed.std((2, 3)), reference.std((2, 3)), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(wavelet(result, result), result, rtol=1e-5, atol=1e-5)
    lq = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    sr = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert torch.equal(color_fix(sr, lq, "none"), sr)
    both = color_fix(sr, lq, "adain + wavelet")
    assert both.shape == sr.shape and both.min() >= -1 and both.max() <= 1 and not torch.equal(both, sr)
    with pytest.raises(NextScaleError, match="color fix 'sepia' is not one of"):
        color_fix(sr, lq, "sepia")
