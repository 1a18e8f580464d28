"""NSARM nodes: load the super-resolution model with its tokenizer, and NextScale Upscale (IMAGE in, IMAGE out).

The upscale is a run of the NSARM family per tile (:mod:`..models.nsarm`): the tile is encoded, its first scales
mapped from it, the rest predicted, and the tiles blended (:mod:`..models.nsarm.tiles`). Progress counts every
scale of every tile, with a preview of the tile being made; an interrupt is honoured between transformer blocks.
"""

from __future__ import annotations

from dataclasses import replace

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.core.hooks import Control, SamplerHooks
from ..models.core.imageops import image_to_model, model_to_image
from ..models.nsarm import tiles as tiling_ops
from ..models.nsarm.family import LOADER
from ..models.nsarm.sampler import UpscaleCondition, UpscaleOptions, input_size, output_size
from ..models.nsarm.tiles import BLENDS, COLOR_FIXES, tile_count, upscale_tiled, upscale_whole
from .generator import bind_policy, preview_image, refuse_hooks
from .infinity import LOADER as INFINITY_LOADER
from .infinity import text_from_conditioning
from .model_files import model_choices
from .service import TRANSFORMER_DTYPES, NextScaleModel, load, not_found, ready_batch, sub_batches
from .sockets import CATEGORY, KVPolicy, NSARMModel, Tokenizer
from .validation import check_combos, check_file, check_numbers

UPSCALE_CATEGORY = f"{CATEGORY}/upscale"
TILINGS = ("tiles", "whole image")
MAX_SIDE = 16384  # output pixels per side


class NextScaleLoadNSARM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadNSARM",
            display_name="NextScale Load NSARM",
            category=UPSCALE_CATEGORY,
            description="Loads the NSARM super-resolution model (NSARM.pth: Infinity-8B with its transformation "
            "network) and the 8B's BSQ tokenizer (infinity_vae_d56_f8_14_patchify.pth) from models/nextscale. "
            "Sizes are read from the files; loading is strict.",
            inputs=[
                io.Combo.Input(
                    "model_name", options=model_choices(),
                    tooltip="NSARM.pth (joined from NSARM_part_* with cat; github.com/Xiangtaokong/NSARM) in "
                    "ComfyUI/models/nextscale.",
                ),
                io.Combo.Input(
                    "tokenizer_name", options=model_choices(INFINITY_LOADER, "tokenizer"),
                    tooltip="infinity_vae_d56_f8_14_patchify.pth (Hugging Face FoundationVision/Infinity). "
                    "'nextscale-embedded-t2i' is the embedded text-to-image model's tokenizer, the one models trained "
                    "by python -m training.sr use.",
                ),
                io.Combo.Input(
                    "dtype", options=TRANSFORMER_DTYPES, default="auto",
                    tooltip="Transformer precision. auto: ComfyUI's choice for the device and its --*-unet flags "
                    "(bfloat16 on recent GPUs, as upstream runs it; fp8_e4m3fn under --fp8_e4m3fn-unet); "
                    "fp8_e4m3fn: 8-bit matrices with per-tensor scales, computing in bfloat16/float16 (about half of "
                    "bfloat16's memory). The tokenizer stays float32.",
                ),
            ],
            outputs=[
                NSARMModel.Output("model", display_name="model"),
                Tokenizer.Output("tokenizer", display_name="tokenizer"),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name: str, tokenizer_name: str) -> bool | str:
        return (
            check_file(model_name, model_choices(), lambda name: not_found(name, LOADER, "upscaler"))
            or check_file(
                tokenizer_name, model_choices(INFINITY_LOADER, "tokenizer"),
                lambda name: not_found(name, INFINITY_LOADER, "tokenizer"),
            )
            or True
        )

    @classmethod
    def execute(cls, model_name: str, tokenizer_name: str, dtype: str) -> io.NodeOutput:
        model = load(model_name, LOADER, "upscaler", dtype)
        tokenizer = load(tokenizer_name, INFINITY_LOADER, "tokenizer", "auto")
        return io.NodeOutput(model, tokenizer)


