"""Training-free editing: per-scale masks, token replacement, latent blend, img2img, scale range, batches, composite.

Tiny random models (test_sampler's generator, a randomised 8 px tokenizer with the schedule 1, 2, 3, 4) on the CPU.
"""

import textwrap

import pytest
import torch
from harness.testbed import run_in_comfyui_python
from nextscale.models.core.errors import NextScaleError
from nextscale.models.core.hooks import SamplerHooks
from nextscale.models.core.imageops import ImageFit, fit_square
from nextscale.models.core.tokens import NextScaleTokens
from nextscale.models.var.editing import (
    EditSpec,
    composite,
    feather,
    fit_mask,
    image_to_image,
    inpaint,
    keep_masks,
)
from nextscale.models.var.sampler import SamplingOptions, sample
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
from test_sampler import CVAE, PN, VOCAB, make_var

K, PX = len(PN), 8  # 8 px images: a 4x4 latent of 2 px cells


@pytest.fixture(scope="module")
def vae() -> MultiScaleVQVAE:
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    vae = MultiScaleVQVAE(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1)-scale weights: encoded images use many codes
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return vae


@pytest.fixture(scope="module")
def var():
    return make_var()


def encode(vae, images_B3HW) -> NextScaleTokens:
    """What NextScale Encode returns: the indices per scale and their f_hat."""
    idx = vae.img_to_indices(images_B3HW)
    per_scale = [i.view(-1, pn, pn) for i, pn in zip(idx, PN)]
    return NextScaleTokens(per_scale, PN, f_hat=vae.indices_to_fhat(idx), source="encoded")


@pytest.fixture(scope="module")
def reference(vae) -> NextScaleTokens:
    g = torch.Generator().manual_seed(2)
    return encode(vae, torch.rand(2, 3, PX, PX, generator=g) * 2 - 1)


def random_reference(batch: int, seed: int = 0) -> NextScaleTokens:
    g = torch.Generator().manual_seed(seed)
    return NextScaleTokens([torch.randint(VOCAB, (batch, pn, pn), generator=g) for pn in PN], PN, source="encoded")


def run(var, vae, spec, labels=(1, 2), seed=5, **options) -> NextScaleTokens:
    guide = None if spec is None else spec.bind(vae, PN, len(labels))
    hooks = SamplerHooks(guide=guide)
    return sample(var, vae, torch.tensor(labels), seed=seed, options=SamplingOptions(**options), hooks=hooks)


def decode(vae, tokens):
    """What NextScale Decode does: prefer the kept f_hat, else rebuild it from the indices."""
    return vae.fhat_to_img(tokens.f_hat if tokens.f_hat is not None else vae.indices_to_fhat(tokens.flat(), PN))


def same_tokens(a: NextScaleTokens, b: NextScaleTokens) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


