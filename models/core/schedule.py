"""Scale schedules ("patch_nums"): the side of each scale's square token grid.

A schedule is a strictly increasing tuple of grid sides whose last entry equals the side of the
tokenizer's latent grid (image side / downsampling factor). ``K = len(patch_nums)`` scales,
``L = sum(pn**2)`` tokens in all.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .errors import NextScaleError

SCHEDULE_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR-d16..d30, 16x16 latent at 256 px
SCHEDULE_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # VAR-d36, 32x32 latent at 512 px
SCHEDULE_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)  # training option, no weights released

KNOWN_SCHEDULES = {"256": SCHEDULE_256, "512": SCHEDULE_512, "1024": SCHEDULE_1024}

# Which of the 4 partially shared Phi convs each scale uses, for the K of the official schedules.
# Upstream decides ties (si = 2 and si = 7 for K = 10) by float64 rounding in numpy, so these
# tables are written out; `phi_index` reproduces them for any other K with the same computation.
_PHI_TABLE_4 = {
    10: (0, 0, 1, 1, 1, 2, 2, 3, 3, 3),
    14: (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3),
}


def phi_ticks(num_convs: int) -> np.ndarray:
    """Positions in [0, 1] of the shared Phi convs (upstream's float64 ``linspace`` ticks)."""
    if num_convs == 4:
        return np.linspace(1 / 3 / num_convs, 1 - 1 / 3 / num_convs, num_convs)
    return np.linspace(1 / 2 / num_convs, 1 - 1 / 2 / num_convs, num_convs)


def phi_index(si: int, num_scales: int, num_convs: int = 4) -> int:
    """Index of the Phi conv used at scale ``si`` of ``num_scales`` when ``num_convs`` are shared."""
    if not 0 <= si < num_scales:
        raise NextScaleError(f"scale index {si} is outside 0..{num_scales - 1}")
    if num_convs == 1:
        return 0
    if num_convs == 4 and num_scales in _PHI_TABLE_4:
        return _PHI_TABLE_4[num_scales][si]
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(num_convs) - at)).item())


def token_count(patch_nums: Sequence[int]) -> int:
    """Total number of tokens ``L`` over all scales."""
    return int(sum(pn * pn for pn in patch_nums))


def cumulative_tokens(patch_nums: Sequence[int]) -> list[int]:
    """Tokens up to and including each scale, e.g. ``[1, 5, 14, ..., 680]`` at 256 px."""
    out, total = [], 0
    for pn in patch_nums:
        total += pn * pn
        out.append(total)
    return out


def scale_slices(patch_nums: Sequence[int]) -> list[slice]:
    """Slice of each scale's tokens in the flattened sequence of length ``L``."""
    begin, out = 0, []
    for pn in patch_nums:
        out.append(slice(begin, begin + pn * pn))
        begin += pn * pn
    return out


def parse_schedule(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse "1,2,3,4" (or a name from KNOWN_SCHEDULES, or a sequence) into a validated schedule."""
    if isinstance(text, str):
        key = text.strip()
        if key in KNOWN_SCHEDULES:
            return KNOWN_SCHEDULES[key]
        try:
            values = tuple(int(v) for v in key.replace(" ", "").split(",") if v)
        except ValueError:
            raise NextScaleError(
                f"schedule {text!r} is not a comma-separated list of integers such as '1,2,3,4,5,6,8,10,13,16'"
            ) from None
    else:
        values = tuple(int(v) for v in text)
    validate_schedule(values)
    if values[-1] > MAX_TYPED_SIDE:  # a typo like '1,2,4096' would otherwise allocate tens of GB
        raise NextScaleError(
            f"schedule {text!r} ends at a {values[-1]}x{values[-1]} grid; at most {MAX_TYPED_SIDE} "
            f"({MAX_TYPED_SIDE * 16} px with VAR's 16 px cells) is supported"
        )
    return values


MAX_TYPED_SIDE = 128


def validate_schedule(patch_nums: Sequence[int], latent_side: int | None = None) -> None:
    """Raise NextScaleError unless ``patch_nums`` is strictly increasing, starts at 1 and ends at the latent side."""
    pn = tuple(patch_nums)
    if len(pn) < 2:
        raise NextScaleError(f"a schedule needs at least 2 scales, got {pn}")
    if pn[0] != 1:
        raise NextScaleError(f"a schedule starts with a 1x1 scale, got {pn}")
    if any(b <= a for a, b in itertools.pairwise(pn)):
        raise NextScaleError(f"scale sides must increase strictly, got {pn}")
    if latent_side is not None and pn[-1] != latent_side:
        raise NextScaleError(
            f"the last scale of {pn} is {pn[-1]}x{pn[-1]} but the tokenizer's latent grid is "
            f"{latent_side}x{latent_side}: use a schedule that ends at {latent_side}"
        )


def schedule_from_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Recover a schedule from a per-token level list (VAR's ``lvl_1L`` buffer)."""
    counts: dict[int, int] = {}
    for lv in levels:
        counts[int(lv)] = counts.get(int(lv), 0) + 1
    out = []
    for k in range(len(counts)):
        side = round(counts.get(k, 0) ** 0.5)
        if k not in counts or side * side != counts[k]:
            raise NextScaleError(f"level buffer has {counts.get(k, 0)} tokens at scale {k}, which is not a square grid")
        out.append(side)
    return tuple(out)


def scale_levels(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """The scale of each of the ``L`` tokens, scale by scale (the values of VAR's ``lvl_1L`` buffer)."""
    return tuple(si for si, pn in enumerate(patch_nums) for _ in range(pn * pn))


def schedule_from_level_buffer(
    levels: Sequence[int], num_scales: int, num_tokens: int | None, tokens_key: str, lead: int = 0
) -> tuple[int, ...]:
    """The schedule a file's ``lvl_1L`` lists (after ``lead`` levels in front of the first scale, as DD's class
    token), checked against the ``num_scales`` rows of ``lvl_embed.weight`` and the ``num_tokens`` of
    ``tokens_key`` (not checked when None)."""
    patch_nums = schedule_from_levels([level - lead for level in levels[lead:]])
    scales, tokens = len(patch_nums) + lead, token_count(patch_nums) + lead
    if scales != num_scales or (num_tokens is not None and tokens != num_tokens):
        raise NextScaleError(
            f"key 'lvl_1L' describes {scales} scales and {tokens} tokens, but 'lvl_embed.weight' has {num_scales} "
            f"scales and {tokens_key} {num_tokens} tokens"
        )
    return patch_nums


def schedule_from_counts(num_tokens: int, num_scales: int) -> tuple[int, ...]:
    """The known schedule with ``L = num_tokens`` and ``K = num_scales`` (used when no level buffer is stored)."""
    for pn in KNOWN_SCHEDULES.values():
        if token_count(pn) == num_tokens and len(pn) == num_scales:
            return pn
    raise NextScaleError(
        f"no known schedule has {num_tokens} tokens over {num_scales} scales; "
        f"known: " + ", ".join(f"{k} px {v}" for k, v in KNOWN_SCHEDULES.items())
    )
