"""NextScale Image Grid: lay a batch of images out as one sheet (sample sheets, per-scale strips)."""

from __future__ import annotations

from comfy_api.latest import io

from ..models.core.grid import image_grid
from .sockets import CATEGORY
from .validation import check_numbers


class NextScaleImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleImageGrid",
            display_name="NextScale Image Grid",
            category=CATEGORY,
            description="Lays a batch of images out row by row as one image: a sheet of samples (the sampler "
            "orders a class list class by class, batch_size images each) or a strip of per-scale decodes.",
            inputs=[
                io.Image.Input("images", tooltip="A batch of images of one size."),
                io.Int.Input(
                    "columns", default=0, min=0, max=256,
                    tooltip="Images per row (0 = a near-square grid). Set it to the sampler's batch_size for one "
                    "row per class.",
                ),
                io.Int.Input("padding", default=2, min=0, max=64, tooltip="Pixels between and around the images."),
                io.Float.Input(
                    "pad_value", default=1.0, min=0.0, max=1.0, step=0.05,
                    tooltip="Brightness of the padding (0 = black, 1 = white).",
                ),
            ],
            outputs=[io.Image.Output("image", display_name="image")],
        )

    @classmethod
    def validate_inputs(cls, pad_value: float) -> bool | str:
        return check_numbers(cls, pad_value=pad_value) or True

    @classmethod
    def execute(cls, images, columns: int, padding: int, pad_value: float) -> io.NodeOutput:
        return io.NodeOutput(image_grid(images, columns, padding, pad_value))


NODES = [NextScaleImageGrid]