def hole(px: int = PX) -> torch.Tensor:
    """Regenerate the top-left quadrant (ComfyUI mask: 1 = regenerate)."""
    mask = torch.zeros(1, px, px)
    mask[:, : px // 2, : px // 2] = 1
    return mask


def test_keep_masks_area_average_threshold_and_small_scales():
    masks = keep_masks(1 - hole(16)[0:1], (1, 2, 3, 4, 8))
    T, F_ = True, False
    assert masks[0].tolist() == [[[T]]]  # one token: kept whole (the image keeps something)
    assert masks[1].tolist() == [[[F_, T], [T, T]]]
    # 3x3 cells over 16 px: [0, 6), [5, 11), [10, 16). Half-kept cells (keep = 0.5) are regenerated.
    assert masks[2].tolist() == [[[F_, F_, T], [F_, T, T], [T, T, T]]]
    assert masks[3].tolist() == [[[F_, F_, T, T], [F_, F_, T, T], [T, T, T, T], [T, T, T, T]]]
    assert masks[4][0, :4, :4].sum() == 0 and masks[4].sum() == 48
    assert not any(m.any() for m in keep_masks(torch.zeros(1, 16, 16), (1, 2, 3, 4)))  # keeps nothing, even 1x1
    assert not any(m.any() for m in keep_masks(torch.full((1, 5, 5), 0.5), (1, 2, 3, 4)))  # strictly above 0.5
    assert all(m.all() for m in keep_masks(torch.full((1, 5, 5), 0.6), (1, 2, 3, 4)))
    quarter = torch.zeros(1, 16, 16)
    quarter[:, :8, :8] = 1  # keep a quarter: the 1x1 scale is kept only by the small-scale rule
    assert keep_masks(quarter, (1, 2, 4))[0].all() and not keep_masks(quarter, (1, 2, 4), small_tokens=0)[0].any()
    assert keep_masks(torch.ones(1, 3, 3), (1, 2, 4))[2].all()  # a mask coarser than the grid is fine


@pytest.mark.parametrize("mode", ["tokens", "latent blend"])
@pytest.mark.parametrize("more_smooth", [False, True])
def test_keep_everything_reproduces_the_reconstruction(var, vae, reference, mode, more_smooth):
    target = vae.indices_to_img(reference.flat(), PN)
    assert torch.equal(decode(vae, reference), target)
    for spec in (inpaint(reference, torch.zeros(PX, PX), mode=mode), image_to_image(reference, K)):
        out = run(var, vae, spec, more_smooth=more_smooth)
        assert same_tokens(out, reference)
        assert torch.equal(decode(vae, out), target)


@pytest.mark.parametrize("mode", ["tokens", "latent blend"])
@pytest.mark.parametrize("more_smooth", [False, True])
def test_keep_nothing_equals_unguided_sampling(var, vae, reference, mode, more_smooth):
    free = run(var, vae, None, more_smooth=more_smooth)
    for spec in (
        inpaint(reference, torch.ones(1, PX, PX), mode=mode),
        inpaint(reference, torch.zeros(1, PX, PX), invert=True, mode=mode),
        image_to_image(reference, 0),
    ):
        out = run(var, vae, spec, more_smooth=more_smooth)
        assert same_tokens(out, free)
        assert (out.f_hat is None) == (free.f_hat is None) and torch.equal(decode(vae, out), decode(vae, free))


@pytest.mark.parametrize("mode", ["tokens", "latent blend"])
def test_kept_tokens_never_change(var, vae, mode):
    ref = random_reference(2)
    spec = inpaint(ref, hole(), mode=mode)
    keep = spec.keep_masks(PN, PX)
    assert [int(m.sum()) for m in keep] == [1, 3, 6, 12]
    guide = spec.bind(vae, PN, 2)
    regenerated_differ = False
    for seed in range(3):
        out = run(var, vae, spec, seed=seed, cfg=2.0)
        for si in range(K):
            keep_Bpp = keep[si].expand(2, -1, -1)
            assert torch.equal(out.indices[si][keep_Bpp], ref.indices[si][keep_Bpp]), (seed, si)
            assert torch.equal(guide.forced(si), keep_Bpp.flatten(1))
        regen = ~keep[-1].expand(2, -1, -1)
        regenerated_differ |= bool((out.indices[-1][regen] != ref.indices[-1][regen]).any())
    assert regenerated_differ  # the hole is sampled, not copied


def test_image_to_image_strength(var, vae, reference):
    ref = random_reference(2, seed=3)
    free = run(var, vae, None)
    assert same_tokens(run(var, vae, image_to_image(ref, 0)), free)
    assert same_tokens(run(var, vae, image_to_image(ref, K)), ref)
    out = run(var, vae, image_to_image(ref, 2))
    assert all(torch.equal(out.indices[si], ref.indices[si]) for si in range(2))
    assert not torch.equal(out.indices[-1], ref.indices[-1])  # the fine scales are sampled
    guide = image_to_image(ref, 2).bind(vae, PN, 2)
    assert [bool(guide.forced(si).all()) for si in range(K)] == [True, True, False, False]
    assert not guide.forced(3).any()
    with pytest.raises(NextScaleError, match=r"strength 5 must lie in 0\.\.4"):
        image_to_image(ref, K + 1)


def test_latent_blend_keeps_the_kept_region_of_f_hat(var, vae):
    ref = random_reference(2, seed=4)
    ref_fhat = [vae.indices_to_fhat(ref.flat(), PN, upto=si + 1) for si in range(K)]
    keep_latent = keep_masks(1 - hole(), PN)[-1][:, None].expand(2, CVAE, -1, -1)  # the 4x4 latent grid
    seen = {}
    for mode in ("tokens", "latent blend"):
        spec = inpaint(ref, hole(), mode=mode)
        seen[mode] = []
        hooks = SamplerHooks(guide=spec.bind(vae, PN, 2),
                             callback=lambda si, K_, f, mode=mode: seen[mode].append(f.clone()))
        out = sample(var, vae, torch.tensor([1, 2]), seed=9, options=SamplingOptions(), hooks=hooks)
        if mode == "latent blend":
            assert out.f_hat is not None and torch.equal(out.f_hat, seen[mode][-1])
            assert torch.equal(decode(vae, out), vae.fhat_to_img(seen[mode][-1]))
        else:
            assert out.f_hat is None
    blend = seen["latent blend"]
    assert torch.equal(blend[0], ref_fhat[0])  # the 1x1 scale is kept whole
    for si in range(K):
        assert torch.equal(blend[si][keep_latent], ref_fhat[si][keep_latent]), si
        assert not torch.equal(blend[si][~keep_latent], ref_fhat[si][~keep_latent]) or si == 0
    # Token replacement alone lets sampled codes leak into the kept region (bicubic upsampling, Phi's conv).
    assert any(not torch.equal(f[keep_latent], r[keep_latent]) for f, r in zip(seen["tokens"], ref_fhat))


def test_scale_range(var, vae):
    ref = random_reference(2, seed=5)
    free = run(var, vae, None)
    out = run(var, vae, EditSpec(ref, None, start_scale=1, end_scale=3))
    assert torch.equal(out.indices[0], free.indices[0])  # before the range: the unguided draw
    assert all(torch.equal(out.indices[si], ref.indices[si]) for si in (1, 2))
    assert not torch.equal(out.indices[3], ref.indices[3])
    guide = EditSpec(ref, hole(), start_scale=2).bind(vae, PN, 2)
    assert not guide.forced(0).any() and not guide.forced(1).any()  # the small-scale rule acts only in range
    assert [int(guide.forced(si)[0].sum()) for si in (2, 3)] == [6, 12]
    assert same_tokens(run(var, vae, EditSpec(ref, hole(), end_scale=K)), run(var, vae, EditSpec(ref, hole())))
    with pytest.raises(NextScaleError, match=r"scale range 3\.\.2 does not fit the reference's 4 scales"):
        EditSpec(ref, None, start_scale=3, end_scale=2)
    with pytest.raises(NextScaleError, match=r"end_scale <= 4"):
        EditSpec(ref, None, end_scale=5)


def test_batches(var, vae):
    one = random_reference(1, seed=6)
    out = run(var, vae, inpaint(one, torch.zeros(PX, PX)), labels=(1, 2, 3))
    assert all(torch.equal(x, y.expand(3, -1, -1)) for x, y in zip(out.indices, one.indices))  # broadcast
    masks = torch.stack((torch.zeros(PX, PX), torch.ones(PX, PX), hole()[0]))  # keep all, keep nothing, a hole
    out = run(var, vae, inpaint(one, masks), labels=(1, 2, 3))
    free = run(var, vae, None, labels=(1, 2, 3))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(out.indices, one.indices))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(out.indices, free.indices))
    keep = keep_masks(1 - hole(), PN)
    assert all(torch.equal(x[2][k[0]], y[0][k[0]]) for x, y, k in zip(out.indices, one.indices, keep))
    with pytest.raises(NextScaleError, match="reference tokens holds 2 images but the sampler makes 3"):
        inpaint(random_reference(2), hole()).bind(vae, PN, 3)
    with pytest.raises(NextScaleError, match="mask holds 2 images but the sampler makes 3"):
        inpaint(one, hole().repeat(2, 1, 1)).bind(vae, PN, 3)
    with pytest.raises(NextScaleError, match="the mask holds 2 masks but the reference tokens hold 3 images"):
        inpaint(random_reference(3), hole().repeat(2, 1, 1))


