"""Pixel conversions between ComfyUI IMAGE layout ([B, H, W, C], 0..1) and the tokenizer ([B, 3, H, W], -1..1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import NextScaleError

RESIZE_MODES = ["center crop", "stretch", "pad"]


def image_to_model(image_BHWC: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` in 0..1 -> ``[B, 3, H, W]`` in -1..1 (alpha dropped, grey expanded)."""
    if image_BHWC.dim() != 4:
        raise NextScaleError(
            f"expected an IMAGE of shape [batch, height, width, channels], got {list(image_BHWC.shape)}"
        )
    c = image_BHWC.shape[-1]
    if c == 1:
        image_BHWC = image_BHWC.expand(-1, -1, -1, 3)
    elif c == 4:
        image_BHWC = image_BHWC[..., :3]
    elif c != 3:
        raise NextScaleError(f"expected an IMAGE with 1, 3 or 4 channels, got {c}")
    return image_BHWC.permute(0, 3, 1, 2).float().mul(2).sub(1)


def model_to_image(img_B3HW: torch.Tensor) -> torch.Tensor:
    """Tokenizer output in -1..1 -> ComfyUI IMAGE ``[B, H, W, 3]`` float32 in 0..1."""
    return img_B3HW.float().add(1).mul(0.5).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def fit_square(img_B3HW: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """Resize to ``side x side``: crop the centre, stretch, or pad (letterbox with black)."""
    _, _, h, w = img_B3HW.shape
    if (h, w) == (side, side):
        return img_B3HW
    if mode == "stretch":
        return _resize(img_B3HW, side, side)
    if mode == "center crop":
        scale = side / min(h, w)
        nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
        x = _resize(img_B3HW, nh, nw)
        top, left = (nh - side) // 2, (nw - side) // 2
        return x[:, :, top : top + side, left : left + side]
    if mode == "pad":
        scale = side / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = _resize(img_B3HW, nh, nw)
        out = torch.full((x.shape[0], 3, side, side), -1.0, dtype=x.dtype, device=x.device)
        top, left = (side - nh) // 2, (side - nw) // 2
        out[:, :, top : top + nh, left : left + nw] = x
        return out
    raise NextScaleError(f"resize mode '{mode}' is not one of {RESIZE_MODES}")


@dataclass(frozen=True)
class ImageFit:
    """How an image of ``height x width`` px was fitted to the model's ``side x side`` square by :func:`fit_square`
    with the resize ``mode``. NextScale Encode stores it in ``tokens.extra["fit"]``; the guides fit masks with it and
    Decode's composite maps the decoded square back onto the image with :meth:`undo`."""

    height: int
    width: int
    side: int
    mode: str

    def same_aspect(self, height: int, width: int) -> bool:
        """Whether ``height x width`` px has this image's aspect ratio (to a pixel's rounding)."""
        return abs(height * self.width - width * self.height) <= max(self.height, self.width, height, width)

    def undo(self, square_BCSS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_BChw, covered_hw)``: a square of any resolution laid back onto the image's ``height x width``
        pixels (bicubic), and a float mask that is 1 where the square covers the image and 0 where a centre crop
        cut the image off. The exact inverse of :func:`fit_square`'s geometry."""
        rows = self._square_coordinates(self.height, self.width)
        cols = self._square_coordinates(self.width, self.height)
        B = square_BCSS.shape[0]
        grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)  # (h, w, 2): x then y, in -1..1
        grid = grid.to(device=square_BCSS.device, dtype=torch.float32)
        image = F.grid_sample(
            square_BCSS.float(), grid[None].expand(B, -1, -1, -1), mode="bicubic", padding_mode="border",
            align_corners=False,
        )
        covered = (grid.abs() <= 1).all(dim=-1).to(image.dtype)
        return image, covered

    def _square_coordinates(self, length: int, other: int) -> torch.Tensor:
        """Where the centres of the image's ``length`` pixels along one axis fall in the square, in -1..1 (the
        square's edges; ``grid_sample`` with ``align_corners=False``); ``other`` is the other axis' length."""
        side, centres = self.side, torch.arange(length, dtype=torch.float64) + 0.5
        if self.mode == "stretch":
            at = centres * side / length
        elif self.mode == "pad":
            fitted = max(1, round(length * (side / max(length, other))))
            at = (side - fitted) // 2 + centres * fitted / length
        elif self.mode == "center crop":
            fitted = max(side, round(length * (side / min(length, other))))
            at = centres * fitted / length - (fitted - side) // 2
        else:
            raise NextScaleError(f"resize mode '{self.mode}' is not one of {RESIZE_MODES}")
        return at * 2 / side - 1


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if h < x.shape[-2] or w < x.shape[-1]:
        return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
