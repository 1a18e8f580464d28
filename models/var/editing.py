"""Training-free editing by teacher forcing: inpaint, outpaint, class edit, image-to-image (docs/editing.md).

The sampler draws every scale as usual; an :class:`EditGuide` then puts the reference image's tokens back where
they are to be kept, so the transformer sees the reference there and continues it elsewhere.

Conventions:
- Masks follow ComfyUI: ``regenerate`` ``(B, H, W)`` in 0..1, **1 = regenerate** (inpaint this area, the area that
  "Pad Image for Outpainting" adds), 0 = keep the reference. ``keep = 1 - regenerate``.
- Per-scale masks (:func:`keep_masks`): the area average of ``keep`` over each cell of the ``pn x pn`` grid; a token
  is kept when it is above ``threshold`` (0.5, the rule of VAR's edit demo). Scales with at most ``small_tokens``
  (3) tokens are kept whole, as in the demo, except for an image whose mask keeps nothing on the latent grid: that
  one is sampled freely at every scale, so an all-regenerate mask equals unguided sampling.
- Scale range: the guide acts on scales ``start_scale <= si < end_scale`` (counted from 0, the 1x1 scale;
  ``end_scale`` None = through the last scale). Outside it every token is sampled.
- Modes: "tokens" (the demo): the drawn indices are replaced by the reference's where kept, and ``f_hat``
  accumulates as usual. "latent blend" (CoDe's variant): the same replacement, and after every scale in range the
  accumulated latent is reset to the reference's cumulative latent of that scale wherever the latent-grid mask
  keeps (everywhere at the small scales), so the kept region of ``f_hat`` is exactly the reference's at every
  scale. The sampler then returns that ``f_hat``, which decoders prefer to the indices.
- Image-to-image (:func:`image_to_image`): strength ``k`` keeps every token of the first ``k`` scales (layout and
  colours come from the reference, details are sampled); 0 is unguided sampling, all scales the reference itself.
- Class editing is inpainting with another class label on the sampler.
- Batches: the reference holds 1 image (used for every sampled image) or as many as the sampler makes; so does
  the mask.
- The reference's indices are used (never its soft ``f_hat``): teacher forcing needs tokens.

:class:`EditSpec` is what flows on the NEXTSCALE_GUIDE socket: device-free and never modified. A sampler run calls
``spec.bind(tokenizer, patch_nums, batch_size, device)`` for the :class:`~.sampler.Guide` it uses; Infinity's
sampler binds a spec whose reference is bits with :func:`~..infinity.editing.bind_bits` (the same masks, bitwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError
from ..core.hooks import Guide
from ..core.imageops import RESIZE_MODES, ImageFit, fit_square
from ..core.tokens import NextScaleBitTokens, NextScaleTokens, check_tokenizer_kind

EDIT_MODES = ("tokens", "latent blend")
KEEP_THRESHOLD = 0.5
SMALL_SCALE_TOKENS = 3


def _as_mask_batch(mask: torch.Tensor, what: str) -> torch.Tensor:
    """``(B, H, W)`` float32 on the CPU in 0..1 from a ``(H, W)`` or ``(B, H, W)`` mask."""
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3 or mask.shape[0] == 0 or min(mask.shape[1:]) == 0:
        raise NextScaleError(f"{what} must have shape [batch, height, width], got {list(mask.shape)}")
    return mask.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1)


def check_batch(what: str, size: int, batch_size: int) -> None:
    """Refuse a reference or mask of ``size`` images for a run of ``batch_size`` (1 or ``batch_size`` fit)."""
    if size not in (1, batch_size):
        raise NextScaleError(
            f"the {what} holds {size} images but the sampler makes {batch_size}: give 1 (used for every image) "
            f"or exactly {batch_size}"
        )


def fit_mask(mask_BHW: torch.Tensor, side: int, resize: str) -> torch.Tensor:
    """``(B, side, side)``: a mask fitted to the model's square the way :func:`~.imageops.fit_square` fits the image
    with the same ``resize`` mode (the same crop, stretch or letterbox); letterbox bands are 0."""
    img_B3HW = mask_BHW.float()[:, None].expand(-1, 3, -1, -1).mul(2).sub(1)
    return fit_square(img_B3HW, side, resize)[:, 0].add(1).mul(0.5).clamp(0, 1)


def grid_hw(grid: int | Sequence[int]) -> tuple[int, int]:
    """``(h, w)`` of a scale's grid written as a square side (VAR) or as ``(h, w)`` (Infinity)."""
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def keep_masks(
    keep_BHW: torch.Tensor,
    grids: Sequence[int | Sequence[int]],
    threshold: float = KEEP_THRESHOLD,
    small_tokens: int = SMALL_SCALE_TOKENS,
) -> list[torch.Tensor]:
    """Bool ``(B, h, w)`` per scale, True where the reference's token is kept (see the module docstring).

    ``keep_BHW`` is a mask in 0..1, 1 = keep, at any resolution, stretched onto each grid; ``grids`` are square
    sides or ``(h, w)`` pairs.
    """
    keep_B1HW = keep_BHW.float()[:, None]
    grids = [grid_hw(g) for g in grids]
    keeps_any_B = (F.interpolate(keep_B1HW, size=grids[-1], mode="area") > threshold).flatten(1).any(dim=1)
    masks = []
    for h, w in grids:
        if h * w <= small_tokens:
            masks.append(keeps_any_B.view(-1, 1, 1).expand(-1, h, w).clone())
        else:
            masks.append(F.interpolate(keep_B1HW, size=(h, w), mode="area")[:, 0] > threshold)
    return masks