def test_spec_errors(vae):
    ref = random_reference(1)
    with pytest.raises(NextScaleError, match="edit mode 'blend' is not one of tokens, latent blend"):
        inpaint(ref, hole(), mode="blend")
    with pytest.raises(NextScaleError, match="the mask is 12x8 px but the tokens are a square grid"):
        inpaint(ref, torch.zeros(1, 8, 12))
    with pytest.raises(NextScaleError, match=r"shape \[batch, height, width\]"):
        inpaint(ref, torch.zeros(1, 1, 8, 8))
    with pytest.raises(NextScaleError, match=r"schedule \(1, 2, 3, 4\) but the generator samples \(1, 2, 4\)"):
        inpaint(ref, hole()).bind(vae, (1, 2, 4), 1)
    too_big = NextScaleTokens([torch.full_like(i, VOCAB) for i in ref.indices], PN)
    with pytest.raises(NextScaleError, match=f"codes up to {VOCAB}.*{VOCAB} codes"):
        inpaint(too_big, hole()).bind(vae, PN, 1)


def test_non_square_masks_are_fitted_like_the_image(vae):
    wide = torch.zeros(1, 8, 12)
    wide[:, :, :2], wide[:, :, 10:] = 1, 1  # only in the columns a centre crop removes
    assert torch.equal(fit_mask(wide, 8, "center crop"), torch.zeros(1, 8, 8))
    letterbox = fit_mask(torch.ones(1, 4, 8), 8, "pad")
    assert letterbox[0, 2:6].min() == 1 and letterbox[0, :2].max() == 0 and letterbox[0, 6:].max() == 0
    ref = random_reference(1)
    guide = inpaint(ref, wide, resize="center crop").bind(vae, PN, 1)
    assert all(guide.forced(si).all() for si in range(K))  # nothing of the crop is regenerated


