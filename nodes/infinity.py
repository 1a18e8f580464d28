"""Infinity nodes: load the text-to-image transformer and its BSQ tokenizer, and the text sampler.

Text comes from NextScale Text Encode (T5) (or ComfyUI's CLIP Text Encode with the same encoder) as standard
CONDITIONING; the tokens go to the usual NextScale Decode.
"""

from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.core.hooks import SamplerHooks
from ..models.core.imageops import image_to_model
from ..models.core.tokens import NextScaleBitTokens
from ..models.infinity.editing import bind_bits, check_reference
from ..models.infinity.sampler import InfinityOptions, KeepScales, TextCondition, latent_scales
from ..models.infinity.schedule import RESOLUTIONS, InfinitySchedule
from ..models.var.editing import EditSpec
from .generator import bind_policy, check_pair, framed_like_reference, refuse_hooks, scale_callback
from .model_files import model_choices
from .service import TRANSFORMER_DTYPES, NextScaleModel, load, not_found, ready_batch, sub_batches
from .sockets import CATEGORY, Accel, Guide, InfinityModel, KVPolicy, Tokenizer, Tokens
from .text_encoder import check_text_width
from .validation import check_combos, check_file, check_numbers

LOADER = "NextScale Load Infinity"
INFINITY_CATEGORY = f"{CATEGORY}/infinity"
MAX_BATCH = 16

# Aspect ratios offered, as width:height, with the template (h / w) each picks (upstream ``dynamic_resolution.py``).
ASPECTS = {
    "1:1": 1.0,
    "4:5 portrait": 1.25,
    "3:4 portrait": 1.333,
    "2:3 portrait": 1.5,
    "4:7 portrait": 1.75,
    "1:2 portrait": 2.0,
    "2:5 portrait": 2.5,
    "1:3 portrait": 3.0,
    "5:4 landscape": 0.8,
    "4:3 landscape": 0.75,
    "3:2 landscape": 0.666,
    "7:4 landscape": 0.571,
    "2:1 landscape": 0.5,
    "5:2 landscape": 0.4,
    "3:1 landscape": 0.333,
}
RESOLUTION_CHOICES = list(RESOLUTIONS)


class NextScaleLoadInfinity(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadInfinity",
            display_name="NextScale Load Infinity",
            category=INFINITY_CATEGORY,
            description="Loads an Infinity text-to-image transformer (infinity_2b_reg.pth, or the 8B's folder of "
            "shards) and its BSQ tokenizer (infinity_vae_d32reg.pth; the 8B's infinity_vae_d56_f8_14_patchify.pth) "
            "from models/nextscale, or the pack's small embedded text-to-image model (nextscale-embedded-t2i, 64 px). "
            "Sizes are read from the files; loading is strict.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    display_name="model",
                    options=model_choices(LOADER, "generator", shards=True),
                    tooltip="Transformer file (.pth or .safetensors) or folder of shards in ComfyUI/models/nextscale, "
                    "from the Hugging Face repository FoundationVision/Infinity. 'nextscale-embedded-t2i' is the "
                    "pack's own small 64 px model (sample it at resolution 0.06M, 1:1, with its text encoder).",
                ),
                io.Combo.Input(
                    "tokenizer_name",
                    display_name="tokenizer",
                    options=model_choices(LOADER, "tokenizer"),
                    tooltip="The BSQ tokenizer that goes with the transformer (2B: infinity_vae_d32reg.pth; "
                    "'nextscale-embedded-t2i' with the embedded model).",
                ),
                io.Combo.Input(
                    "dtype",
                    options=TRANSFORMER_DTYPES,
                    default="auto",
                    tooltip="Transformer precision. auto: ComfyUI's choice for the device and its --*-unet flags "
                    "(float32 on CPU, bfloat16 on recent GPUs). The tokenizer stays float32 (unless --fp16-vae / "
                    "--bf16-vae) and logits are always float32. fp8_e4m3fn: weight matrices stored in 8 bits with "
                    "ComfyUI's per-tensor scales (half of bfloat16's memory), computed in bfloat16/float16.",
                ),
            ],
            outputs=[
                InfinityModel.Output("model", display_name="model"),
                Tokenizer.Output("tokenizer", display_name="tokenizer"),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name: str, tokenizer_name: str) -> bool | str:
        return (
            check_file(
                model_name, model_choices(LOADER, "generator", shards=True),
                lambda name: not_found(name, LOADER, "generator"),
            )
            or check_file(
                tokenizer_name, model_choices(LOADER, "tokenizer"), lambda name: not_found(name, LOADER, "tokenizer")
            )
            or True
        )

    @classmethod
    def execute(cls, model_name: str, tokenizer_name: str, dtype: str) -> io.NodeOutput:
        model = load(model_name, LOADER, "generator", dtype)
        tokenizer = load(tokenizer_name, LOADER, "tokenizer", "auto")
        return io.NodeOutput(model, tokenizer)