@dataclass(frozen=True, eq=False)
class EditSpec:
    """What an edit keeps of a reference (see the module docstring); build it with :func:`inpaint` or
    :func:`image_to_image`.

    Attributes:
        reference: the tokens to keep (NextScale Encode's output, or any sampled tokens): VAR's token maps, or an
            Infinity tokenizer's bits (bound by :func:`~..infinity.editing.bind_bits` for Infinity's sampler).
        regenerate: ``(B, H, W)`` mask in 0..1, 1 = regenerate; None keeps everything (in the scale range).
        mode: "tokens" or "latent blend".
        start_scale, end_scale: the guide acts on scales ``start_scale <= si < end_scale`` (None: to the end).
        threshold: a token is kept when its cell's average keep value is above this.
        small_tokens: scales with at most this many tokens are kept whole (for images that keep anything).
        resize: how the image was fitted to the model's square (NextScale Encode's mode), used to fit a mask that
            is not square; None: a mask must be square, unless the grids are not (an Infinity aspect ratio's, onto
            which the mask is stretched as the image was).
    """

    reference: NextScaleTokens | NextScaleBitTokens
    regenerate: torch.Tensor | None = None
    mode: str = "tokens"
    start_scale: int = 0
    end_scale: int | None = None
    threshold: float = KEEP_THRESHOLD
    small_tokens: int = SMALL_SCALE_TOKENS
    resize: str | None = None

    def __post_init__(self):
        K = self.reference.num_scales
        if self.mode not in EDIT_MODES:
            raise NextScaleError(f"edit mode '{self.mode}' is not one of {', '.join(EDIT_MODES)}")
        end = K if self.end_scale is None else self.end_scale
        if not 0 <= self.start_scale <= end <= K:
            raise NextScaleError(
                f"scale range {self.start_scale}..{end} does not fit the reference's {K} scales: "
                f"need 0 <= start_scale <= end_scale <= {K}"
            )
        if not 0.0 <= self.threshold < 1.0:
            raise NextScaleError(f"the keep threshold must lie in [0, 1), got {self.threshold}")
        if self.resize is not None and self.resize not in RESIZE_MODES:
            raise NextScaleError(f"resize mode '{self.resize}' is not one of {', '.join(RESIZE_MODES)}")
        if self.regenerate is None:
            return
        mask = _as_mask_batch(self.regenerate, "the mask")
        object.__setattr__(self, "regenerate", mask)
        Bm, H, W = mask.shape
        if H != W and self.resize is None and len(set(grid_hw(self.reference.schedule[-1]))) == 1:
            raise NextScaleError(
                f"the mask is {W}x{H} px but the tokens are a square grid, and how the image was fitted to a square "
                f"is unknown: encode the image with NextScale Encode (it records the fit), or give a square mask"
            )
        Br = self.reference.batch_size
        if Bm > 1 and Br > 1 and Bm != Br:
            raise NextScaleError(
                f"the mask holds {Bm} masks but the reference tokens hold {Br} images: give 1 mask (used for every "
                f"image) or exactly {Br}"
            )

    @property
    def scales(self) -> range:
        """The scales the guide acts on."""
        return range(self.start_scale, self.reference.num_scales if self.end_scale is None else self.end_scale)

    def __repr__(self) -> str:  # shown in ComfyUI debug output; keep it short
        mask = "keep all" if self.regenerate is None else f"mask {tuple(self.regenerate.shape)}"
        return (
            f"EditSpec({self.mode!r}, scales {self.scales.start}..{self.scales.stop - 1}, {mask}, "
            f"reference B={self.reference.batch_size})"
        )

    def check_batch(self, batch_size: int) -> None:
        """Refuse a reference or mask that is neither one image nor ``batch_size`` images."""
        check_batch("reference tokens", self.reference.batch_size, batch_size)
        if self.regenerate is not None:
            check_batch("mask", self.regenerate.shape[0], batch_size)

    def images(self, start: int, stop: int, batch_size: int) -> EditSpec:
        """The edit of images ``start .. stop - 1`` of a run of ``batch_size`` (a sub-batch): a reference or mask
        that holds one entry per image is cut to those images; one that holds a single entry serves every image."""
        self.check_batch(batch_size)
        reference, regenerate = self.reference, self.regenerate
        if reference.batch_size > 1:
            reference = reference.select(list(range(start, stop)))
        if regenerate is not None and regenerate.shape[0] > 1:
            regenerate = regenerate[start:stop]
        return replace(self, reference=reference, regenerate=regenerate)

    def keep_masks(self, grids: Sequence[int | Sequence[int]], pixel_side: int) -> list[torch.Tensor]:
        """Bool ``(Bm, h, w)`` per scale of the whole schedule (the scale range is not applied); ``grids`` are
        square sides or ``(h, w)`` pairs; ``pixel_side`` is the model's image side, used only to fit a non-square
        mask."""
        if self.regenerate is None:
            return [torch.ones(1, *grid_hw(g), dtype=torch.bool) for g in grids]
        regenerate = self.regenerate
        if regenerate.shape[1] != regenerate.shape[2] and self.resize is not None:
            regenerate = fit_mask(regenerate, pixel_side, self.resize)
        return keep_masks(1 - regenerate, grids, self.threshold, self.small_tokens)

    def scale_masks(
        self, grids: Sequence[int | Sequence[int]], pixel_side: int
    ) -> tuple[list[torch.Tensor | None], dict[int, torch.Tensor]]:
        """What a run keeps, for every family's binding: per scale the bool ``(Bm, h, w)`` kept cells (None: the
        scale is outside the range or keeps nothing), and in latent-blend mode, per scale in range, the bool
        ``(Bm, 1, H, W)`` area of the final latent grid reset to the reference's cumulative latent after it (the
        last scale's kept cells, everywhere at a small scale kept whole; absent where that is nowhere)."""
        masks = self.keep_masks(grids, pixel_side)
        in_range = set(self.scales)
        keep = [m if si in in_range and bool(m.any()) else None for si, m in enumerate(masks)]
        blend = {}
        if self.mode == "latent blend":
            latent_B1HW = masks[-1][:, None]  # the last scale's grid is the latent grid
            for si in self.scales:  # every scale in range, each image on its own masks (sub-batches give the same)
                h, w = masks[si].shape[1:]
                whole_B111 = masks[si].flatten(1).all(dim=1).view(-1, 1, 1, 1)  # a small-scale (whole) mask
                where_B1HW = latent_B1HW | whole_B111 if h * w <= self.small_tokens else latent_B1HW
                if bool(where_B1HW.any()):
                    blend[si] = where_B1HW
        return keep, blend

    def bind(
        self, tokenizer, patch_nums: Sequence[int], batch_size: int, device: str | torch.device | None = None
    ) -> EditGuide:
        """The :class:`EditGuide` for one sampler run of ``batch_size`` images with ``tokenizer`` (a
        ``MultiScaleVQVAE``) on the schedule ``patch_nums``; its token tensors and latents are on ``device`` (the
        sampling device; default: the reference tokens')."""
        patch_nums = tuple(int(p) for p in patch_nums)
        ref = self.reference
        if not isinstance(ref, NextScaleTokens):
            raise NextScaleError(
                "the guide's reference tokens are bits of an Infinity (BSQ) tokenizer: connect the guide to NextScale "
                "Sampler (Text), or encode the image with the tokenizer of this generator"
            )
        check_tokenizer_kind(ref, tokenizer.tokenizer_kind, "the guide's reference tokens")
        if patch_nums != ref.patch_nums:
            raise NextScaleError(
                f"the reference tokens have the schedule {ref.patch_nums} but the generator samples {patch_nums}: "
                f"encode the image with the generator's schedule"
            )
        self.check_batch(batch_size)
        quant = tokenizer.quantize
        top = max(int(i.max()) for i in ref.indices)
        if top >= quant.vocab_size:
            raise NextScaleError(
                f"the reference tokens use codes up to {top}, but the tokenizer has {quant.vocab_size} codes: "
                f"encode the image with the tokenizer the generator uses"
            )
        device = torch.device(device) if device is not None else ref.indices[0].device
        masks, blend = self.scale_masks(patch_nums, patch_nums[-1] * tokenizer.downsample)
        keep = [None if m is None else m.flatten(1).expand(batch_size, -1).contiguous().to(device) for m in masks]
        ref_Bl = [idx.flatten(1).expand(batch_size, -1).contiguous().to(device) for idx in ref.indices]
        ref_fhat = {}
        if blend:
            f_hat = torch.zeros(
                ref.batch_size, quant.channels, patch_nums[-1], patch_nums[-1], dtype=torch.float32, device=device
            )
            for si, pn in enumerate(patch_nums[: max(blend) + 1]):
                f_hat.add_(quant.contribution(si, patch_nums, quant.embed(ref.indices[si].to(device), pn)))
                if si in blend:
                    ref_fhat[si] = f_hat.clone()
        blend = {si: where.to(device) for si, where in blend.items()}
        return EditGuide(keep, ref_Bl, patch_nums, batch_size, blend, ref_fhat)