def test_composite_keeps_masked_out_pixels_bit_identical():
    g = torch.Generator().manual_seed(7)
    decoded, image = torch.rand(2, PX, PX, 3, generator=g), torch.rand(1, PX, PX, 4, generator=g)  # RGBA image
    mask = torch.zeros(1, PX, PX)
    mask[:, 2:5, 3:7], mask[:, 6:, :] = 1.0, 0.3
    out = composite(decoded, image, mask)
    zero, one = (mask[0] == 0), (mask[0] == 1)
    assert out.shape == decoded.shape
    assert torch.equal(out[:, zero], image[0, zero, :3].expand(2, -1, -1))
    assert torch.equal(out[:, one], decoded[:, one])
    torch.testing.assert_close(out[:, 6:], 0.7 * image[:, 6:, :, :3] + 0.3 * decoded[:, 6:])
    with pytest.raises(NextScaleError, match="composite_mask is 8x8 px but composite_image is 6x8 px"):
        composite(decoded, image[:, :, :6], mask)
    with pytest.raises(NextScaleError, match="composite_mask is 8x4 px"):
        composite(decoded, image, mask[:, :4])
    with pytest.raises(NextScaleError, match="composite_image is 8x8 px but NextScale Encode fitted a 20x12 px"):
        composite(decoded, image, mask, ImageFit(12, 20, PX, "pad"))
    with pytest.raises(NextScaleError, match="composite_mask holds 3 items but 2 images were decoded"):
        composite(decoded, image, mask.repeat(3, 1, 1))


