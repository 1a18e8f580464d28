"""Control nodes: load CAR or a NextScale adapter, apply it with a control image, and torch preprocessors."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from comfy_api.latest import io

from ..models.control.adapters import ControlStack
from ..models.control.maps import canny_edges, map_to_image, soft_silhouette
from ..models.core.errors import NextScaleError
from ..models.core.imageops import image_to_model
from .model_files import model_choices
from .service import TRANSFORMER_DTYPES, NextScaleModel, load, not_found
from .sockets import CATEGORY, Control, ControlModel
from .validation import check_file, check_numbers

LOADER = "NextScale Load Control"
MAX_SCALES = 64


def control_choices() -> list[str]:
    """The embedded edge adapter (when shipped) first, then every file in the model folder."""
    return model_choices(LOADER, "control")


@dataclass
class ControlSpec:
    """What a NEXTSCALE_CONTROL socket carries: device-free settings, bound per sampler run to models that
    :func:`~.service.ready` has loaded (binding never loads anything)."""

    model: NextScaleModel
    image_BHWC: torch.Tensor
    strength: float
    start_scale: int
    end_scale: int
    late_temperature: float
    previous: ControlSpec | None = None

    def models(self) -> list[NextScaleModel]:
        """The control models of the chain, first applied first: the sampler makes them ready with the others."""
        return ([] if self.previous is None else self.previous.models()) + [self.model]

    def images(self, start: int, stop: int, batch_size: int) -> ControlSpec:
        """The control of images ``start .. stop - 1`` of a run of ``batch_size`` (a sub-batch), chained controls
        included: a control image batch with one image per sampled image is cut to those images; a single control
        image serves every image."""
        count = self.image_BHWC.shape[0]
        if count not in (1, batch_size):
            raise NextScaleError(
                f"the control image batch has {count} images but the sampler makes {batch_size}: give one control "
                f"image, or one per sampled image"
            )
        return replace(
            self,
            image_BHWC=self.image_BHWC if count == 1 else self.image_BHWC[start:stop],
            previous=None if self.previous is None else self.previous.images(start, stop, batch_size),
        )

    def bind(self, generator, tokenizer, batch_size: int, device):
        """The run's control for the ``generator`` module (chained controls in order)."""
        control_B3HW = image_to_model(self.image_BHWC).to(self.model.device)
        bound = self.model.module.bind(
            generator,
            control_B3HW,
            batch_size=batch_size,
            strength=self.strength,
            start_scale=self.start_scale,
            end_scale=self.end_scale,
            late_temperature=self.late_temperature,
        )
        if self.previous is None:
            return bound
        before = self.previous.bind(generator, tokenizer, batch_size, device)
        return ControlStack([*getattr(before, "controls", [before]), bound])


class NextScaleLoadControl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadControl",
            display_name="NextScale Load Control",
            category=CATEGORY,
            description="Loads a control model from models/nextscale: a CAR file (car_canny_d16.pth, car_hed_d16.pth, "
            "car_depth_d16.pth, car_normal_d16.pth, car_sketch_d16.pth from Hugging Face MiracleDance/CAR; for "
            "var_d16.pth only) or a NextScale control adapter trained with training/train_control.py.",
            inputs=[
                io.Combo.Input(
                    "control_name",
                    display_name="control",
                    options=control_choices(),
                    tooltip="File in ComfyUI/models/nextscale. CAR files work only with the official var_d16.pth; "
                    "an adapter only with the generator it was trained on.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=TRANSFORMER_DTYPES,
                    default="auto",
                    tooltip="Weight precision; auto: ComfyUI's choice as for the generator (float32 on CPU, "
                    "bfloat16 on recent GPUs; fp8_e4m3fn: 8-bit matrices with per-tensor scales). Pick the "
                    "generator's precision.",
                ),
            ],
            outputs=[ControlModel.Output("control_model", display_name="control_model")],
        )

    @classmethod
    def validate_inputs(cls, control_name: str) -> bool | str:
        return check_file(control_name, control_choices(), lambda name: not_found(name, LOADER, "control")) or True

    @classmethod
    def execute(cls, control_name: str, dtype: str = "auto") -> io.NodeOutput:
        return io.NodeOutput(load(control_name, LOADER, "control", dtype))


