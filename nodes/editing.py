"""Editing nodes: inpaint / outpaint / class-edit and image-to-image guides for NextScale Sampler (training-free)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.tokens import NextScaleTokens
from ..models.var.editing import EDIT_MODES, image_to_image, inpaint
from .sockets import CATEGORY, Guide, Tokens
from .validation import check_combos

MAX_SCALES = 64


class NextScaleInpaintGuide(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleInpaintGuide",
            display_name="NextScale Inpaint Guide",
            category=CATEGORY,
            description="Inpainting, outpainting and class editing without training: the sampler keeps the "
            "reference image's tokens outside the mask at every scale and generates the masked area to fit them. "
            "Mask 1 = regenerate (ComfyUI's convention: the mask editor's painted area, the new border of Pad "
            "Image for Outpainting). Class edit: mask an object and pick another class on the sampler. Connect "
            "to NextScale Sampler's 'guide' (or, for an image encoded with an Infinity tokenizer, NextScale Sampler "
            "(Text)'s 'guide': inpaint with a prompt); for a seamless result also connect the image and mask to "
            "NextScale Decode's composite inputs.",
            inputs=[
                Tokens.Input("tokens", tooltip="The image to edit, from NextScale Encode (batch 1, or one per image)."),
                io.Mask.Input(
                    "mask",
                    tooltip="1 = regenerate, 0 = keep: the mask editor's or Pad Image for Outpainting's mask of "
                    "the encoded image, at its size (any size and aspect; fitted to the model's square as NextScale "
                    "Encode fitted the image). Batch 1 or one per image. Each token is kept when more than half "
                    "of its area is kept.",
                ),
                io.Boolean.Input(
                    "invert",
                    default=False,
                    tooltip="Regenerate where the mask is 0 instead (e.g. a subject mask: keep the subject, "
                    "regenerate the rest). Pad Image for Outpainting needs no inversion.",
                ),
                io.Combo.Input(
                    "mode",
                    options=list(EDIT_MODES),
                    default="tokens",
                    tooltip="tokens: the kept area is copied from the reference at every scale (VAR's edit demo: "
                    "sampled tokens replaced by the reference's). latent blend: also holds the kept area of the "
                    "picture being built to the reference after every scale, so it stays exact (the accumulated "
                    "latent reset).",
                ),
                io.Int.Input(
                    "start_scale",
                    default=0,
                    min=0,
                    max=MAX_SCALES,
                    tooltip="First scale the guide acts on, counted from 0 (the 1x1 scale). Earlier scales are "
                    "sampled freely.",
                ),
                io.Int.Input(
                    "end_scale",
                    default=0,
                    min=0,
                    max=MAX_SCALES,
                    tooltip="The guide stops before this scale (0 = acts through the last scale). Later scales "
                    "are sampled freely.",
                ),
            ],
            outputs=[Guide.Output("guide", display_name="guide")],
        )

    @classmethod
    def validate_inputs(cls, mode: str) -> bool | str:
        return check_combos(mode=(mode, EDIT_MODES)) or True

    @classmethod
    def execute(
        cls, tokens: NextScaleTokens, mask: torch.Tensor, invert: bool, mode: str, start_scale: int, end_scale: int
    ) -> io.NodeOutput:
        K = tokens.num_scales
        end = K if end_scale == 0 else end_scale
        if not start_scale < end <= K:
            raise NextScaleError(
                f"start_scale = {start_scale}, end_scale = {end_scale}: these tokens have {K} scales (0..{K - 1}); "
                f"start_scale must be below end_scale (0 = through the last scale) and end_scale at most {K}"
            )
        fit = tokens.extra.get("fit")
        height, width = mask.shape[-2:]
        if fit is not None and not fit.same_aspect(height, width):
            raise NextScaleError(
                f"the mask is {width}x{height} px but the encoded image is {fit.width}x{fit.height} px: give the "
                f"mask of that image (the same size, or the same aspect ratio)"
            )
        spec = inpaint(
            tokens,
            mask,
            invert=invert,
            mode=mode,
            start_scale=start_scale,
            end_scale=end,
            resize=None if fit is None else fit.mode,
        )
        return io.NodeOutput(spec)


class NextScaleImageToImageGuide(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleImageToImageGuide",
            display_name="NextScale Image to Image Guide",
            category=CATEGORY,
            description="Image to image without training: the sampler copies the reference's first 'strength' "
            "scales (coarse layout and colours) and generates the finer scales. Connect to NextScale Sampler's "
            "'guide' (an Infinity encoding: NextScale Sampler (Text)'s).",
            inputs=[
                Tokens.Input(
                    "tokens", tooltip="The reference image, from NextScale Encode (batch 1, or one per image)."
                ),
                io.Int.Input(
                    "strength",
                    default=4,
                    min=0,
                    max=MAX_SCALES,
                    tooltip="How many coarse scales are copied from the reference: 0 ignores it, a few keep "
                    "layout and colours, all scales return the reference itself (10 in VAR's schedules).",
                ),
            ],
            outputs=[Guide.Output("guide", display_name="guide")],
        )

    @classmethod
    def execute(cls, tokens: NextScaleTokens, strength: int) -> io.NodeOutput:
        return io.NodeOutput(image_to_image(tokens, strength))


NODES = [NextScaleInpaintGuide, NextScaleImageToImageGuide]
