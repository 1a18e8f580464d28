"""Upscaling images of any size with a model of fixed input and output squares, and upstream's colour fixes.

Tiling: the input is resampled (bicubic) so that its upscale has the size asked for; tiles of the model's input
side cover it with at least the asked overlap (the last tile of a row or column ends at the edge); a side shorter
than a tile is padded by reflection and the padding cropped from the result. Each tile is upscaled on its own and
the results are blended: ``seamless`` weighs each tile by a ramp rising from 0 at its edge to 1 across the overlap
(only on edges that have a neighbour), so every output pixel is a convex mix and no seam shows; ``none`` lets
later tiles overwrite earlier ones.

Colour fixes (upstream ``color_adjust``, on by default there): ``adain`` gives each channel of the result the mean
and standard deviation of the input upscaled bicubically; ``wavelet`` keeps the result's high frequencies and takes
the low frequencies (five levels of a dilated 3x3 blur) from that upscale. Upstream applies both, in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError

BLENDS = ("seamless", "none")
COLOR_FIXES = ("adain + wavelet", "wavelet", "adain", "none")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles of side ``tile`` that cover ``0..length`` overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    if not 0 <= overlap < tile:
        raise NextScaleError(f"a tile overlap of {overlap} px must lie in 0..{tile - 1} (the tile is {tile} px)")
    count = -(-(length - overlap) // (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _ramp(size: int, overlap: int, rise: bool, fall: bool) -> torch.Tensor:
    w = torch.ones(size)
    if overlap:
        edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if rise:
            w[:overlap] = edge
        if fall:
            w[-overlap:] = edge.flip(0)
    return w


def upscale_tiled(
    run: Callable[[torch.Tensor, int], torch.Tensor],
    image_B3HW: torch.Tensor,
    size_hw: tuple[int, int],
    tile_in: int,
    tile_out: int,
    overlap: float,
    blend: str = "seamless",
) -> torch.Tensor:
    """``image_B3HW`` upscaled to ``size_hw`` by ``run(tile_B3SS, index) -> (B, 3, tile_out, tile_out)`` on tiles of
    ``tile_in`` px; ``overlap`` is a fraction of a tile (module docstring)."""
    if blend not in BLENDS:
        raise NextScaleError(f"blend '{blend}' is not one of {', '.join(BLENDS)}")
    if not 0 <= overlap < 1:
        raise NextScaleError(f"the tile overlap {overlap} must lie in [0, 1) (a fraction of a tile)")
    H, W = size_hw
    factor = tile_out / tile_in
    h, w = max(1, round(H / factor)), max(1, round(W / factor))
    lr = F.interpolate(image_B3HW, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
    pad_h, pad_w = max(0, tile_in - h), max(0, tile_in - w)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        lr = F.pad(lr, (0, pad_w, 0, pad_h), mode=mode)
    ph, pw = lr.shape[-2:]
    step = round(overlap * tile_in)
    rows, cols = tile_starts(ph, tile_in, step), tile_starts(pw, tile_in, step)
    out_h, out_w = round(ph * factor), round(pw * factor)
    total = torch.zeros(lr.shape[0], 3, out_h, out_w, device=lr.device)
    weight = torch.zeros(1, 1, out_h, out_w, device=lr.device)
    ramp = round(step * factor) if blend == "seamless" else 0
    index = 0
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            tile = run(lr[:, :, top : top + tile_in, left : left + tile_in], index).float()
            index += 1
            y, x = round(top * factor), round(left * factor)
            if blend == "none":
                total[:, :, y : y + tile_out, x : x + tile_out] = tile
                weight[:, :, y : y + tile_out, x : x + tile_out] = 1
                continue
            wy = _ramp(tile_out, ramp, i > 0, i < len(rows) - 1)
            wx = _ramp(tile_out, ramp, j > 0, j < len(cols) - 1)
            w_ = (wy[:, None] * wx[None, :]).to(lr.device)
            total[:, :, y : y + tile_out, x : x + tile_out] += tile * w_
            weight[:, :, y : y + tile_out, x : x + tile_out] += w_
    return _resized((total / weight)[:, :, : round(h * factor), : round(w * factor)], size_hw)


def upscale_whole(
    run: Callable[[torch.Tensor, int], torch.Tensor], image_B3HW: torch.Tensor, size_hw: tuple[int, int], tile_in: int
) -> torch.Tensor:
    """``image_B3HW`` stretched (bicubic) to one ``tile_in`` square, upscaled by ``run``, stretched to ``size_hw``."""
    square = F.interpolate(image_B3HW, size=(tile_in, tile_in), mode="bicubic", align_corners=False).clamp(-1, 1)
    return _resized(run(square, 0).float(), size_hw)


def _resized(x_B3HW: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x_B3HW.shape[-2:]) == tuple(size_hw):
        return x_B3HW
    return F.interpolate(x_B3HW, size=tuple(size_hw), mode="bicubic", align_corners=False).clamp(-1, 1)


def tile_count(size_hw: tuple[int, int], tile_in: int, tile_out: int, overlap: float) -> int:
    """How many tiles :func:`upscale_tiled` runs for an output of ``size_hw``."""
    factor = tile_out / tile_in
    h, w = (max(tile_in, max(1, round(s / factor))) for s in size_hw)
    step = round(overlap * tile_in)
    return len(tile_starts(h, tile_in, step)) * len(tile_starts(w, tile_in, step))


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]


def adain(result: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``result`` with each channel's mean and standard deviation taken from ``reference`` (same size)."""
    (rm, rs), (sm, ss) = _mean_std(result), _mean_std(reference)
    return (result - rm) / rs * ss + sm


def _wavelet_low(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(x.shape[1], 1, 1, 1)
    high = torch.zeros_like(x)
    for i in range(levels):
        r = 2**i
        low = F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), kernel, groups=x.shape[1], dilation=r)
        high += x - low
        x = low
    return high, x


def wavelet(result: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``result``'s high frequencies on ``reference``'s low frequencies (same size)."""
    return _wavelet_low(result)[0] + _wavelet_low(reference)[1]


def color_fix(result_B3HW: torch.Tensor, image_B3hw: torch.Tensor, mode: str) -> torch.Tensor:
    """Upstream's colour fix of an upscale (-1..1) against its input (-1..1, any size), in 0..1 as upstream."""
    if mode not in COLOR_FIXES:
        raise NextScaleError(f"color fix '{mode}' is not one of {', '.join(COLOR_FIXES)}")
    if mode == "none":
        return result_B3HW
    reference = F.interpolate(image_B3hw, size=result_B3HW.shape[-2:], mode="bicubic", align_corners=False)
    x, ref = result_B3HW.add(1).div(2), reference.add(1).div(2).clamp(0, 1)
    if "adain" in mode:
        x = adain(x, ref).clamp(0, 1)
    if "wavelet" in mode:
        x = wavelet(x, ref).clamp(0, 1)
    return x.mul(2).sub(1)