class NextScaleApplyControl(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleApplyControl",
            display_name="NextScale Apply Control",
            category=CATEGORY,
            description="Pairs a control model with a control image (an edge map, HED, depth, ... from any "
            "preprocessor) for NextScale Sampler's 'control' input. Chain several: connect one Apply Control's "
            "output to the next one's 'control'.",
            inputs=[
                ControlModel.Input("control_model", tooltip="From NextScale Load Control."),
                io.Image.Input(
                    "image",
                    tooltip="The control image (any size; resized per scale). One image, or one per sampled "
                    "image. CAR expects the map its file was trained on (canny, HED, depth, normal, sketch).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                    tooltip="How strongly the control image steers the picture: 0 = not at all (exactly the "
                    "uncontrolled image), 1 = as trained (CAR: blends the generator's hidden state towards CAR's "
                    "fused one; adapters: scales the added control).",
                ),
                io.Int.Input(
                    "start_scale",
                    default=0,
                    min=0,
                    max=MAX_SCALES,
                    tooltip="First scale the control acts on, from 0 (1x1). Early scales fix the layout.",
                ),
                io.Int.Input(
                    "end_scale",
                    default=0,
                    min=0,
                    max=MAX_SCALES,
                    tooltip="The control stops before this scale (0 = through the last). Stopping early leaves "
                    "fine detail to the generator.",
                ),
                io.Float.Input(
                    "late_temperature",
                    default=1.0,
                    min=0.05,
                    max=2.0,
                    step=0.05,
                    tooltip="Calmer fine detail: randomness on the last third of the scales, multiplying the sampler's "
                    "own (1 = off; ECM's temperature schedule uses 0.8).",
                ),
                Control.Input("control", optional=True, tooltip="An earlier control to apply first (chaining)."),
            ],
            outputs=[Control.Output("control_out", display_name="control")],
        )

    @classmethod
    def validate_inputs(cls, strength: float, late_temperature: float) -> bool | str:
        return check_numbers(cls, strength=strength, late_temperature=late_temperature) or True

    @classmethod
    def execute(
        cls,
        control_model: NextScaleModel,
        image: torch.Tensor,
        strength: float,
        start_scale: int,
        end_scale: int,
        late_temperature: float,
        control: ControlSpec | None = None,
    ) -> io.NodeOutput:
        if end_scale and start_scale >= end_scale:
            raise NextScaleError(
                f"start_scale = {start_scale} must be below end_scale = {end_scale} (0 = through the last scale)"
            )
        spec = ControlSpec(control_model, image.detach().cpu().float(), float(strength), int(start_scale),
                           int(end_scale), float(late_temperature), control)
        return io.NodeOutput(spec)


class NextScaleEdgePreprocessor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleEdgePreprocessor",
            display_name="NextScale Edge Preprocessor",
            category=CATEGORY,
            description="Canny-like edge map in PyTorch (no OpenCV): blur, Sobel gradients, thinning, double "
            "threshold and hysteresis. White edges on black, for NextScale Apply Control (CAR canny, the edge "
            "adapter).",
            inputs=[
                io.Image.Input("image", tooltip="Any image; the edge map has its size."),
                io.Float.Input(
                    "low_threshold",
                    default=0.1,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Weak-edge threshold: gradient where a black-to-white step is 1 (OpenCV's 100 on "
                    "8-bit images is about 0.1). Weak edges are kept only when connected to strong ones.",
                ),
                io.Float.Input(
                    "high_threshold",
                    default=0.2,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="Strong-edge threshold (OpenCV's 200 is about 0.2). Higher: fewer edges.",
                ),
                io.Float.Input(
                    "blur", default=1.0, min=0.0, max=8.0, step=0.1, tooltip="Gaussian blur sigma in pixels first."
                ),
            ],
            outputs=[io.Image.Output("edges", display_name="edges")],
        )

    @classmethod
    def validate_inputs(cls, low_threshold: float, high_threshold: float, blur: float) -> bool | str:
        return check_numbers(cls, low_threshold=low_threshold, high_threshold=high_threshold, blur=blur) or True

    @classmethod
    def execute(cls, image: torch.Tensor, low_threshold: float, high_threshold: float, blur: float) -> io.NodeOutput:
        img = image_to_model(image).add(1).mul(0.5)
        return io.NodeOutput(map_to_image(canny_edges(img, low_threshold, high_threshold, blur)).to(image.device))


class NextScaleSilhouettePreprocessor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleSilhouettePreprocessor",
            display_name="NextScale Silhouette Preprocessor",
            category=CATEGORY,
            description="Soft silhouette of an object on a plain background: distance of each pixel's colour from "
            "the border's median colour, softened and blurred. White object on black (IMAGE) and the same as a "
            "MASK. For cluttered photos use a segmentation pack's mask instead.",
            inputs=[
                io.Image.Input("image", tooltip="An object on a fairly uniform background."),
                io.Float.Input(
                    "threshold",
                    default=0.15,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Colour distance (RMS over RGB, 0..1) at which a pixel counts as half foreground.",
                ),
                io.Float.Input(
                    "softness", default=0.05, min=0.001, max=1.0, step=0.005,
                    tooltip="Width of the soft edge in colour distance.",
                ),
                io.Float.Input(
                    "blur", default=1.0, min=0.0, max=16.0, step=0.1, tooltip="Gaussian blur sigma in pixels."
                ),
            ],
            outputs=[
                io.Image.Output("silhouette", display_name="silhouette"),
                io.Mask.Output("mask", display_name="mask"),
            ],
        )

    @classmethod
    def validate_inputs(cls, threshold: float, softness: float, blur: float) -> bool | str:
        return check_numbers(cls, threshold=threshold, softness=softness, blur=blur) or True

    @classmethod
    def execute(cls, image: torch.Tensor, threshold: float, softness: float, blur: float) -> io.NodeOutput:
        img = image_to_model(image).add(1).mul(0.5)
        mask_B1HW = soft_silhouette(img, threshold, softness, blur)
        return io.NodeOutput(map_to_image(mask_B1HW).to(image.device), mask_B1HW[:, 0].to(image.device))


NODES = [NextScaleLoadControl, NextScaleApplyControl, NextScaleEdgePreprocessor, NextScaleSilhouettePreprocessor]