class InterruptBetweenBlocks(Control):
    """Raises ComfyUI's interrupt before any transformer block once the user has cancelled."""

    def block_input(self, si, layer, x_BlC):
        mm.throw_exception_if_processing_interrupted()
        return x_BlC


def check_upscaler(model: NextScaleModel, tokenizer: NextScaleModel) -> None:
    if model.role.name != "upscaler" or tokenizer.role.name != "tokenizer":
        raise NextScaleError(
            f"'{model.name}' is {model.kind.describe()} and '{tokenizer.name}' is {tokenizer.kind.describe()}: "
            f"connect the model and tokenizer outputs of {LOADER}"
        )
    model.family.check_pair(model.module, tokenizer.module)


class NextScaleUpscale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleUpscale",
            display_name="NextScale Upscale",
            category=UPSCALE_CATEGORY,
            description="Next-scale super-resolution with NSARM: each tile of the image is encoded, its first "
            "scales mapped from it, and the finer scales predicted (256 px in, 1024 px out for the released model). "
            "Any size and aspect: overlapping tiles blended without seams, or the whole image as one stretched "
            "tile. One progress step and preview per scale of every tile. Batch item i uses seed + i.",
            inputs=[
                NSARMModel.Input("model", tooltip="From NextScale Load NSARM."),
                Tokenizer.Input("tokenizer", tooltip="The BSQ tokenizer from NextScale Load NSARM."),
                io.Image.Input("image", tooltip="The image to upscale (any size; a batch is upscaled together)."),
                io.Int.Input(
                    "seed", default=1, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Random seed (upstream runs 1). Every tile uses it; batch item i uses seed + i.",
                ),
                io.Float.Input(
                    "scale_by", default=4.0, min=1.0, max=8.0, step=0.05, round=0.01,
                    tooltip="Output size over input size. The model upscales 4x (256 to 1024 px); other factors "
                    "resample the input first (bicubic) so that the output has the size asked for.",
                ),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="Guidance: cfg * cond + (1 - cfg) * uncond (upstream runs 1: no guidance).",
                ),
                io.Float.Input(
                    "tau", default=0.5, min=0.01, max=5.0, step=0.01,
                    tooltip="Temperature of the predicted bits (upstream's 0.5).",
                ),
                io.Int.Input(
                    "input_scales", default=7, min=0, max=13,
                    tooltip="How many coarse scales come from the input image (the released model maps 7; fewer "
                    "lets the model redraw more of the layout and colours). More than the model maps takes every "
                    "mapped scale.",
                ),
                io.Combo.Input(
                    "tiling", options=list(TILINGS), default="tiles",
                    tooltip="tiles: overlapping tiles of the model's input size (smaller images are padded), "
                    "blended; whole image: the image stretched to one square tile and the result stretched back.",
                ),
                io.Float.Input(
                    "tile_overlap", default=0.125, min=0.0, max=0.5, step=0.005,
                    tooltip="Overlap of neighbouring tiles, as a fraction of a tile.",
                ),
                io.Combo.Input(
                    "blend", options=list(BLENDS), default="seamless",
                    tooltip="seamless: tiles fade into each other across the overlap; none: later tiles overwrite.",
                ),
                io.Combo.Input(
                    "color_fix", options=list(COLOR_FIXES), default="adain + wavelet",
                    tooltip="Upstream's colour correction against the input upscaled bicubically (it applies "
                    "both): adain matches channel means and spreads, wavelet takes the low frequencies.",
                ),
                io.Conditioning.Input(
                    "positive", optional=True,
                    tooltip="Optional prompt from NextScale Text Encode (T5), e.g. a caption of the image "
                    "(upstream encodes its captions or an empty text). Without it the model's learned empty prompt "
                    "is used.",
                ),
                KVPolicy.Input(
                    "kv_policy", optional=True,
                    tooltip="From NextScale KV Policy: what the KV cache keeps across scales.",
                ),
            ],
            outputs=[io.Image.Output("upscaled", display_name="image")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(
        cls, tiling: str, blend: str, color_fix: str, scale_by: float | None = None, cfg: float | None = None,
        tau: float | None = None, tile_overlap: float | None = None,
    ) -> bool | str:
        return (
            check_combos(tiling=(tiling, TILINGS), blend=(blend, BLENDS), color_fix=(color_fix, COLOR_FIXES))
            or check_numbers(cls, scale_by=scale_by, cfg=cfg, tau=tau, tile_overlap=tile_overlap)
            or True
        )

    @classmethod
    def execute(
        cls,
        model: NextScaleModel,
        tokenizer: NextScaleModel,
        image: torch.Tensor,
        seed: int,
        scale_by: float,
        cfg: float,
        tau: float,
        input_scales: int,
        tiling: str,
        tile_overlap: float,
        blend: str,
        color_fix: str,
        positive=None,
        kv_policy=None,
    ) -> io.NodeOutput:
        check_upscaler(model, tokenizer)
        family = model.family
        refuse_hooks(family, kv_policy=kv_policy)
        net = model.module
        input_scales = min(input_scales, net.mapper_config.num_scales)  # the default, 7, is the 8B's: cap it
        images = image_to_model(image)
        B, _, H, W = images.shape
        size = (round(H * scale_by), round(W * scale_by))
        if max(size) > MAX_SIDE:
            raise NextScaleError(f"the output would be {size[1]}x{size[0]} px; lower scale_by (at most {MAX_SIDE} px)")
        tile_in, tile_out = input_size(net, tokenizer.module), output_size(net, tokenizer.module)
        tiles = 1 if tiling == "whole image" else tile_count(size, tile_in, tile_out, tile_overlap)
        text = mask = None
        if positive is not None:
            text, mask = text_from_conditioning(positive, B, net.config.text_dim, "positive")
        schedule = net.schedule()
        workload = Workload(
            guided=cfg != 1, schedule=schedule, dtype=model.compute_dtype, decode_dtype=tokenizer.compute_dtype
        )

        def need(images: int, spec=kv_policy):
            """One tile of ``images`` images: sampled, then decoded."""
            return family.memory(net, tokenizer.module, replace(
                workload, batch_size=images, decode_batch=images, kv_policy=bind_policy(spec, model, schedule)))

        per_run = ready_batch(model, tokenizer, batch=B, need=need, what="NextScale Upscale")
        K = schedule.num_scales
        pbar = comfy.utils.ProgressBar(tiles * K, node_id=cls.hidden.unique_id)
        options = UpscaleOptions(cfg=cfg, tau=tau, input_scales=input_scales)

        def run(tile_B3SS: torch.Tensor, index: int) -> torch.Tensor:
            def on_scale(si: int, _: int, latent: torch.Tensor) -> None:
                mm.throw_exception_if_processing_interrupted()
                pbar.update_absolute(index * K + si + 1, tiles * K, preview_image(tokenizer, latent))

            parts = []
            for start, stop in sub_batches(B, per_run):
                hooks = SamplerHooks(
                    control=InterruptBetweenBlocks(), kv_policy=bind_policy(kv_policy, model, schedule),
                    callback=on_scale,
                )
                condition = UpscaleCondition(
                    tile_B3SS[start:stop].to(tokenizer.device),
                    None if text is None else text[start:stop], None if mask is None else mask[start:stop],
                )
                tokens = family.sample(net, tokenizer.module, condition, seed=seed + start, options=options,
                                       hooks=hooks, device=model.device)
                parts.append(tokenizer.family.decode(tokenizer.module, tokens).cpu())
            return torch.cat(parts)

        if tiling == "whole image":
            out = upscale_whole(run, images, size, tile_in)
        else:
            out = upscale_tiled(run, images, size, tile_in, tile_out, tile_overlap, blend)
        return io.NodeOutput(model_to_image(tiling_ops.color_fix(out, images, color_fix)))


NODES = [NextScaleLoadNSARM, NextScaleUpscale]
