"""Image grids: a batch of images laid out in rows (for sample sheets and per-scale strips)."""

from __future__ import annotations

import math

import torch

from .errors import NextScaleError


def image_grid(images_BHWC: torch.Tensor, columns: int = 0, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """One ``(1, H', W', C)`` image holding the ``B`` images row by row, ``columns`` per row (0: a near-square grid),
    separated and framed by ``padding`` pixels of ``pad_value``. Empty cells of the last row stay ``pad_value``."""
    if images_BHWC.dim() != 4 or images_BHWC.shape[0] == 0:
        raise NextScaleError(f"an image grid needs a batch of images [batch, height, width, channels], got "
                             f"{list(images_BHWC.shape)}")
    if columns < 0 or padding < 0:
        raise NextScaleError(f"columns and padding must be >= 0, got columns={columns}, padding={padding}")
    B, H, W, C = images_BHWC.shape
    cols = min(columns or math.ceil(math.sqrt(B)), B)
    rows = math.ceil(B / cols)
    out = images_BHWC.new_full((1, rows * H + (rows + 1) * padding, cols * W + (cols + 1) * padding, C), pad_value)
    for i in range(B):
        r, c = divmod(i, cols)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        out[0, y : y + H, x : x + W] = images_BHWC[i]
    return out
