"""FlexVAR's schedules: which scales a resolution and a number of steps imply, and how each scale is sampled.

Upstream takes the list of sides as an argument (``infer_patch_nums``) and publishes these choices: training's
256-px schedule ``1,2,3,4,5,6,8,10,13,16`` (10 steps), ``1,2,3,4,5,7,10,13,16`` (9 steps), ``1..10,12,14,16`` (13
steps, its best FID) and ``1..10,12,14,16,23,32`` (512 px, 15 steps). :func:`flex_schedule` returns a published
schedule when one fits, else the rule below.

The rule for a last side ``S`` (the image side over the tokenizer's 16 px cells) and ``K`` steps: side ``i`` is
``S ** (i / (K - 1))`` rounded, raised to one more than the side before and lowered so that the remaining sides
still fit below ``S``. Sides grow geometrically, as in VAR's schedules, and the first ones are ``1, 2, 3, ...``.

Sampling per scale (upstream ``autoregressive_infer_cfg``): a side that is not one of :data:`DRAWN_SIDES` (the
sides training saw, plus 23, 24, 32), or that is larger than ``max_pn``, is taken greedily (top-k 1) instead of
drawn, since the model's distribution there is less reliable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.errors import NextScaleError
from ..core.schedule import SCHEDULE_256, token_count, validate_schedule

CELL_PX = 16  # FlexVAE's pixels per token side
DRAWN_SIDES = frozenset((*SCHEDULE_256, 23, 24, 32))
MAX_SIDE = 64  # 1024 px
PUBLISHED = {
    (16, 10): SCHEDULE_256,
    (16, 9): (1, 2, 3, 4, 5, 7, 10, 13, 16),
    (16, 13): (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16),
    (32, 15): (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32),
}


def flex_schedule(side: int, steps: int) -> tuple[int, ...]:
    """The schedule of ``steps`` scales ending at a ``side x side`` token grid (module docstring)."""
    if not 2 <= side <= MAX_SIDE:
        raise NextScaleError(
            f"a FlexVAR image is {2 * CELL_PX} to {MAX_SIDE * CELL_PX} px on a side, got {side * CELL_PX} px"
        )
    if not 2 <= steps <= side:
        raise NextScaleError(
            f"{steps} steps do not fit a {side}x{side} token grid ({side * CELL_PX} px): use 2 to {side} steps, "
            f"or a larger resolution"
        )
    if (side, steps) in PUBLISHED:
        return PUBLISHED[(side, steps)]
    sides = [1]
    for i in range(1, steps):
        target = round(side ** (i / (steps - 1)))
        sides.append(min(max(target, sides[-1] + 1), side - (steps - 1 - i)))
    return tuple(sides)


def resolution_side(resolution: int) -> int:
    """Token grid side of a ``resolution`` px square image; the resolution must be a multiple of 16 px."""
    if resolution % CELL_PX:
        raise NextScaleError(
            f"resolution {resolution} px is not a multiple of FlexVAE's {CELL_PX} px cells: use "
            f"{resolution // CELL_PX * CELL_PX} or {(resolution // CELL_PX + 1) * CELL_PX}"
        )
    return resolution // CELL_PX


def drawn(pn: int, max_pn: int) -> bool:
    """Whether a scale of side ``pn`` is drawn with the run's top-k/top-p (else taken greedily)."""
    return pn in DRAWN_SIDES and pn <= max_pn


@dataclass(frozen=True)
class ScheduleReport:
    """What a schedule implies, for the schedule node."""

    patch_nums: tuple[int, ...]
    max_pn: int = 16

    def __post_init__(self):
        validate_schedule(self.patch_nums)

    @property
    def tokens(self) -> int:
        return token_count(self.patch_nums)

    def text(self) -> str:
        """The schedule as a table: each step's side, pixels, tokens, and whether it is drawn or greedy."""
        pn = self.patch_nums
        lines = [
            f"{len(pn)} steps, {pn[-1] * CELL_PX}x{pn[-1] * CELL_PX} px, {self.tokens} tokens",
            f"schedule: {','.join(map(str, pn))}",
            "step  side  px    tokens  sampling",
        ]
        for si, side in enumerate(pn):
            how = "drawn (top-k/top-p)" if drawn(side, self.max_pn) else "greedy (side not trained or > max_pn)"
            lines.append(f"{si:>4}  {side:>4}  {side * CELL_PX:>4}  {side * side:>6}  {how}")
        return "\n".join(lines)


def parse_sides(text: str) -> tuple[int, ...] | None:
    """A schedule typed as ``1,2,3,...`` (None for an empty text), validated and at most :data:`MAX_SIDE`."""
    if not text.strip():
        return None
    try:
        sides = tuple(int(v) for v in text.replace(" ", "").replace("_", ",").split(",") if v)
    except ValueError:
        raise NextScaleError(
            f"schedule {text!r} is not a comma-separated list of sides such as '1,2,3,4,6,9,13,16'"
        ) from None
    return check_schedule(sides)


def check_schedule(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """``patch_nums`` as a tuple, validated (:func:`~..core.schedule.validate_schedule`) and at most
    :data:`MAX_SIDE` on a side."""
    pn = tuple(int(p) for p in patch_nums)
    validate_schedule(pn)
    if pn[-1] > MAX_SIDE:
        raise NextScaleError(f"schedule {pn} ends at side {pn[-1]}; at most {MAX_SIDE} ({MAX_SIDE * CELL_PX} px)")
    return pn