class EditGuide(Guide):
    """The sampler hook of one run (made by :meth:`EditSpec.bind`): per scale, the kept positions ``(B, pn*pn)``
    (None: nothing kept) and the reference's indices; in latent-blend mode, the latent mask and the reference's
    cumulative ``f_hat`` of each scale that blends."""

    def __init__(
        self,
        keep: list[torch.Tensor | None],
        reference_Bl: list[torch.Tensor],
        patch_nums: tuple[int, ...],
        batch_size: int,
        blend: dict[int, torch.Tensor] | None = None,
        reference_fhat: dict[int, torch.Tensor] | None = None,
    ):
        self.keep, self.reference_Bl = keep, reference_Bl
        self.patch_nums, self.batch_size = patch_nums, batch_size
        self.blend, self.reference_fhat = blend or {}, reference_fhat or {}

    def apply(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        keep_Bl = self.keep[si]
        if keep_Bl is None:
            return idx_Bl
        return torch.where(keep_Bl.to(idx_Bl.device), self.reference_Bl[si].to(idx_Bl.device), idx_Bl)

    def forced(self, si: int) -> torch.Tensor:
        keep_Bl = self.keep[si]
        if keep_Bl is None:
            return torch.zeros(self.batch_size, self.patch_nums[si] ** 2, dtype=torch.bool)
        return keep_Bl

    def override_fhat(self, si: int, f_hat: torch.Tensor) -> torch.Tensor | None:
        if si not in self.blend:
            return None
        return torch.where(self.blend[si], self.reference_fhat[si], f_hat)


def inpaint(
    reference: NextScaleTokens | NextScaleBitTokens,
    mask: torch.Tensor,
    *,
    invert: bool = False,
    mode: str = "tokens",
    start_scale: int = 0,
    end_scale: int | None = None,
    resize: str | None = None,
) -> EditSpec:
    """Inpaint / outpaint / class edit: regenerate where ``mask`` is 1 (ComfyUI's convention), or where it is 0
    with ``invert``; keep the reference's tokens elsewhere."""
    regenerate = _as_mask_batch(mask, "the mask")
    return EditSpec(
        reference,
        1 - regenerate if invert else regenerate,
        mode=mode,
        start_scale=start_scale,
        end_scale=end_scale,
        resize=resize,
    )


def image_to_image(reference: NextScaleTokens | NextScaleBitTokens, strength: int) -> EditSpec:
    """Keep every token of the first ``strength`` scales of the reference and sample the rest."""
    K = reference.num_scales
    if not 0 <= strength <= K:
        raise NextScaleError(f"strength {strength} must lie in 0..{K} (the number of scales kept of {K})")
    return EditSpec(reference, None, start_scale=0, end_scale=strength)


def feather(mask_BHW: torch.Tensor, width: int) -> torch.Tensor:
    """The mask with its edges softened over about ``width`` px on each side (a Gaussian of radius ``width``, sigma
    ``width / 3``; the image's border is extended, so a mask touching it stays 1 there); ``width`` 0: unchanged."""
    if width <= 0:
        return mask_BHW
    taps = torch.arange(-width, width + 1, dtype=torch.float32, device=mask_BHW.device)
    kernel = torch.exp(-0.5 * (taps * 3 / width) ** 2)
    kernel = (kernel / kernel.sum()).to(mask_BHW.dtype)
    x = mask_BHW[:, None]
    x = F.conv2d(F.pad(x, (width, width, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, width, width), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0].clamp(0, 1)


def composite(
    decoded_BHWC: torch.Tensor,
    image_BHWC: torch.Tensor,
    mask_BHW: torch.Tensor,
    fit: ImageFit | None = None,
    feather_px: int = 0,
) -> torch.Tensor:
    """The decoded squares pasted into ``image`` at the image's own size, in ComfyUI's IMAGE layout.

    ``fit`` is how NextScale Encode fitted the image to the model's square (None: its default, centre crop, which
    for a square image is a plain resize; a decoded picture that is not square, of an Infinity aspect ratio, is
    stretched onto the image, as Encode fits those); the decoded square is laid back onto the image's pixels by
    undoing it, upscaled where the image is larger. ``mask`` (1 = decoded, 0 = image, in between a blend) has the
    image's size or its aspect ratio, softened by :func:`feather` over ``feather_px`` pixels; where a centre crop
    cut the image off, the image is kept. With ``feather_px`` 0 the result is exactly ``image`` where the mask is 0
    and, for an image of the decoded size, exactly ``decoded`` where it is 1. ``image`` and ``mask`` hold 1 item or
    as many as ``decoded``."""
    B, side_h, side_w, _ = decoded_BHWC.shape  # square, or an Infinity aspect ratio's
    if image_BHWC.dim() != 4 or image_BHWC.shape[-1] not in (1, 3, 4):
        raise NextScaleError(
            f"composite_image must be an IMAGE [batch, height, width, 1/3/4 channels], got {list(image_BHWC.shape)}"
        )
    mask_BHW = _as_mask_batch(mask_BHW, "composite_mask")
    h, w = image_BHWC.shape[1:3]
    fit = fit or ImageFit(h, w, side_h, "center crop" if side_h == side_w else "stretch")
    if not fit.same_aspect(h, w):
        raise NextScaleError(
            f"composite_image is {w}x{h} px but NextScale Encode fitted a {fit.width}x{fit.height} px image: "
            f"connect the image that was encoded (or one of its aspect ratio)"
        )
    fit = ImageFit(h, w, fit.side, fit.mode)
    mh, mw = mask_BHW.shape[1:]
    if (mh, mw) != (h, w):
        if not fit.same_aspect(mh, mw):
            raise NextScaleError(
                f"composite_mask is {mw}x{mh} px but composite_image is {w}x{h} px: give the mask of that image "
                f"(the same size, or the same aspect ratio)"
            )
        mask_BHW = F.interpolate(mask_BHW[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    for what, n in (("composite_image", image_BHWC.shape[0]), ("composite_mask", mask_BHW.shape[0])):
        if n not in (1, B):
            raise NextScaleError(f"{what} holds {n} items but {B} images were decoded: give 1 or exactly {B}")
    device, dtype = decoded_BHWC.device, decoded_BHWC.dtype
    weight_BHW = feather(mask_BHW.to(device=device, dtype=dtype), feather_px)
    if (h, w) == (side_h, side_w):
        decoded = decoded_BHWC
    else:
        square, covered_hw = fit.undo(decoded_BHWC.permute(0, 3, 1, 2))
        decoded = square.clamp(0, 1).permute(0, 2, 3, 1).to(dtype)
        weight_BHW = weight_BHW * covered_hw.to(dtype)
    image = image_BHWC[..., :3] if image_BHWC.shape[-1] == 4 else image_BHWC.expand(-1, -1, -1, 3)
    image = image.to(device=device, dtype=dtype).expand(B, -1, -1, -1)
    return torch.lerp(image, decoded, weight_BHW[..., None].expand(B, -1, -1, 3))
