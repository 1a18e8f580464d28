"""Infinity's scale schedules: rectangular token grids per aspect ratio, and the 2D RoPE positions they imply.

Upstream: ``infinity/utils/dynamic_resolution.py``.
- Eight templates ``h/w`` in {1, 1.25, 1.333, 1.5, 1.75, 2, 2.5, 3}, each a 13-scale list of ``(h, w)`` token grids,
  plus their inverses (the same grids with ``h`` and ``w`` swapped; key ``int(1000 / ratio) / 1000``): 15 templates.
  A request uses the template nearest to its ``h/w``.
- The resolution is a prefix of the template: '0.06M' = 7 scales, '0.25M' = 10, '0.60M' = 12, '1M' = 13. One token
  covers 16 x 16 pixels (the 8B's f8 tokenizer patchifies 2 x 2 latent cells into one token, so also 16 px).
- RoPE (``rope2d_normalized_by_hw = 2``): the positions of every scale are mapped onto the template's *1M* final
  grid, ``round(i * H_1M / h)`` per row and ``round(j * W_1M / w)`` per column, whatever prefix is sampled, so a
  region of the image has the same angle at every scale and resolution.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import NextScaleError

PIXELS_PER_TOKEN = 16
RESOLUTIONS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

_TEMPLATES_TALL = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16),
            (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16),
            (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15),
            (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14),
            (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12),
            (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11),
            (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10),
            (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9),
            (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)),
}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    out = dict(_TEMPLATES_TALL)
    for ratio, grids in _TEMPLATES_TALL.items():
        if ratio != 1.0:
            out[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return out


TEMPLATES = _all_templates()  # h/w -> 13 grids


def nearest_template(h_div_w: float) -> float:
    """The template ratio nearest to ``h_div_w`` (upstream's argmin of the absolute difference; first on ties)."""
    if not h_div_w > 0:
        raise NextScaleError(f"the aspect ratio h/w must be positive, got {h_div_w}")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


@dataclass(frozen=True)
class InfinitySchedule:
    """The token grids of one run and the grid its RoPE positions are normalised to.

    ``scales``: ``(h, w)`` per scale, coarse to fine. ``rope_grid``: the template's 1M final grid (for a custom
    schedule, its own last grid). ``template``: the ``h/w`` template it came from (None for a custom one).
    """

    scales: tuple[tuple[int, int], ...]
    rope_grid: tuple[int, int]
    template: float | None = None

    def __post_init__(self):
        scales = tuple((int(h), int(w)) for h, w in self.scales)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "rope_grid", (int(self.rope_grid[0]), int(self.rope_grid[1])))
        if not scales or any(h < 1 or w < 1 for h, w in scales):
            raise NextScaleError(f"an Infinity schedule needs at least one (h, w) grid of positive sides, got {scales}")
        if any(h2 < h1 or w2 < w1 for (h1, w1), (h2, w2) in itertools.pairwise(scales)):
            raise NextScaleError(f"Infinity schedule grids must not shrink from one scale to the next: {scales}")

    @classmethod
    def from_template(cls, h_div_w: float = 1.0, resolution: str = "1M") -> InfinitySchedule:
        if resolution not in RESOLUTIONS:
            raise NextScaleError(f"resolution '{resolution}' is not one of {', '.join(RESOLUTIONS)}")
        template = nearest_template(h_div_w)
        grids = TEMPLATES[template]
        return cls(grids[: RESOLUTIONS[resolution]], grids[-1], template)

    @classmethod
    def custom(cls, scales: Sequence[tuple[int, int]]) -> InfinitySchedule:
        """A schedule outside the templates (small test models): RoPE normalised to its own last grid."""
        scales = tuple(tuple(s) for s in scales)
        return cls(scales, scales[-1] if scales else (1, 1), None)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def token_counts(self) -> list[int]:
        return [h * w for h, w in self.scales]

    @property
    def num_tokens(self) -> int:
        return sum(self.token_counts)

    def starts(self) -> list[int]:
        """The sequence position of each scale's first token."""
        out, total = [], 0
        for n in self.token_counts:
            out.append(total)
            total += n
        return out

    def pixel_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image in pixels."""
        h, w = self.scales[-1]
        return h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN

    def rope_positions(self) -> torch.Tensor:
        """int64 ``(L, 2)``: each token's (row, column) on :attr:`rope_grid`, scale by scale, row-major."""
        H, W = self.rope_grid
        out = []
        for h, w in self.scales:
            rows_h = (torch.arange(h, device="cpu") * (H / h)).round().long()
            cols_w = (torch.arange(w, device="cpu") * (W / w)).round().long()
            out.append(torch.stack(torch.meshgrid(rows_h, cols_w, indexing="ij"), dim=-1).reshape(-1, 2))
        return torch.cat(out)


def rope_angles(schedule: InfinitySchedule, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """fp32 ``(L, head_dim / 2)`` rotation angles: the first half of the pairs encodes the row, the second the
    column, each with frequencies ``base ** (-2i / (head_dim / 2))``."""
    if head_dim % 4:
        raise NextScaleError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64, device="cpu").float() / half))
    pos_L2 = schedule.rope_positions().float()
    return torch.cat((pos_L2[:, :1] * inv_freq, pos_L2[:, 1:] * inv_freq), dim=-1)
