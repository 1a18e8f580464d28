"""NextScale Schedule: show a resolution's scale schedule, token counts and KV-cache size."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..models.core.schedule import KNOWN_SCHEDULES, cumulative_tokens, parse_schedule, token_count
from .sockets import CATEGORY
from .validation import check_combos

PRESETS = ["256", "512", "1024", "custom"]


def schedule_report(patch_nums: tuple[int, ...], depth: int, downsample: int = 16) -> str:
    """A plain-text table of the schedule and the KV cache a VAR of ``depth`` needs for it."""
    width = 64 * depth
    cum = cumulative_tokens(patch_nums)
    lines = [
        f"schedule {','.join(map(str, patch_nums))}: {len(patch_nums)} scales, {token_count(patch_nums)} tokens, "
        f"{patch_nums[-1] * downsample} px at x{downsample} downsampling",
        "scale  grid     tokens  cumulative",
    ]
    for si, (pn, c) in enumerate(zip(patch_nums, cum)):
        lines.append(f"{si + 1:>5}  {pn:>2}x{pn:<4} {pn * pn:>7}  {c:>10}")
    kv_values = 2 * depth * token_count(patch_nums) * width * 2  # K and V, every layer, CFG doubles the rows
    lines.append(
        f"full KV cache of a VAR-d{depth} (width {width}) per image with CFG: "
        f"{kv_values * 2 / 2**20:.0f} MiB in fp16, {kv_values * 4 / 2**20:.0f} MiB in fp32"
    )
    return "\n".join(lines)


class NextScaleSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleSchedule",
            display_name="NextScale Schedule",
            category=CATEGORY,
            description="Shows a scale schedule: the token grid of every scale, token counts, and the KV cache a "
            "VAR model of the given depth needs for it.",
            inputs=[
                io.Combo.Input(
                    "preset",
                    options=PRESETS,
                    default="256",
                    tooltip="256: VAR-d16..d30 (10 scales, 680 tokens); 512: VAR-d36; 1024: VAR's training option "
                    "(no released weights); custom: use the custom schedule below.",
                ),
                io.String.Input(
                    "custom_schedule",
                    default="1,2,3,4,6,8",
                    tooltip="Comma-separated grid sides, increasing, starting at 1 (used when preset is 'custom').",
                ),
                io.Int.Input(
                    "depth", default=16, min=1, max=64, tooltip="VAR depth for the KV-cache estimate (d16..d36)."
                ),
            ],
            outputs=[
                io.String.Output("report", display_name="report", tooltip="The schedule as a text table."),
                io.Int.Output("tokens", display_name="tokens", tooltip="Total number of tokens over all scales."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, preset: str) -> bool | str:
        return check_combos(preset=(preset, PRESETS)) or True

    @classmethod
    def execute(cls, preset: str, custom_schedule: str, depth: int) -> io.NodeOutput:
        patch_nums = parse_schedule(custom_schedule if preset == "custom" else KNOWN_SCHEDULES[preset])
        report = schedule_report(patch_nums, depth)
        return io.NodeOutput(report, token_count(patch_nums), ui=ui.PreviewText(report))


NODES = [NextScaleSchedule]
