"""Training pairs of the embedded super-resolution model: the text-to-image set's 64 px renders (training/t2i_data.py)
as high-quality images and their degraded 32 px versions as inputs.

The degradation is the first-order pass of the Real-ESRGAN pipeline that NSARM trains on (its ``'light'``
settings), scaled to 64 px pictures: blur, a random resize, noise, JPEG, then the resize to the input size.

1. Blur with probability 0.8: an isotropic (share 0.6) or anisotropic Gaussian kernel of 7 x 7, sigma in
   :attr:`Degradation.blur_sigma` (upstream draws 0.2..3 on 1024 px pictures; 0.2..1.2 keeps a 64 px drawing legible).
2. Resize: up (0.2), down (0.7) or keep (0.1), by a factor in :attr:`Degradation.resize_range`, with ``area``,
   ``bilinear`` or ``bicubic`` drawn alike.
3. Noise: Gaussian (half the time; sigma 1..20 of 255) or Poisson (scale 0.05..2), on the grey image with
   probability 0.2, otherwise per channel.
4. JPEG at a quality in 60..95 (Pillow's encoder).
5. Resize to 32 px (``area``, ``bilinear`` or ``bicubic``), rounded to 8 bits.

A pair is a pure function of ``(seed, image index, variant)``: training draws variant ``step`` for every image of a
step, so each epoch sees new degradations; the held-out pairs use variant :data:`HELDOUT_VARIANT`. The held-out
split is the text-to-image set's (its held-out drawings).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALE = 2
HELDOUT_VARIANT = -1
MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class Degradation:
    """The ranges and probabilities of the degradation (module docstring)."""

    blur_prob: float = 0.8
    iso_share: float = 0.6
    blur_sigma: tuple[float, float] = (0.2, 1.2)
    kernel_size: int = 7
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.5, 1.5)
    gaussian_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 20.0)  # of 255
    poisson_scale: tuple[float, float] = (0.05, 2.0)
    gray_prob: float = 0.2
    jpeg_quality: tuple[int, int] = (60, 95)


def pair_rng(seed: int, index: int, variant: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(index), variant - HELDOUT_VARIANT])


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """A normalised ``(size, size)`` Gaussian with standard deviations ``sigma_x``, ``sigma_y`` along axes turned
    by ``theta``."""
    r = np.arange(size) - size // 2
    xx, yy = np.meshgrid(r, r)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return k / k.sum()


def _resize(x_13HW: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    return F.interpolate(x_13HW, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))


def degrade(hr_HW3: np.ndarray, rng: np.random.Generator, deg: Degradation = Degradation(),
            scale: int = SCALE) -> np.ndarray:
    """uint8 ``(H / scale, W / scale, 3)``: ``hr_HW3`` (uint8) degraded with draws from ``rng``."""
    H, W, _ = hr_HW3.shape
    x = torch.from_numpy(hr_HW3.astype(np.float32) / 255).permute(2, 0, 1)[None]
    if rng.random() < deg.blur_prob:
        sx = rng.uniform(*deg.blur_sigma)
        sy, theta = (sx, 0.0) if rng.random() < deg.iso_share else (rng.uniform(*deg.blur_sigma), rng.uniform(0, np.pi))
        k = torch.from_numpy(gaussian_kernel(deg.kernel_size, sx, sy, theta)).float()
        p = deg.kernel_size // 2
        x = F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), k[None, None].repeat(3, 1, 1, 1), groups=3)
    kind = rng.choice(3, p=deg.resize_prob)
    factor = (rng.uniform(1, deg.resize_range[1]), rng.uniform(deg.resize_range[0], 1), 1.0)[kind]
    x = _resize(x, (max(4, round(H * factor)), max(4, round(W * factor))), MODES[rng.integers(3)]).clamp(0, 1)
    img = x[0].permute(1, 2, 0).numpy().astype(np.float64)
    gray = rng.random() < deg.gray_prob
    if rng.random() < deg.gaussian_prob:
        shape = (*img.shape[:2], 1) if gray else img.shape
        img = img + rng.normal(0, rng.uniform(*deg.noise_sigma) / 255, shape)
    else:
        amount = rng.uniform(*deg.poisson_scale)
        base = img.mean(-1, keepdims=True) if gray else img
        img = img + (rng.poisson(base * 255) / 255 - base) * amount
    q = int(rng.integers(deg.jpeg_quality[0], deg.jpeg_quality[1] + 1))
    buf = io.BytesIO()
    Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=q)
    img = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    x = _resize(torch.from_numpy(img).permute(2, 0, 1)[None], (H // scale, W // scale), MODES[rng.integers(3)])
    return (x[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def degrade_batch(images_uint8: np.ndarray, indices, seed: int, variant: int,
                  deg: Degradation = Degradation()) -> np.ndarray:
    """uint8 ``(B, H / 2, W / 2, 3)``: the inputs of images ``indices`` of ``images_uint8`` (module docstring)."""
    return np.stack([degrade(images_uint8[i], pair_rng(seed, i, variant), deg) for i in indices])


def bicubic(lr_B3hw: torch.Tensor, scale: int = SCALE) -> torch.Tensor:
    """The baseline: ``lr_B3hw`` (-1..1) upscaled bicubically, clamped to -1..1."""
    h, w = lr_B3hw.shape[-2:]
    return F.interpolate(lr_B3hw, size=(h * scale, w * scale), mode="bicubic", align_corners=False).clamp(-1, 1)