def gradient(h: int, w: int) -> torch.Tensor:
    """``(1, 3, h, w)`` in -1..1: x, y and x + y ramps, which resampling keeps (up to its edges)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((x, y, (x + y) / 2))[None]


@pytest.mark.parametrize("mode", ["center crop", "stretch", "pad"])
@pytest.mark.parametrize("h, w", [(120, 200), (200, 120), (96, 96)])
def test_fit_undo_is_the_inverse_of_fit_square(mode, h, w):
    image = gradient(h, w)
    fit = ImageFit(h, w, 64, mode)
    square = fit_square(image, 64, mode)
    for resolution in (64, 256):  # the decoded square at the model's side, or a larger one
        back, covered = fit.undo(torch.nn.functional.interpolate(square, size=resolution, mode="bilinear"))
        assert back.shape == (1, 3, h, w) and covered.shape == (h, w)
        # away from the edges of what the square holds, where bicubic resampling reaches across (2 square px)
        inner = torch.zeros(h, w, dtype=torch.bool)
        inner[8:-8, 8:-8] = True
        inner &= torch.nn.functional.max_pool2d(1 - covered[None], 17, 1, 8)[0] == 0
        assert (back[0][:, inner] - image[0][:, inner]).abs().max() < 0.05, (mode, h, w, resolution)
    if mode == "center crop" and h != w:  # the crop keeps the middle square of the picture
        assert covered.sum() == min(h, w) ** 2
        middle = covered[h // 2] if w > h else covered[:, w // 2]
        assert abs(int(middle.nonzero()[0]) - (max(h, w) - min(h, w)) // 2) <= 1  # fit_square's whole-pixel crop
    else:
        assert covered.min() == 1


def test_feather_softens_only_near_the_border():
    mask = torch.zeros(1, 30, 40)
    mask[:, 10:20, 15:25] = 1
    assert torch.equal(feather(mask, 0), mask)
    soft = feather(mask, 4)
    assert soft[0, 15, 20] > 1 - 1e-6 and soft[0, :5].max() == 0 and soft[0, :, :10].max() == 0
    assert 0 < soft[0, 10, 20] < 1 and 0 < soft[0, 9, 20] < 1
    edge = torch.zeros(1, 30, 40)
    edge[:, :, :8] = 1  # an outpainting band on the picture's border stays 1 there
    assert feather(edge, 4)[0, :, 0].min() > 1 - 1e-6


@pytest.mark.parametrize("mode", ["center crop", "stretch", "pad"])
def test_composite_at_the_pictures_own_size(mode):
    """A 120x200 picture, a mask from the mask editor (1 = painted) and 64 px decoded squares: the composite is at
    120x200, the picture itself away from the mask, the decoded square (undone) inside it."""
    g = torch.Generator().manual_seed(3)
    picture = torch.rand(1, 120, 200, 3, generator=g)
    mask = torch.zeros(1, 120, 200)
    mask[:, 40:80, 80:120] = 1
    fit = ImageFit(120, 200, 64, mode)
    decoded = (gradient(64, 64).permute(0, 2, 3, 1) + 1) / 2
    undone = (fit.undo(decoded.permute(0, 3, 1, 2))[0].clamp(0, 1)).permute(0, 2, 3, 1)
    hard = composite(decoded, picture, mask, fit, 0)
    assert hard.shape == (1, 120, 200, 3)
    assert torch.equal(hard[0][mask[0] == 0], picture[0][mask[0] == 0])
    torch.testing.assert_close(hard[0][mask[0] == 1], undone[0][mask[0] == 1])
    soft = composite(decoded, picture, mask, fit, 6)
    far = feather(mask, 6)[0] == 0
    assert torch.equal(soft[0][far], picture[0][far]) and not torch.equal(soft, hard)
    small_mask = torch.nn.functional.interpolate(mask[None], size=(60, 100))[0]  # same aspect, other size
    away = (feather(mask, 2)[0] == 0) | (feather(1 - mask, 2)[0] == 0)  # the upscaled mask's edges are soft
    torch.testing.assert_close(composite(decoded, picture, small_mask, fit, 0)[0][away], hard[0][away])
    with pytest.raises(NextScaleError, match="composite_mask is 64x64 px but composite_image is 200x120 px"):
        composite(decoded, picture, torch.ones(1, 64, 64), fit)


def test_inpaint_composite_end_to_end(var, vae, reference):
    """Sample with a hole, decode, paste into the reconstruction: outside the hole the pixels are untouched."""
    out = run(var, vae, inpaint(reference, hole()))
    original = (vae.indices_to_img(reference.flat(), PN).permute(0, 2, 3, 1) + 1) / 2
    decoded = (decode(vae, out).permute(0, 2, 3, 1) + 1) / 2
    result = composite(decoded, original, hole())
    assert torch.equal(result[:, 4:], original[:, 4:]) and torch.equal(result[:, :, 4:], original[:, :, 4:])
    assert torch.equal(result[:, :4, :4], decoded[:, :4, :4])


NODE_CHECK = textwrap.dedent(
    """
    import torch
    from comfy_api.latest import io
    from nextscale.models.var.editing import EditSpec
    from nextscale.models.core.errors import NextScaleError
    from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig
    from nextscale.models.core.tokens import NextScaleTokens
    from nextscale.nodes import NODE_MODULES
    from nextscale.nodes.editing import NextScaleImageToImageGuide, NextScaleInpaintGuide
    from nextscale.nodes.generator import NextScaleSampler
    from nextscale.nodes.tokenizer import NextScaleDecode
    from test_sampler import CVAE, PN, VOCAB, make_var

    ids = lambda node: [(i.id, bool(i.optional)) for i in node.define_schema().inputs]
    assert ids(NextScaleSampler)[-5:] == [("options", True), ("guide", True), ("control", True), ("kv_policy", True),
                                          ("accel", True)]
    assert ids(NextScaleDecode) == [("tokenizer", False), ("tokens", False), ("scales", False),
                                    ("composite_image", True), ("composite_mask", True), ("feather", True)]
    assert ids(NextScaleInpaintGuide) == [("tokens", False), ("mask", False), ("invert", False), ("mode", False),
                                          ("start_scale", False), ("end_scale", False)]
    assert any(NextScaleInpaintGuide in m.NODES for m in NODE_MODULES)
    assert NextScaleInpaintGuide.define_schema().outputs[0].io_type == "NEXTSCALE_GUIDE"

    from nextscale.nodes.service import adopt  # a module as the NextScaleModel a socket carries

    torch.manual_seed(0)
    cfg = TokenizerConfig(vocab_size=VOCAB, z_channels=CVAE, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)
    vae, var = MultiScaleVQVAE(cfg).eval(), make_var()
    ref = NextScaleTokens([torch.randint(VOCAB, (1, p, p)) for p in PN], PN, source="encoded")
    mask = torch.zeros(1, 8, 8)
    mask[:, :4, :4] = 1
    spec = NextScaleInpaintGuide.execute(ref, mask, False, "tokens", 0, 0).result[0]
    assert isinstance(spec, EditSpec) and spec.scales == range(0, 4) and torch.equal(spec.regenerate, mask)
    assert torch.equal(NextScaleInpaintGuide.execute(ref, mask, True, "latent blend", 1, 3).result[0].regenerate, 1 - mask)
    for start, end in ((2, 2), (4, 0), (0, 5)):
        try:
            NextScaleInpaintGuide.execute(ref, mask, False, "tokens", start, end)
            raise AssertionError((start, end))
        except NextScaleError as e:
            assert "these tokens have 4 scales" in str(e), e
    assert NextScaleInpaintGuide.validate_inputs("latent blend") is True
    assert "not one of the choices" in NextScaleInpaintGuide.validate_inputs("blend")

    NextScaleSampler.hidden = io.HiddenHolder.from_dict({})
    run = lambda guide: NextScaleSampler.execute(adopt(var), adopt(vae), "3", 5, 2.0, 0, 0.0, False, 2, "",
                                                 {"preview": False}, guide).result[0]
    everything = run(NextScaleImageToImageGuide.execute(ref, 4).result[0])
    assert all(torch.equal(x, y.expand(2, -1, -1)) for x, y in zip(everything.indices, ref.indices))
    free, unguided = run(NextScaleImageToImageGuide.execute(ref, 0).result[0]), run(None)
    assert all(torch.equal(x, y) for x, y in zip(free.indices, unguided.indices))
    inpainted = run(spec)
    assert torch.equal(inpainted.indices[-1][:, 2:, :], ref.indices[-1][:, 2:, :].expand(2, -1, -1))

    plain = NextScaleDecode.execute(adopt(vae), inpainted, 0).result[0]
    image = torch.rand(1, 8, 8, 3)
    pasted = NextScaleDecode.execute(adopt(vae), inpainted, 0, image, mask, 0).result[0]
    keep = mask[0] == 0
    assert torch.equal(pasted[:, keep], image[0, keep].expand(2, -1, -1))
    assert torch.equal(pasted[:, ~keep], plain[:, ~keep])
    try:
        NextScaleDecode.execute(adopt(vae), inpainted, 0, image, None)
        raise AssertionError("composite without a mask")
    except NextScaleError as e:
        assert "both composite_image and composite_mask" in str(e)

    # a picture of its own size and aspect (20x12 px, Pad Image for Outpainting's mask: 1 on the new borders)
    # through Encode, the inpaint guide, the sampler and Decode's composite, for every resize mode
    from nextscale.nodes.tokenizer import NextScaleEncode
    picture = torch.rand(1, 12, 20, 3)
    border = torch.zeros(1, 12, 20)
    border[:, :, :4], border[:, :, 16:] = 1, 1
    for resize in ("pad", "center crop", "stretch"):
        encoded = NextScaleEncode.execute(adopt(vae), picture, resize).result[0]
        fit = encoded.extra["fit"]
        assert (fit.height, fit.width, fit.side, fit.mode) == (12, 20, 8, resize), fit
        guide = NextScaleInpaintGuide.execute(encoded, border, False, "tokens", 0, 0).result[0]
        edited = run(guide)
        assert edited.extra["fit"] == fit
        for width in (0, 3):
            out = NextScaleDecode.execute(adopt(vae), edited, 0, picture, border, width).result[0]
            assert out.shape == (2, 12, 20, 3), out.shape
            kept = border[0] == 0 if width == 0 else (border[0] == 0) & (torch.arange(20) >= 7) & (torch.arange(20) < 13)
            assert torch.equal(out[:, kept], picture[0, kept].expand(2, -1, -1)), (resize, width)
    try:
        NextScaleInpaintGuide.execute(encoded, torch.ones(1, 8, 8), False, "tokens", 0, 0)
        raise AssertionError("a square mask for a 20x12 picture")
    except NextScaleError as e:
        assert "the mask is 8x8 px but the encoded image is 20x12 px" in str(e), e
    print("nodes ok")
    """  # noqa: E501 (lines of the script above; wrapping them would change the string)
)


def test_nodes_in_comfyui(tmp_path):
    """The guide nodes, the sampler's guide input and the decoder's composite, called in ComfyUI's python."""
    result = run_in_comfyui_python(NODE_CHECK, cwd=tmp_path)
    assert result.returncode == 0 and "nodes ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
