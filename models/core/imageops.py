"""Pixel conversions between ComfyUI IMAGE layout ([B, H, W, C], 0..1) and the tokenizer ([B, 3, H, W], -1..1)."""

from __future__ import annotations

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


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if h < x.shape[-2] or w < x.shape[-1]:
        return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
