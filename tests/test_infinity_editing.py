"""Inpainting with a prompt on Infinity: VAR's edit guides with a reference encoded by the BSQ tokenizer, bound
bitwise (models/infinity/editing.py) on a tiny random model: kept bits, the all-keep and all-regenerate limits, the
scale range, latent blend, per-image masks through sub-batches, an aspect ratio's grids and composite, the Infinity
schedule of NextScale Encode, and the refusals."""

from __future__ import annotations

import pytest
import torch
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.imageops import model_to_image
from nextscale.models.core.tokens import NextScaleTokens
from nextscale.models.infinity.editing import bind_bits
from nextscale.models.infinity.family import FAMILY
from nextscale.models.infinity.model import InfinityConfig
from nextscale.models.infinity.schedule import InfinitySchedule
from nextscale.models.var.editing import EditSpec, composite, image_to_image, inpaint, keep_masks
from test_infinity import TINY, prompts, tiny_model
from test_infinity_sampler import D, run, tiny_tokenizer

SQUARE = InfinitySchedule.custom([(1, 1), (2, 2), (4, 4), (8, 8)])
K = SQUARE.num_scales


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def reference(tok, B: int = 1, seed: int = 0):
    """Bits of ``B`` random pictures, encoded by NextScale Encode's path on the square schedule."""
    g = torch.Generator().manual_seed(seed)
    side = SQUARE.scales[-1][0] * tok.downsample
    image = torch.rand(B, 3, side, side, generator=g) * 2 - 1
    return FAMILY.encode(tok, image, SQUARE.scales, "center crop")


