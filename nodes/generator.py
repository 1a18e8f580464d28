"""Generator nodes: load a VAR transformer, sampling options, and the one sampler node."""

from __future__ import annotations

import dataclasses
import math

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..models.core.checkpoint import read_state_dict
from ..models.core.errors import NextScaleError
from ..models.core.hooks import SamplerHooks
from ..models.core.imageops import model_to_image
from ..models.core.tokens import NextScaleTokens
from ..models.var.classes import class_index, default_class_names, imagenet_class_names, parse_class_list
from ..models.var.model import VAR
from ..models.var.sampler import CFG_SCHEDULES, SamplingOptions, sample
from ..models.var.tokenizer import MultiScaleVQVAE
from .model_files import (
    DTYPES,
    LoadedModel,
    check_kind,
    file_class_names,
    load_model,
    model_choices,
    read_embedded_card,
)
from .sockets import CATEGORY, Control, Generator, Guide, KVPolicy, SamplerOptions, Tokenizer, Tokens
from .validation import check_combos

MAX_BATCH = 64
PREVIEW_LATENT_SIDE = 8  # previews decode at most an 8x8 latent: cheap even for the official tokenizer


def build_generator(path: str) -> VAR:
    state_dict = read_state_dict(path, what="generator")
    check_kind(state_dict, path, "var-generator")
    return VAR.from_state_dict(state_dict, path=path, config=VAR.config_from_file(path))


def class_choices() -> list[str]:
    """The embedded model's classes first, then those of generator files in the model folder, then ImageNet-1k's
    (official checkpoints); each name once."""
    embedded = list(read_embedded_card().get("class_names", []))
    return list(dict.fromkeys(embedded + file_class_names() + list(imagenet_class_names())))


def generator_class_names(var: VAR) -> tuple[str, ...]:
    return tuple(var.class_names) if var.class_names else default_class_names(var.config.num_classes)


def check_pair(var: VAR, vae: MultiScaleVQVAE, generator: LoadedModel, tokenizer: LoadedModel) -> None:
    """A generator and a tokenizer work together only with the same vocabulary and latent channels."""
    if not isinstance(vae, MultiScaleVQVAE) or not isinstance(var, VAR):
        raise NextScaleError(
            f"'{generator.name}' and '{tokenizer.name}' are not a VAR generator and tokenizer: Infinity models and "
            f"their tokenizers go to NextScale Sampler (Text)"
        )
    problems = []
    if var.config.vocab_size != vae.config.vocab_size:
        problems.append(f"vocabulary {var.config.vocab_size} vs {vae.config.vocab_size}")
    if var.config.cvae != vae.config.z_channels:
        problems.append(f"latent channels {var.config.cvae} vs {vae.config.z_channels}")
    if problems:
        raise NextScaleError(
            f"generator '{generator.name}' and tokenizer '{tokenizer.name}' do not belong together "
            f"({'; '.join(problems)}). Official VAR generators use vae_ch160v4096z32; the embedded generator uses "
            f"the embedded tokenizer"
        )


class NextScaleLoadGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadGenerator",
            display_name="NextScale Load Generator",
            category=CATEGORY,
            description="Loads a VAR transformer (official var_d16.pth ... var_d36.pth, or compatible files) from "
            "models/nextscale, or the small embedded generator that ships with the pack. Depth, width, schedule "
            "and classes are read from the file.",
            inputs=[
                io.Combo.Input(
                    "generator_name",
                    options=model_choices("generator"),
                    tooltip="File in ComfyUI/models/nextscale (.safetensors or .pth). 'nextscale-embedded' is the "
                    "pack's own small class-conditional model (64 px glyphs and shapes).",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPES,
                    default="auto",
                    tooltip="Weight precision. auto: float32 on CPU, bfloat16 (or float16) on GPU. The residual "
                    "stream and the logits stay float32 whatever you pick. On a CPU with AMX or AVX512-BF16 (recent "
                    "Xeons) bfloat16 samples several times faster, with slightly different images.",
                ),
            ],
            outputs=[Generator.Output("generator", display_name="generator")],
        )

    @classmethod
    def validate_inputs(cls, generator_name: str, dtype: str) -> bool | str:
        return check_combos(generator_name=(generator_name, model_choices("generator")), dtype=(dtype, DTYPES))

    @classmethod
    def execute(cls, generator_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load_model(generator_name, "generator", dtype, build_generator))


class NextScaleSamplerOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleSamplerOptions",
            display_name="NextScale Sampler Options",
            category=CATEGORY,
            description="Extra sampling settings for NextScale Sampler: temperature (one value or one per scale), "
            "the CFG schedule across scales, and per-scale previews.",
            inputs=[
                io.Float.Input(
                    "temperature", default=1.0, min=0.01, max=5.0, step=0.01,
                    tooltip="Softmax temperature of every scale.",
                ),
                io.String.Input(
                    "scale_temperatures",
                    default="",
                    tooltip="Optional comma-separated temperature per scale (coarse to fine), e.g. '1.2,1.1,1,1,1,"
                    "0.9,0.9,0.8,0.8,0.8'; overrides 'temperature' where given.",
                ),
                io.Combo.Input(
                    "cfg_schedule",
                    options=list(CFG_SCHEDULES),
                    default="linear",
                    tooltip="linear: VAR's ramp, no guidance at the first scale and the full cfg at the last; "
                    "constant: the same cfg at every scale.",
                ),
                io.Boolean.Input(
                    "preview", default=True, tooltip="Show the partial image after every scale while sampling."
                ),
            ],
            outputs=[SamplerOptions.Output("options", display_name="options")],
        )

    @classmethod
    def validate_inputs(cls, cfg_schedule: str) -> bool | str:
        return check_combos(cfg_schedule=(cfg_schedule, CFG_SCHEDULES))

    @classmethod
    def execute(cls, temperature: float, scale_temperatures: str, cfg_schedule: str, preview: bool) -> io.NodeOutput:
        temps: float | list[float] = temperature
        if scale_temperatures.strip():
            try:
                temps = [float(t) for t in scale_temperatures.split(",")]
            except ValueError:
                raise NextScaleError(
                    f"scale_temperatures '{scale_temperatures}' must be comma-separated numbers, one per scale"
                ) from None
            if any(not 0.01 <= t <= 5.0 for t in temps):
                raise NextScaleError("every scale temperature must lie in 0.01..5.0")
        return io.NodeOutput({"temperature": temps, "cfg_schedule": cfg_schedule, "preview": preview})


class NextScaleSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleSampler",
            display_name="NextScale Sampler",
            category=CATEGORY,
            description="Generates per-scale token maps coarse to fine with a VAR generator: classifier-free "
            "guidance with VAR's ramp, top-k/top-p sampling, one progress step and preview per scale. Batch item i "
            "uses seed + i, so any image of a batch can be reproduced alone.",
            inputs=[
                Generator.Input("generator", tooltip="From NextScale Load Generator."),
                Tokenizer.Input("tokenizer", tooltip="The tokenizer the generator was trained with (for previews "
                                "and the next-scale inputs)."),
                io.Combo.Input(
                    "class_name",
                    options=class_choices(),
                    tooltip="Class to generate: the embedded model's classes come first, then ImageNet-1k's for "
                    "official checkpoints.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Random seed. Batch item i uses seed + i.",
                ),
                io.Float.Input(
                    "cfg", default=4.0, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="Classifier-free guidance strength (VAR's demo uses 4; FID runs use 1.5). The embedded "
                    "model's samples match its data best near 2 (its card).",
                ),
                io.Int.Input(
                    "top_k", default=900, min=0, max=100000, tooltip="Keep the k most likely codes (0 = off)."
                ),
                io.Float.Input(
                    "top_p", default=0.95, min=0.0, max=1.0, step=0.01,
                    tooltip="Keep the smallest set of codes whose probability reaches p (0 = off).",
                ),
                io.Boolean.Input(
                    "more_smooth",
                    default=False,
                    tooltip="VAR's Gumbel-softmax smoothing for visually smoother images (not used for FID).",
                ),
                io.Int.Input(
                    "batch_size", default=1, min=1, max=MAX_BATCH,
                    tooltip="Images per class (each class of the class list gets this many).",
                ),
                io.String.Input(
                    "class_list",
                    default="",
                    optional=True,
                    tooltip="Optional comma-separated classes (names or indices) for a mixed batch, e.g. "
                    "'circle, star, 3'; overrides class_name. Each gets batch_size images.",
                ),
                SamplerOptions.Input("options", optional=True, tooltip="From NextScale Sampler Options."),
                Guide.Input(
                    "guide",
                    optional=True,
                    tooltip="From NextScale Inpaint Guide or NextScale Image to Image Guide: which tokens of a "
                    "reference image to keep at each scale (inpaint, outpaint, class edit, image to image).",
                ),
                Control.Input(
                    "control",
                    optional=True,
                    tooltip="From a NextScale control node: a control image injected into the generator at every "
                    "scale (CAR weights or a trained adapter).",
                ),
                KVPolicy.Input(
                    "kv_policy",
                    optional=True,
                    tooltip="From a NextScale KV Policy node: what the KV cache keeps across scales (default: "
                    "everything, VAR's exact cache).",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, class_name: str) -> bool | str:
        return check_combos(class_name=(class_name, class_choices()))

    @classmethod
    def execute(
        cls,
        generator: LoadedModel,
        tokenizer: LoadedModel,
        class_name: str,
        seed: int,
        cfg: float,
        top_k: int,
        top_p: float,
        more_smooth: bool,
        batch_size: int,
        class_list: str = "",
        options: dict | None = None,
        guide=None,
        control=None,
        kv_policy=None,
    ) -> io.NodeOutput:
        if not (math.isfinite(cfg) and math.isfinite(top_p)):  # NaN passes ComfyUI's min/max check
            raise NextScaleError(f"cfg = {cfg} and top_p = {top_p} must be finite numbers")
        var: VAR = generator.ready()
        vae: MultiScaleVQVAE = tokenizer.ready()
        check_pair(var, vae, generator, tokenizer)
        labels_B, sampling, preview = sampling_inputs(
            var, class_name, class_list, batch_size, cfg, top_k, top_p, more_smooth, options
        )
        on_scale = scale_callback(cls.hidden.unique_id, vae, var.patch_nums, preview)
        B, device = len(labels_B), generator.device
        hooks = SamplerHooks(
            callback=on_scale,
            guide=None if guide is None else guide.bind(vae, var.patch_nums, B, device),
            control=None if control is None else control.bind(var, vae, B, device),
            kv_policy=None if kv_policy is None else kv_policy.bind(var, B, device),
        )
        tokens: NextScaleTokens = sample(
            var, vae, labels_B, seed=seed, options=sampling, hooks=hooks, device=device
        )
        return io.NodeOutput(tokens.to("cpu"))


def sampling_inputs(
    var: VAR, class_name: str, class_list: str, batch_size: int, cfg: float, top_k: int, top_p: float,
    more_smooth: bool, options: dict | None,
) -> tuple[torch.Tensor, SamplingOptions, bool]:
    """The sampler node's inputs as ``(labels_B, SamplingOptions, preview)``, checked against the generator."""
    names = generator_class_names(var)
    classes = parse_class_list(class_list, names) or [class_index(class_name, names)]
    if len(classes) * batch_size > MAX_BATCH:
        raise NextScaleError(
            f"{len(classes)} classes x batch size {batch_size} = {len(classes) * batch_size} images; "
            f"at most {MAX_BATCH} per sampler node"
        )
    labels_B = torch.tensor(classes, dtype=torch.long).repeat_interleave(batch_size)
    extras = dict(options or {})
    preview = extras.pop("preview", True)
    sampling = dataclasses.replace(
        SamplingOptions(), cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, **extras
    )
    K = len(var.patch_nums)
    if isinstance(sampling.temperature, list) and len(sampling.temperature) not in (1, K):
        raise NextScaleError(
            f"scale_temperatures has {len(sampling.temperature)} values; this generator has {K} scales"
        )
    return labels_B, sampling, preview


def scale_callback(node_id, vae: MultiScaleVQVAE, patch_nums, preview: bool):
    """The sampler's per-scale callback: an interrupt check, one progress tick and (optionally) a preview."""
    pbar = comfy.utils.ProgressBar(len(patch_nums), node_id=node_id)

    def on_scale(si: int, num_scales: int, f_hat: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        image = preview_image(vae, f_hat, patch_nums[si]) if preview else None
        pbar.update_absolute(si + 1, num_scales, image)

    return on_scale


def preview_image(vae: MultiScaleVQVAE, f_hat_BChw: torch.Tensor, pn: int):
    """The partial image of the first batch item, decoded from at most an 8x8 latent (cheap)."""
    from comfy.cli_args import args
    from PIL import Image

    side = min(pn, PREVIEW_LATENT_SIDE, f_hat_BChw.shape[-1])
    f = torch.nn.functional.interpolate(f_hat_BChw[:1].float(), size=(side, side), mode="area")
    with torch.inference_mode():
        img = model_to_image(vae.fhat_to_img(f.to(next(vae.parameters()).dtype)))[0]
    pil = Image.fromarray((img.cpu().numpy() * 255).round().astype("uint8"))
    return ("JPEG", pil, args.preview_size)


NODES = [NextScaleLoadGenerator, NextScaleSamplerOptions, NextScaleSampler]