def text_from_conditioning(
    conditioning, batch_size: int, text_dim: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_BTC, mask_BT)`` from ComfyUI CONDITIONING: its first entry (a ``(b, T, C)`` tensor, with an
    ``attention_mask`` when the encoder padded), repeated to ``batch_size`` rows when it holds one prompt."""
    if not conditioning:
        raise NextScaleError(f"the {what} conditioning is empty: connect NextScale Text Encode (T5)")
    cond = conditioning[0][0]
    extra = conditioning[0][1] if len(conditioning[0]) > 1 else {}
    if not isinstance(cond, torch.Tensor) or cond.dim() != 3:
        raise NextScaleError(f"the {what} conditioning is not a (batch, tokens, channels) text encoding")
    check_text_width(cond.shape[-1], text_dim)
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    mask = torch.ones(cond.shape[:2], dtype=torch.bool) if mask is None else mask.reshape(cond.shape[:2]).bool()
    if cond.shape[0] == 1:
        cond, mask = cond.expand(batch_size, -1, -1), mask.expand(batch_size, -1)
    elif cond.shape[0] != batch_size:
        raise NextScaleError(
            f"the {what} conditioning holds {cond.shape[0]} prompts; use one prompt, or batch_size = {cond.shape[0]}"
        )
    return cond.float(), mask


def check_run_settings(node, aspect_ratio: str, resolution: str, **numbers) -> bool | str:
    """``validate_inputs`` of a node that samples Infinity: its aspect ratio and resolution among the choices, then
    ``numbers`` in ``node``'s input ranges."""
    return (
        check_combos(aspect_ratio=(aspect_ratio, list(ASPECTS)), resolution=(resolution, RESOLUTION_CHOICES))
        or check_numbers(node, **numbers)
        or True
    )


def check_levels(model: NextScaleModel, resolution: str, num_scales: int) -> None:
    """Refuse a resolution with more scales than the transformer has level embeddings (the embedded text-to-image
    model has 7: resolution 0.06M only)."""
    levels = model.module.config.num_levels
    if num_scales > levels:
        fitting = [r for r, n in RESOLUTIONS.items() if n <= levels]
        fix = f"choose resolution {' or '.join(fitting)}" if fitting else "no resolution of this node fits it"
        raise NextScaleError(
            f"resolution {resolution} samples {num_scales} scales, but '{model.name}' was trained for at most "
            f"{levels}: {fix}"
        )


class NextScaleTextSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleTextSampler",
            display_name="NextScale Sampler (Text)",
            category=INFINITY_CATEGORY,
            description="Generates bitwise token maps coarse to fine with an Infinity model from a text prompt: "
            "constant classifier-free guidance on the logits, temperature tau, top-k/top-p per bit, one progress "
            "step and preview per scale. Optionally keeps the first scales of an input image (image to image), "
            "or, through 'guide', an encoded image outside a mask (inpaint and outpaint with a prompt). "
            "Batch item i uses seed + i.",
            inputs=[
                InfinityModel.Input("model", tooltip="From NextScale Load Infinity."),
                Tokenizer.Input("tokenizer", tooltip="The image decoder (BSQ tokenizer) from NextScale Load Infinity."),
                io.Conditioning.Input(
                    "positive", tooltip="The prompt, from NextScale Text Encode (T5) (flan-t5-xl). ComfyUI's "
                    "weighting syntax (word:1.2) works there."
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Random seed. Batch item i uses seed + i.",
                ),
                io.Float.Input(
                    "cfg", default=3.0, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="How closely the picture follows the prompt: 1 = not pushed, higher = closer "
                    "(classifier-free guidance, cfg * cond + (1 - cfg) * uncond on every scale; Infinity's default 3).",
                ),
                io.Float.Input(
                    "tau", default=0.5, min=0.01, max=5.0, step=0.01,
                    tooltip="Randomness: lower gives cleaner, more literal pictures, higher more varied ones "
                    "(temperature of the bit logits; Infinity-2B's default 0.5, the 8B's 1.0).",
                ),
                io.Int.Input("top_k", default=900, min=0, max=100000, tooltip="Top-k per bit pair (>= 2 changes "
                             "nothing; kept for parity with upstream's settings; 0 = off)."),
                io.Float.Input(
                    "top_p", default=0.97, min=0.0, max=1.0, step=0.01,
                    tooltip="Top-p per bit: 0.97 makes every bit whose minority probability is at most 0.03 "
                    "deterministic (0 = off).",
                ),
                io.Combo.Input(
                    "aspect_ratio", options=list(ASPECTS), default="1:1",
                    tooltip="Width:height; each picks one of Infinity's 15 scale templates.",
                ),
                io.Combo.Input(
                    "resolution", options=RESOLUTION_CHOICES, default="1M",
                    tooltip="Pixel count: 0.06M = 7 scales (256 px square), 0.25M = 10 (512 px), 0.60M = 12 "
                    "(768 px), 1M = 13 (1024 px, what the 2B was trained for).",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="Images per prompt."),
                io.Conditioning.Input(
                    "negative", optional=True,
                    tooltip="Optional negative prompt for the unconditional rows. Without it, Infinity's learned "
                    "empty-prompt embedding is used (upstream's default).",
                ),
                KVPolicy.Input(
                    "kv_policy", optional=True,
                    tooltip="From NextScale KV Policy: what the KV cache keeps across scales (ScaleKV and HACK "
                    "with a profile from NextScale KV Calibrate (Text) at this resolution and aspect ratio).",
                ),
                io.Image.Input(
                    "image", optional=True,
                    tooltip="Optional image for image to image: it is resized to the output size, encoded, and its "
                    "first keep_scales scales are kept.",
                ),
                io.Int.Input(
                    "keep_scales", default=0, min=0, max=13, optional=True,
                    tooltip="With an image: how many coarse scales to keep from it (0 = none; more keeps more of "
                    "its layout and colours).",
                ),
                Accel.Input(
                    "accel",
                    optional=True,
                    tooltip="From NextScale Acceleration: token pruning, guidance stop and shortcut at the last "
                    "scales (default: off, the exact sampler).",
                ),
                Guide.Input(
                    "guide",
                    optional=True,
                    tooltip="Inpaint / outpaint with the prompt: NextScale Inpaint Guide (or Image to Image Guide) "
                    "of an image encoded by NextScale Encode with this tokenizer, its schedule set to this "
                    "resolution and aspect ratio (e.g. '0.06M'). The bits outside the mask are kept at every scale, "
                    "the masked area is drawn from the prompt to fit them. Use it instead of image + keep_scales.",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(
        cls, aspect_ratio: str, resolution: str, cfg: float | None = None, tau: float | None = None,
        top_p: float | None = None,
    ) -> bool | str:
        return check_run_settings(cls, aspect_ratio, resolution, cfg=cfg, tau=tau, top_p=top_p)

    @classmethod
    def execute(
        cls,
        model: NextScaleModel,
        tokenizer: NextScaleModel,
        positive,
        seed: int,
        cfg: float,
        tau: float,
        top_k: int,
        top_p: float,
        aspect_ratio: str,
        resolution: str,
        batch_size: int,
        negative=None,
        kv_policy=None,
        image: torch.Tensor | None = None,
        keep_scales: int = 0,
        accel=None,
        guide: EditSpec | None = None,
    ) -> io.NodeOutput:
        check_pair(model, tokenizer)
        family = model.family
        keep = image is not None and keep_scales > 0
        refuse_hooks(family, kv_policy=kv_policy, accel=accel)
        schedule = InfinitySchedule.from_template(ASPECTS[aspect_ratio], resolution)
        check_levels(model, resolution, schedule.num_scales)
        if keep and keep_scales > schedule.num_scales:
            raise NextScaleError(f"keep_scales = {keep_scales}, but this resolution has {schedule.num_scales} scales")
        latent = latent_scales(model.module, tokenizer.module, schedule)
        if guide is not None:
            if keep:
                raise NextScaleError(
                    "both 'guide' and image + keep_scales are connected: use one. For image to image from an "
                    "encoded image, NextScale Image to Image Guide into 'guide'; or disconnect 'guide' to keep the "
                    "first keep_scales scales of 'image'"
                )
            check_reference(guide, latent, tokenizer.module.codebook_dim, batch_size)
        text_dim = model.module.config.text_dim
        text, mask = text_from_conditioning(positive, batch_size, text_dim, "positive")
        neg = None if negative is None else text_from_conditioning(negative, 1, text_dim, "negative")
        workload = Workload(
            guided=cfg != 1, schedule=schedule, dtype=model.compute_dtype, decode_batch=1 if keep else 0,
            decode_dtype=tokenizer.compute_dtype, text_tokens=text.shape[1],
        )

        def need(images: int, spec=kv_policy):
            policy = bind_policy(spec, model, schedule)
            return family.memory(model.module, tokenizer.module, dataclasses.replace(
                workload, batch_size=images, kv_policy=policy))

        size = ready_batch(model, tokenizer, batch=batch_size, need=need, what="NextScale Sampler (Text)")
        bit_guide = None
        if keep:
            img = image_to_model(image[:1]).to(tokenizer.device)
            bit_guide = KeepScales(family.encode(tokenizer.module, img, latent, "stretch").bits, keep_scales)
        options = InfinityOptions(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, schedule=schedule)
        parts = []
        for start, stop in sub_batches(batch_size, size):
            if guide is not None:
                spec = guide.images(start, stop, batch_size)
                bit_guide = bind_bits(spec, tokenizer.module, latent, stop - start, model.device)
            hooks = SamplerHooks(
                callback=scale_callback(cls.hidden.unique_id, tokenizer, schedule.num_scales, True),
                guide=bit_guide,
                kv_policy=bind_policy(kv_policy, model, schedule),
                accel=accel,
            )
            condition = TextCondition(text[start:stop], mask[start:stop], neg)
            parts.append(family.sample(
                model.module, tokenizer.module, condition, seed=seed + start, options=options, hooks=hooks,
                device=model.device,
            ))
        tokens = parts[0] if len(parts) == 1 else NextScaleBitTokens.cat(parts)
        return io.NodeOutput(framed_like_reference(tokens, guide).to("cpu"))


NODES = [NextScaleLoadInfinity, NextScaleTextSampler]