def hole(B: int = 1, side: int = 16) -> torch.Tensor:
    """Regenerate the right half's middle rows (1 = regenerate)."""
    mask = torch.zeros(B, side, side)
    mask[:, side // 4 : 3 * side // 4, side // 2 :] = 1
    return mask


def edit(model, tok, spec, seed=0, B=2):
    text, mask = prompts(B=B)
    guide = bind_bits(spec, tok, SQUARE.scales, B)
    return run(model, tok, text, mask, seed=seed, schedule=SQUARE, hooks=SamplerHooks(guide=guide))


def plain(model, tok, seed=0, B=2):
    text, mask = prompts(B=B)
    return run(model, tok, text, mask, seed=seed, schedule=SQUARE)


def same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_kept_cells_take_the_references_bits_at_every_guided_scale(model, tok):
    ref = reference(tok)
    spec = inpaint(ref, hole())
    keep = keep_masks(1 - hole(), SQUARE.scales)
    out = edit(model, tok, spec, seed=4)
    for si in range(K):
        kept = keep[si][0]
        assert kept.any()
        assert torch.equal(out.bits[si][:, kept], ref.bits[si][:, kept].expand(2, -1, -1)), si
    assert not keep[-1][0].all()  # the hole is sampled at the last scale


def test_keep_everything_reproduces_the_reference_and_regenerate_everything_is_unguided(model, tok):
    ref = reference(tok)
    everything = edit(model, tok, inpaint(ref, torch.zeros(1, 16, 16)), seed=2)
    assert all(torch.equal(b, r.expand(2, -1, -1, -1)) for b, r in zip(everything.bits, ref.bits))
    assert torch.equal(everything.summed_codes[:1], tok.bits_to_summed_codes(ref.bits))
    assert same_bits(edit(model, tok, image_to_image(ref, K), seed=2), everything)
    assert same_bits(edit(model, tok, inpaint(ref, torch.ones(1, 16, 16)), seed=2), plain(model, tok, seed=2))


def test_the_masked_cells_are_sampled(model, tok):
    ref = reference(tok)
    hole_hw = ~keep_masks(1 - hole(), SQUARE.scales)[-1][0]
    differs = [
        not torch.equal(edit(model, tok, inpaint(ref, hole()), seed=s).bits[-1][:, hole_hw], ref.bits[-1][:, hole_hw])
        for s in range(3)
    ]
    assert any(differs)


def test_scale_range(model, tok):
    """Scales before start_scale are sampled as without a guide; from end_scale on nothing is kept."""
    ref = reference(tok)
    late = edit(model, tok, inpaint(ref, hole(), start_scale=2), seed=5)
    unguided = plain(model, tok, seed=5)
    assert all(torch.equal(late.bits[si], unguided.bits[si]) for si in range(2))
    keep = keep_masks(1 - hole(), SQUARE.scales)
    assert all(torch.equal(late.bits[si][:, keep[si][0]], ref.bits[si][:, keep[si][0]].expand(2, -1, -1))
               for si in range(2, K))
    early = edit(model, tok, image_to_image(ref, 2), seed=5)
    assert all(torch.equal(early.bits[si], ref.bits[si].expand(2, -1, -1, -1)) for si in range(2))
    assert not torch.equal(early.bits[-1], ref.bits[-1].expand(2, -1, -1, -1))


def test_latent_blend_holds_the_kept_area_of_the_summed_codes_to_the_reference(model, tok):
    ref = reference(tok)
    out = edit(model, tok, inpaint(ref, hole(), mode="latent blend"), seed=1)
    kept_HW = keep_masks(1 - hole(), SQUARE.scales)[-1][0]
    ref_summed = tok.bits_to_summed_codes(ref.bits)
    assert torch.equal(out.summed_codes[:, :, kept_HW], ref_summed[:, :, kept_HW].expand(2, -1, -1))
    tokens_mode = edit(model, tok, inpaint(ref, hole()), seed=1)
    assert not torch.equal(tokens_mode.summed_codes[:, :, kept_HW], out.summed_codes[:, :, kept_HW])
    assert not torch.equal(out.summed_codes[:, :, ~kept_HW], ref_summed[:, :, ~kept_HW].expand(2, -1, -1))


def test_per_image_masks_and_references_survive_sub_batches(model, tok):
    """A run of 3 split as [0], [1, 2] (the memory planner's sub-batches, seed + start) gives the whole run's bits;
    image 1 keeps no cell of the 2x2 scale, which the others keep, and latent blend still resets its kept area."""
    refs = reference(tok, B=3, seed=7)
    top = torch.zeros(16, 16)
    top[:12] = 1
    masks = torch.stack([hole()[0], top, torch.zeros(16, 16)])
    assert [bool(m.any()) for m in keep_masks(1 - masks, SQUARE.scales)[1]] == [True, False, True]
    spec = inpaint(refs, masks, mode="latent blend")
    text, mask = prompts(B=3)

    def part(start, stop):
        guide = bind_bits(spec.images(start, stop, 3), tok, SQUARE.scales, stop - start)
        return run(model, tok, text[start:stop], mask[start:stop], seed=11 + start, schedule=SQUARE,
                   hooks=SamplerHooks(guide=guide))

    whole, first, rest = part(0, 3), part(0, 1), part(1, 3)
    assert all(torch.equal(w, torch.cat([a, b])) for w, a, b in zip(whole.bits, first.bits, rest.bits))
    assert all(torch.equal(whole.bits[si][2], refs.bits[si][2]) for si in range(K))  # image 2 keeps everything


def test_an_aspect_ratios_grids_take_a_stretched_mask_and_the_composite_stretches_back(model, tok):
    """A 2:1 schedule: the picture and its mask are stretched onto the grids (no fit recorded), the kept bits are
    the reference's, and Decode's composite stretches the decoded picture back onto the original."""
    wide = InfinitySchedule.custom([(1, 1), (2, 2), (2, 4), (4, 8)])
    picture = torch.rand(1, 10, 20, 3, generator=torch.Generator().manual_seed(3))
    ref = FAMILY.encode(tok, picture.permute(0, 3, 1, 2) * 2 - 1, wide.scales, "stretch")
    regenerate = torch.zeros(1, 10, 20)
    regenerate[:, :, 10:] = 1
    spec = inpaint(ref, regenerate)
    text, mask = prompts()
    out = run(model, tok, text, mask, seed=1, schedule=wide,
              hooks=SamplerHooks(guide=bind_bits(spec, tok, wide.scales, 2)))
    for si, kept in enumerate(keep_masks(1 - regenerate, wide.scales)):
        assert torch.equal(out.bits[si][:, kept[0]], ref.bits[si][:, kept[0]].expand(2, -1, -1)), si
    decoded = model_to_image(tok.decode(out.summed_codes))
    assert tuple(decoded.shape) == (2, 8, 16, 3)
    pasted = composite(decoded, picture, regenerate)
    assert tuple(pasted.shape) == (2, 10, 20, 3)
    assert torch.equal(pasted[:, :, :10], picture[:, :, :10].expand(2, -1, -1, -1))
    same_size = composite(decoded, decoded, torch.ones(1, 8, 16))
    assert torch.equal(same_size, decoded)


def test_infinity_schedules_for_nextscale_encode(tok):
    assert FAMILY.parse_schedule("0.06M") == InfinitySchedule.from_template(1.0, "0.06M").scales
    assert FAMILY.parse_schedule("1M 4:3") == InfinitySchedule.from_template(0.75, "1M").scales
    for bad in ("256", "0.06M tall", "2M"):
        with pytest.raises(NextScaleError, match=r"'0.06M' \(the embedded model\) or '1M 4:3'"):
            FAMILY.parse_schedule(bad)
    wide = FAMILY.parse_schedule("0.06M 2:1")
    image = torch.zeros(1, 3, 20, 30)
    with pytest.raises(NextScaleError, match="choose resize 'stretch'"):
        FAMILY.encode(tok, image, wide, "center crop")
    assert "fit" not in FAMILY.encode(tok, image, wide, "stretch").extra
    square = FAMILY.encode(tok, image, SQUARE.scales, "pad")
    fit = square.extra["fit"]
    assert (fit.height, fit.width, fit.side, fit.mode) == (20, 30, 8 * tok.downsample, "pad")


def test_a_patchifying_models_guide_is_encoded_on_its_latent_grids(model, tok):
    """Infinity-8B's layout (2 x 2 latent cells a token): a reference encoded for the model (NextScale Encode with
    its ``model``) lies on grids twice as fine, and the inpainted run keeps its bits there; one encoded on the token
    grids is refused with that fix."""
    patched = tiny_model(InfinityConfig(**{**TINY.to_dict(), "token_dim": 4 * D}))
    assert FAMILY.guide_schedule(model, tok, SQUARE.scales) == SQUARE.scales
    latent = FAMILY.guide_schedule(patched, tok, SQUARE.scales)
    assert latent == tuple((2 * h, 2 * w) for h, w in SQUARE.scales)
    assert FAMILY.guide_schedule(patched, tok)[-1] == tuple(2 * s for s in InfinitySchedule.from_template().scales[-1])
    side = latent[-1][0] * tok.downsample
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ref = FAMILY.encode(tok, image, latent, "center crop")
    regenerate = hole(side=side)
    text, mask = prompts(B=2)
    out = run(patched, tok, text, mask, seed=1, schedule=SQUARE,
              hooks=SamplerHooks(guide=bind_bits(inpaint(ref, regenerate), tok, latent, 2)))
    assert out.scales == latent
    for si, kept in enumerate(keep_masks(1 - regenerate, latent)):
        assert torch.equal(out.bits[si][:, kept[0]], ref.bits[si][:, kept[0]].expand(2, -1, -1)), si
    assert not torch.equal(out.bits[-1], ref.bits[-1].expand(2, -1, -1, -1))
    on_tokens = FAMILY.encode(tok, image, SQUARE.scales, "center crop")
    with pytest.raises(NextScaleError, match=r"2 x 2 latent cells a token \(Infinity-8B\): connect it to NextScale "
                       r"Encode's 'model' input"):
        bind_bits(inpaint(on_tokens, regenerate), tok, latent, 1)


def test_refusals(tok):
    ref = reference(tok)
    var_tokens = NextScaleTokens([torch.zeros(1, pn, pn, dtype=torch.long) for pn in (1, 2, 4)], (1, 2, 4))
    with pytest.raises(NextScaleError, match="encoded by a VAR tokenizer: encode the image with the Infinity"):
        bind_bits(inpaint(var_tokens, hole()), tok, SQUARE.scales, 1)
    with pytest.raises(NextScaleError, match=r"encoded on the latent grids .* set NextScale Encode's schedule"):
        bind_bits(inpaint(ref, hole()), tok, [(1, 1), (2, 2), (4, 4), (6, 6)], 1)
    with pytest.raises(NextScaleError, match="4 bits per cell but this tokenizer codes 6"):
        bind_bits(inpaint(ref, hole()), tiny_tokenizer(d=6), SQUARE.scales, 1)
    with pytest.raises(NextScaleError, match="the mask holds 2 images but the sampler makes 3"):
        bind_bits(inpaint(ref, hole(B=2)), tok, SQUARE.scales, 3)
    with pytest.raises(NextScaleError, match=r"bits of an Infinity .* NextScale Sampler \(Text\)"):
        EditSpec(ref, hole()).bind(None, (1, 2, 4, 8), 1)
