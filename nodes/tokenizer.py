"""Tokenizer nodes: load a tokenizer, encode images to per-scale tokens, decode them (all through the tokenizer's
family)."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.core.imageops import RESIZE_MODES, image_to_model, model_to_image
from ..models.core.memory import largest_batch, size
from ..models.var.editing import composite
from .generator import check_pair
from .model_files import model_choices
from .service import DTYPES, NextScaleModel, load, not_found, ready
from .sockets import CATEGORY, Generator, Tokenizer, Tokens
from .validation import check_combos, check_file

LOADER = "NextScale Load Tokenizer"
FEATHER_PX = 4  # Decode's default soft edge of a composite, in pixels of the picture
ENCODE_CHUNK = 8  # images encoded at once: bounds peak memory on large batches
MAX_BANDS = 64  # the most bands of rows one image is decoded in when it does not fit whole

log = logging.getLogger("NextScale")


class NextScaleLoadTokenizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadTokenizer",
            display_name="NextScale Load Tokenizer",
            category=CATEGORY,
            description="Loads a VAR multi-scale VQ-VAE tokenizer (e.g. the official vae_ch160v4096z32.pth) from "
            "models/nextscale, or the small embedded tokenizer that ships with the pack.",
            inputs=[
                io.Combo.Input(
                    "tokenizer_name",
                    display_name="tokenizer",
                    options=model_choices(LOADER, "tokenizer"),
                    tooltip="File in ComfyUI/models/nextscale (.safetensors or .pth). 'nextscale-embedded' is the "
                    "pack's own small 64 px model.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPES,
                    default="auto",
                    tooltip="Weight precision. auto: float32 (the tokenizer is small and precision-sensitive), "
                    "unless ComfyUI's --fp16-vae / --bf16-vae flags say otherwise.",
                ),
            ],
            outputs=[Tokenizer.Output("tokenizer", display_name="tokenizer")],
        )

    @classmethod
    def validate_inputs(cls, tokenizer_name: str) -> bool | str:
        return check_file(
            tokenizer_name, model_choices(LOADER, "tokenizer"), lambda name: not_found(name, LOADER, "tokenizer")
        ) or True

    @classmethod
    def execute(cls, tokenizer_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load(tokenizer_name, LOADER, "tokenizer", dtype))


class NextScaleEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleEncode",
            display_name="NextScale Encode",
            category=CATEGORY,
            description="Encodes images into per-scale token maps (1x1 up to the full latent grid) with the "
            "tokenizer's residual quantizer (an Infinity tokenizer: bits per scale, for the guides of NextScale "
            "Sampler (Text)). Images are fitted to the schedule's square resolution first, and the tokens record "
            "how, so the guides and Decode's composite work at the picture's own size.",
            inputs=[
                Tokenizer.Input("tokenizer", tooltip="From NextScale Load Tokenizer."),
                io.Image.Input("image", tooltip="Images to encode; any size, resized with the mode below."),
                io.Combo.Input(
                    "resize",
                    options=RESIZE_MODES,
                    default="center crop",
                    tooltip="How images that are not the model's square resolution are fitted: crop the centre, "
                    "stretch, or pad with black.",
                ),
                io.String.Input(
                    "schedule",
                    default="",
                    optional=True,
                    tooltip="Scale schedule, e.g. '512' or '1,2,3,4,6,9,13,18,24,32'. Empty: the tokenizer's "
                    "default. The last side times the downsampling factor is the resolution. With an Infinity "
                    "tokenizer: NextScale Sampler (Text)'s resolution and aspect ratio width:height, e.g. '0.06M' "
                    "(the embedded model) or '1M 4:3' (empty: '1M', 1:1); resize modes other than stretch need 1:1.",
                ),
                Generator.Input(
                    "model",
                    optional=True,
                    tooltip="The model the tokens will guide (optional). Needed for Infinity-8B, which takes 2 x 2 "
                    "latent cells a token: its guides are encoded on grids twice as fine as the schedule's.",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
        )

    @classmethod
    def validate_inputs(cls, resize: str) -> bool | str:
        return check_combos(resize=(resize, RESIZE_MODES)) or True

    @classmethod
    def execute(
        cls, tokenizer: NextScaleModel, image: torch.Tensor, resize: str, schedule: str = "",
        model: NextScaleModel | None = None,
    ) -> io.NodeOutput:
        family = tokenizer.family
        scales = family.parse_schedule(schedule) if schedule.strip() else None
        if model is not None:
            check_pair(model, tokenizer)
            scales = family.guide_schedule(model.module, tokenizer.module, scales)
        workload = Workload(
            schedule=scales, decode_batch=min(ENCODE_CHUNK, len(image)), decode_dtype=tokenizer.compute_dtype
        )
        ready(tokenizer, memory=family.working_memory(None, tokenizer.module, workload))
        parts = []
        for chunk in torch.split(image, ENCODE_CHUNK):
            mm.throw_exception_if_processing_interrupted()
            img = image_to_model(chunk).to(tokenizer.device)
            parts.append(family.encode(tokenizer.module, img, scales, resize).to("cpu"))
        return io.NodeOutput(type(parts[0]).cat(parts))


def decode_memory(tokenizer: NextScaleModel, tokens, images: int | None = None, bands: int = 1) -> int:
    """Working memory of decoding ``images`` of ``tokens`` at once (None: a chunk, the family's ``decode_chunk``),
    each in ``bands`` bands of rows."""
    family = tokenizer.family
    workload = Workload(
        schedule=tokens.schedule, decode_batch=images or min(family.decode_chunk, tokens.batch_size),
        decode_dtype=tokenizer.compute_dtype, decode_bands=bands,
    )
    return family.working_memory(None, tokenizer.module, workload)


def decode_bands(tokenizer: NextScaleModel, tokens, free: int) -> int:
    """The fewest bands of rows (a power of two up to :data:`MAX_BANDS`) whose decode of one image fits ``free``
    bytes, for a family with ``banded_decode``; the most when none does (1: no banded decode)."""
    if not tokenizer.family.banded_decode:
        return 1
    bands = 2
    while bands < MAX_BANDS and decode_memory(tokenizer, tokens, 1, bands) > free:
        bands *= 2
    return bands


def decode_images(tokenizer: NextScaleModel, tokens, upto: int | None) -> torch.Tensor:
    """ComfyUI IMAGE of the tokens' first ``upto`` scales (None: all), decoded by the tokenizer's family a chunk at
    a time: the family's ``decode_chunk`` images, fewer when they do not fit the device's free memory; one image
    that does not fit is decoded in bands of rows where the family can (:func:`decode_bands`; BSQ: the same image
    up to fp32 rounding). The tokenizer must be ready."""
    family, images = tokenizer.family, []
    largest = min(family.decode_chunk, tokens.batch_size)
    free = mm.get_free_memory(tokenizer.device)
    chunk = largest_batch(lambda n: decode_memory(tokenizer, tokens, n), largest, free)
    bands = decode_bands(tokenizer, tokens, free) if chunk == 0 else 1
    if bands > 1:
        log.info("NextScale: decoding one image at a time in %d bands of rows (%s free on %s)", bands, size(free),
                 tokenizer.device)
    banded = {"bands": bands} if bands > 1 else {}
    chunk = max(1, chunk)
    for b in range(0, tokens.batch_size, chunk):
        mm.throw_exception_if_processing_interrupted()
        part = tokens.select(list(range(b, min(b + chunk, tokens.batch_size)))).to(tokenizer.device)
        decoded = family.decode(tokenizer.module, part, upto, **banded)
        images.append(model_to_image(decoded).to(mm.intermediate_device()))
    return torch.cat(images)


class NextScaleDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleDecode",
            display_name="NextScale Decode",
            category=CATEGORY,
            description="Decodes per-scale token maps to images. 'scales' > 0 decodes only the first k scales, "
            "to inspect how the image forms coarse to fine.",
            inputs=[
                Tokenizer.Input("tokenizer", tooltip="The tokenizer the tokens were made with."),
                Tokens.Input("tokens", tooltip="From NextScale Sampler or NextScale Encode."),
                io.Int.Input(
                    "scales",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="Decode only the first k scales (0 = all scales).",
                ),
                io.Image.Input(
                    "composite_image",
                    optional=True,
                    tooltip="Optional: the picture you edited, at its own size. The output is this picture with the "
                    "regenerated area pasted in (upscaled from the model's resolution, placed the way NextScale "
                    "Encode fitted the picture); where composite_mask is 0 it is exactly this picture.",
                ),
                io.Mask.Input(
                    "composite_mask",
                    optional=True,
                    tooltip="Where to paste, at the picture's size: 1 = the decoded image (the regenerated area), "
                    "0 = composite_image unchanged, in between = a blend.",
                ),
                io.Int.Input(
                    "feather",
                    default=FEATHER_PX,
                    min=0,
                    max=256,
                    optional=True,
                    tooltip="Soft edge of the paste, in pixels of the picture on each side of the mask's border, "
                    "for a seamless blend. 0 = a hard paste: exactly the mask.",
                ),
            ],
            outputs=[io.Image.Output("image", display_name="image")],
        )

    @classmethod
    def execute(
        cls,
        tokenizer: NextScaleModel,
        tokens,
        scales: int,
        composite_image: torch.Tensor | None = None,
        composite_mask: torch.Tensor | None = None,
        feather: int = FEATHER_PX,
    ) -> io.NodeOutput:
        if (composite_image is None) != (composite_mask is None):
            raise NextScaleError("a composite needs both composite_image and composite_mask (or neither)")
        if scales > tokens.num_scales:
            raise NextScaleError(f"scales = {scales}, but these tokens have only {tokens.num_scales} scales (0 = all)")
        upto = scales if 0 < scales < tokens.num_scales else None
        tokenizer.family.check_tokens(tokenizer.module, tokens)
        ready(tokenizer, memory=decode_memory(tokenizer, tokens))
        decoded = decode_images(tokenizer, tokens, upto)
        if composite_image is not None:
            decoded = composite(decoded, composite_image, composite_mask, tokens.extra.get("fit"), feather)
        return io.NodeOutput(decoded)


class NextScaleDecodeScales(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleDecodeScales",
            display_name="NextScale Decode Scales",
            category=CATEGORY,
            description="Decodes every prefix of the scales: for each image, the picture after scale 1, 2, ... "
            "up to the last, to see how it forms coarse to fine. Feed NextScale Image Grid with columns = the "
            "number of scales for one row per image.",
            inputs=[
                Tokenizer.Input("tokenizer", tooltip="The tokenizer the tokens were made with."),
                Tokens.Input("tokens", tooltip="From NextScale Sampler or NextScale Encode."),
            ],
            outputs=[
                io.Image.Output(
                    "images", display_name="images",
                    tooltip="batch x scales images, image by image: image 1 after scale 1..K, then image 2 ...",
                ),
                io.Int.Output("scales", display_name="scales", tooltip="The number of scales K."),
            ],
        )

    @classmethod
    def execute(cls, tokenizer: NextScaleModel, tokens) -> io.NodeOutput:
        tokenizer.family.check_tokens(tokenizer.module, tokens)
        ready(tokenizer, memory=decode_memory(tokenizer, tokens))
        K = tokens.num_scales
        stages = [decode_images(tokenizer, tokens, k if k < K else None) for k in range(1, K + 1)]
        images = torch.stack(stages, dim=1).flatten(0, 1)  # (B, K, H, W, C) -> image-major
        return io.NodeOutput(images, K)


NODES = [NextScaleLoadTokenizer, NextScaleEncode, NextScaleDecode, NextScaleDecodeScales]
