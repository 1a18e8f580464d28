"""Training-free editing for Infinity: inpaint, outpaint and image to image with a prompt, bit by bit.

The guides are VAR's (:class:`~..var.editing.EditSpec`, made by NextScale Inpaint Guide and Image to Image Guide)
with a reference encoded by the BSQ tokenizer (:class:`~..core.tokens.NextScaleBitTokens`, NextScale Encode with
an Infinity tokenizer). :func:`bind_bits` turns one into the :class:`MaskedBits` guide of one sampler run:

- Kept cells: the same per-scale keep maps as VAR's (:meth:`EditSpec.scale_masks`: each cell's area average of the
  keep mask above ``threshold``, scales of at most ``small_tokens`` cells kept whole for an image that keeps
  anything, the ``start_scale .. end_scale`` range), on the tokenizer's latent ``(h, w)`` grids.
- "tokens" mode: at each guided scale every bit of a kept cell takes the reference's bit; the other cells' bits are
  sampled from the transformer, which has seen the reference's bits at the kept cells of every earlier scale.
- "latent blend" mode: the same, and after every guided scale the summed codes (Infinity's accumulated latent, the
  sum of every scale's codes upsampled to the final grid) are reset to the reference's cumulative sum wherever the
  last scale keeps (everywhere at a small scale kept whole). The next scale's input is made from the reset sum, and
  the kept area of the final sum is exactly the reference's.
- Batches: the reference and the mask hold 1 image (used for every sampled image) or as many as the sampler
  makes; a sub-batch binds ``spec.images(start, stop, batch)``, so it gets the bits of the unsplit batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import NextScaleError
from ..core.tokens import NextScaleBitTokens
from ..var.editing import EditSpec
from .bsq import BSQTokenizer
from .sampler import BitGuide


class MaskedBits(BitGuide):
    """The bitwise guide of one run (made by :func:`bind_bits`): per scale, the kept cells ``(B, h, w, 1)`` (None:
    nothing kept) and the reference's bits ``(B, h, w, d)``; in latent-blend mode, the area ``(B, 1, H, W)`` and the
    reference's cumulative summed codes ``(B, d, H, W)`` of each scale that blends."""

    def __init__(
        self,
        keep: list[torch.Tensor | None],
        reference_bits: list[torch.Tensor],
        blend: dict[int, torch.Tensor],
        reference_summed: dict[int, torch.Tensor],
    ):
        self.keep, self.reference_bits = keep, reference_bits
        self.blend, self.reference_summed = blend, reference_summed

    def apply(self, si: int, bits_Bhwd: torch.Tensor) -> torch.Tensor:
        keep_Bhw1 = self.keep[si]
        if keep_Bhw1 is None:
            return bits_Bhwd
        return torch.where(keep_Bhw1, self.reference_bits[si], bits_Bhwd)

    def override_summed(self, si: int, summed_BdHW: torch.Tensor) -> torch.Tensor | None:
        if si not in self.blend:
            return None
        return torch.where(self.blend[si], self.reference_summed[si], summed_BdHW)


def check_reference(spec: EditSpec, scales: Sequence[Sequence[int]], codebook_dim: int, batch_size: int) -> None:
    """Refuse a guide whose reference cannot steer an Infinity run on the latent grids ``scales`` with a
    ``codebook_dim``-bit tokenizer making ``batch_size`` images: VAR tokens, other grids or bits, batches that do not
    match."""
    ref = spec.reference
    if not isinstance(ref, NextScaleBitTokens):
        raise NextScaleError(
            "the guide's reference tokens were encoded by a VAR tokenizer: encode the image with the Infinity "
            "tokenizer (NextScale Load Infinity's tokenizer into NextScale Encode, schedule = this sampler's "
            "resolution and aspect ratio, e.g. '0.06M' for the embedded model)"
        )
    scales = tuple((int(h), int(w)) for h, w in scales)
    if ref.scales != scales:
        patched = ref.scales == tuple((h // 2, w // 2) for h, w in scales)
        raise NextScaleError(
            f"the guide's reference was encoded on the latent grids {list(ref.scales)} but this run samples "
            f"{list(scales)}: "
            + ("this model takes 2 x 2 latent cells a token (Infinity-8B): connect it to NextScale Encode's 'model' "
               "input, which encodes on grids twice as fine" if patched else
               "set NextScale Encode's schedule to this sampler's resolution and aspect ratio (e.g. '0.06M' or "
               "'1M 4:3')")
        )
    if ref.codebook_dim != codebook_dim:
        raise NextScaleError(
            f"the guide's reference has {ref.codebook_dim} bits per cell but this tokenizer codes {codebook_dim}: "
            f"encode the image with the tokenizer the sampler uses"
        )
    spec.check_batch(batch_size)


def bind_bits(
    spec: EditSpec,
    tokenizer: BSQTokenizer,
    scales: Sequence[Sequence[int]],
    batch_size: int,
    device: str | torch.device | None = None,
) -> MaskedBits:
    """The :class:`MaskedBits` of one Infinity run of ``batch_size`` images on the tokenizer's latent grids
    ``scales`` (:func:`~.sampler.latent_scales`); its tensors are on ``device`` (default: the reference's)."""
    check_reference(spec, scales, tokenizer.codebook_dim, batch_size)
    ref = spec.reference
    device = torch.device(device) if device is not None else ref.bits[0].device
    side = max(ref.scales[-1]) * tokenizer.downsample
    masks, blend = spec.scale_masks(ref.scales, side)
    keep = [None if m is None else m[..., None].expand(batch_size, -1, -1, -1).to(device) for m in masks]
    reference_bits = [b.to(device, torch.bool).expand(batch_size, -1, -1, -1) for b in ref.bits]
    reference_summed = {}
    if blend:
        bits = [b.to(device) for b in ref.bits[: max(blend) + 1]]
        for si, summed_BdHW in enumerate(tokenizer.running_summed_codes(bits, ref.scales[-1])):
            if si in blend:
                reference_summed[si] = summed_BdHW.expand(batch_size, -1, -1, -1)
    blend = {si: where.to(device).expand(batch_size, -1, -1, -1) for si, where in blend.items()}
    return MaskedBits(keep, reference_bits, blend, reference_summed)
