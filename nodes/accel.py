"""NextScale Acceleration: the training-free speed-ups the samplers' ``accel`` input takes (models/core/accel.py)."""

from __future__ import annotations

from comfy_api.latest import io

from ..models.core.accel import RESTORE_MODES, Acceleration
from .sockets import CATEGORY, Accel
from .validation import check_combos, check_numbers


class NextScaleAcceleration(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleAcceleration",
            display_name="NextScale Acceleration",
            category=CATEGORY,
            description="Training-free speed-ups for the last, largest scales, where almost all the time goes. "
            "Scales are counted from the end of the schedule, so one setting fits every resolution. Pruning "
            "(FastVAR) computes only the tokens that differ most from the scale's average and restores the others "
            "from the last full scale; the guidance stop samples the last scales without the unconditional batch "
            "(their work halves); the shortcut (SkipVAR) leaves the last scales out, keeping the upsampled coarser "
            "image. Everything 0 = off, the exact sampler. Connect to a NextScale sampler's 'accel'. "
            "docs/performance.md has the measured speed and cost of each and the recommended setting.",
            inputs=[
                io.Int.Input("prune_scales", default=0, min=0, max=32,
                             tooltip="How many of the last scales (before any shortcut scales) compute only some "
                             "of their tokens. 0 = no pruning."),
                io.Float.Input("keep_ratio", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="Fraction of a pruned scale's tokens computed (FastVAR: 0.5 to 0.6)."),
                io.Int.Input("prune_from_layer", default=3, min=0, max=64,
                             tooltip="The first transformer block that sees only the kept tokens; the blocks "
                             "before it see all of them (FastVAR: 3)."),
                io.Combo.Input("restore", options=list(RESTORE_MODES), default="cached",
                               tooltip="What the tokens left out get. cached: what the blocks added at the last "
                               "full scale, upsampled (FastVAR). input: nothing (they pass the blocks unchanged)."),
                io.Int.Input("unguided_scales", default=0, min=0, max=32,
                             tooltip="How many of the last scales are sampled without guidance: the unconditional "
                             "batch is dropped before them, halving their work. 0 = guidance everywhere."),
                io.Int.Input("shortcut_scales", default=0, min=0, max=32,
                             tooltip="How many of the last scales are not run at all: the image is the coarser "
                             "scales' upsampled. 0 = every scale runs."),
            ],
            outputs=[Accel.Output("accel", display_name="accel")],
        )

    @classmethod
    def validate_inputs(cls, keep_ratio: float, restore: str) -> bool | str:
        return check_combos(restore=(restore, RESTORE_MODES)) or check_numbers(cls, keep_ratio=keep_ratio) or True

    @classmethod
    def execute(
        cls, prune_scales: int, keep_ratio: float, prune_from_layer: int, restore: str, unguided_scales: int,
        shortcut_scales: int,
    ) -> io.NodeOutput:
        return io.NodeOutput(Acceleration(
            prune_scales=prune_scales, keep_ratio=keep_ratio, prune_from_layer=prune_from_layer, restore=restore,
            unguided_scales=unguided_scales, shortcut_scales=shortcut_scales,
        ))


NODES = [NextScaleAcceleration]
