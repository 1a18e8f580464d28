"""Generator nodes: load a class-conditional generator, sampling options, and the one sampler node. Every model
call goes through the model's family (:mod:`..models.core.family`)."""

from __future__ import annotations

import dataclasses

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import Family, Workload
from ..models.core.hooks import SamplerHooks, refuse_unsupported
from ..models.core.imageops import model_to_image
from ..models.core.tokens import NextScaleTokens
from ..models.var.classes import class_index, imagenet_class_names, parse_class_list
from ..models.var.sampler import CFG_SCHEDULES, SamplingOptions
from .model_files import file_class_names, model_choices, read_embedded_card
from .service import TRANSFORMER_DTYPES, NextScaleModel, load, not_found, ready_batch, sub_batches
from .sockets import CATEGORY, Accel, Control, Generator, Guide, KVPolicy, SamplerOptions, Tokenizer, Tokens
from .validation import check_combos, check_file, check_numbers

LOADER = "NextScale Load Generator"
MAX_BATCH = 64


def class_choices() -> list[str]:
    """The embedded model's classes first, then those of generator files in the model folder, then ImageNet-1k's
    (official checkpoints); each name once."""
    embedded = list(read_embedded_card().get("class_names", []))
    return list(dict.fromkeys(embedded + file_class_names() + list(imagenet_class_names())))


def check_pair(generator: NextScaleModel, tokenizer: NextScaleModel) -> None:
    """A generator and a tokenizer of one family that work together (same vocabulary, latent channels, ...)."""
    roles = (generator.role.name, tokenizer.role.name)
    if roles != ("generator", "tokenizer") or generator.family is not tokenizer.family:
        raise NextScaleError(
            f"'{generator.name}' is {generator.kind.describe()} and '{tokenizer.name}' is "
            f"{tokenizer.kind.describe()}: connect a generator and the tokenizer of its family"
        )
    generator.family.check_pair(generator.module, tokenizer.module)


def bind_policy(spec, generator: NextScaleModel, schedule=None):
    """The per-run KV policy of a NEXTSCALE_KV_POLICY spec for ``generator``'s cache (None without a spec)."""
    if spec is None:
        return None
    geometry = generator.family.kv_geometry(generator.module, schedule)
    return spec.bind_scales(geometry.layers, geometry.heads, geometry.scales)


def refuse_hooks(family: Family, guide=None, control=None, kv_policy=None, accel=None) -> None:
    """Refuse, before anything is bound or loaded, a connected input whose hook the family's sampler lacks."""
    hooks = SamplerHooks(guide=guide, control=control, kv_policy=kv_policy, accel=accel)
    refuse_unsupported(hooks, family.hooks, family.title)


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
                    display_name="generator",
                    options=model_choices(LOADER, "generator"),
                    tooltip="File in ComfyUI/models/nextscale (.safetensors or .pth). 'nextscale-embedded' is the "
                    "pack's own small class-conditional model (64 px glyphs and shapes).",
                ),
                io.Combo.Input(
                    "dtype",
                    options=TRANSFORMER_DTYPES,
                    default="auto",
                    tooltip="Weight precision. auto: ComfyUI's choice for the device and its --force-fp32 / "
                    "--fp32-unet / --bf16-unet / --fp16-unet / --fp8_e4m3fn-unet flags (float32 on CPU, bfloat16 on "
                    "recent GPUs, float32 where float16 is broken). The residual stream and the logits stay float32 "
                    "whatever you pick. On a CPU with AMX or AVX512-BF16 (recent Xeons) bfloat16 samples several "
                    "times faster, with slightly different images. fp8_e4m3fn: weight matrices stored in 8 bits with "
                    "ComfyUI's per-tensor scales (half of bfloat16's memory), computed in bfloat16/float16.",
                ),
            ],
            outputs=[Generator.Output("generator", display_name="generator")],
        )

    @classmethod
    def validate_inputs(cls, generator_name: str) -> bool | str:
        return check_file(
            generator_name, model_choices(LOADER, "generator"), lambda name: not_found(name, LOADER, "generator")
        ) or True

    @classmethod
    def execute(cls, generator_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load(generator_name, LOADER, "generator", dtype))


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
                    tooltip="Randomness of every scale: higher gives more varied pictures, lower plainer ones (softmax "
                    "temperature).",
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
                    tooltip="How guidance grows from the coarse layout to the fine detail. linear: none at the "
                    "first scale, the full cfg at the last (VAR's ramp); constant: the same cfg at every scale.",
                ),
                io.Boolean.Input(
                    "preview", default=True, tooltip="Show the partial image after every scale while sampling."
                ),
            ],
            outputs=[SamplerOptions.Output("options", display_name="options")],
        )

    @classmethod
    def validate_inputs(cls, cfg_schedule: str, temperature: float | None = None) -> bool | str:
        return check_combos(cfg_schedule=(cfg_schedule, CFG_SCHEDULES)) or check_numbers(
            cls, temperature=temperature
        ) or True

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
            display_name="NextScale Sampler (VAR)",
            category=CATEGORY,
            description="Draws a picture of the chosen class coarse to fine with a VAR generator (next-scale "
            "autoregressive sampling): a 1x1 sketch, then ever finer scales, one progress step and preview per "
            "scale. Guidance (cfg) pulls the picture towards its class, growing from coarse to fine (VAR's ramp); "
            "top-k/top-p keep only likely codes. Batch item i uses seed + i, so any image of a batch can be "
            "reproduced alone.",
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
                    tooltip="Smoother, softer pictures (VAR's Gumbel-softmax smoothing; not used for FID).",
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
                Accel.Input(
                    "accel",
                    optional=True,
                    tooltip="From NextScale Acceleration: token pruning, guidance stop and shortcut at the last "
                    "scales (default: off, the exact sampler).",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, class_name: str, cfg: float | None = None, top_p: float | None = None) -> bool | str:
        return check_combos(class_name=(class_name, class_choices())) or check_numbers(
            cls, cfg=cfg, top_p=top_p
        ) or True

    @classmethod
    def execute(
        cls,
        generator: NextScaleModel,
        tokenizer: NextScaleModel,
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
        accel=None,
    ) -> io.NodeOutput:
        check_pair(generator, tokenizer)
        family = generator.family
        refuse_hooks(family, guide, control, kv_policy, accel)
        labels_B, sampling, preview = sampling_inputs(
            generator, class_name, class_list, batch_size, cfg, top_k, top_p, more_smooth, options
        )
        B, device = len(labels_B), generator.device
        controls = [] if control is None else control.models()
        workload = Workload(
            guided=sampling.cfg != 0, dtype=generator.compute_dtype, controls=tuple(m.module for m in controls),
            decode_dtype=tokenizer.compute_dtype,
        )

        def need(images: int, spec=kv_policy):
            policy = bind_policy(spec, generator)
            return family.memory(generator.module, tokenizer.module, dataclasses.replace(
                workload, batch_size=images, kv_policy=policy))

        size = ready_batch(generator, tokenizer, *controls, batch=B, need=need, what="NextScale Sampler")
        scales = family.kv_geometry(generator.module).scales
        parts = []
        for start, stop in sub_batches(B, size):
            labels = labels_B[start:stop]
            hooks = SamplerHooks(
                callback=scale_callback(cls.hidden.unique_id, tokenizer, len(scales), preview),
                **bind_images(guide, control, start, stop, B, generator, tokenizer, scales),
                kv_policy=bind_policy(kv_policy, generator),
                accel=accel,
            )
            parts.append(family.sample(
                generator.module, tokenizer.module, labels, seed=seed + start, options=sampling, hooks=hooks,
                device=device,
            ))
        tokens: NextScaleTokens = parts[0] if len(parts) == 1 else NextScaleTokens.cat(parts)
        return io.NodeOutput(framed_like_reference(tokens, guide).to("cpu"))


def bind_images(
    guide, control, start: int, stop: int, batch: int, generator: NextScaleModel, tokenizer: NextScaleModel, scales
) -> dict:
    """``guide`` and ``control`` (None: absent) of images ``start .. stop - 1`` of the batch, bound for a run on
    those images (a sub-batch of :func:`~.service.ready_batch`, or the whole batch)."""
    images, device = stop - start, generator.device
    return {
        "guide": None if guide is None else guide.images(start, stop, batch).bind(
            tokenizer.module, scales, images, device
        ),
        "control": None if control is None else control.images(start, stop, batch).bind(
            generator.module, tokenizer.module, images, device
        ),
    }


def framed_like_reference(tokens, guide):
    """``tokens`` with the fit of the guide's reference image (``extra["fit"]``, recorded by NextScale Encode): an
    edit is framed like the image it edits, so NextScale Decode's composite can lay it back onto that image."""
    reference = getattr(guide, "reference", None)  # the guides' EditSpec
    if reference is not None and "fit" in reference.extra:
        tokens.extra["fit"] = reference.extra["fit"]
    return tokens


def class_labels(
    generator: NextScaleModel, class_name: str, class_list: str, batch_size: int, max_batch: int
) -> torch.Tensor:
    """``labels_B``: each class of ``class_list`` (names or indices; ``class_name`` when empty) ``batch_size`` times,
    refused past ``max_batch`` images."""
    names = generator.family.class_names(generator.module)
    classes = parse_class_list(class_list, names) or [class_index(class_name, names)]
    if len(classes) * batch_size > max_batch:
        raise NextScaleError(
            f"{len(classes)} classes x batch size {batch_size} = {len(classes) * batch_size} images; "
            f"at most {max_batch} per sampler node"
        )
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(batch_size)


def sampling_inputs(
    generator: NextScaleModel, class_name: str, class_list: str, batch_size: int, cfg: float, top_k: int,
    top_p: float, more_smooth: bool, options: dict | None,
) -> tuple[torch.Tensor, SamplingOptions, bool]:
    """The sampler node's inputs as ``(labels_B, SamplingOptions, preview)``, checked against the generator."""
    family = generator.family
    labels_B = class_labels(generator, class_name, class_list, batch_size, MAX_BATCH)
    extras = dict(options or {})
    preview = extras.pop("preview", True)
    sampling = dataclasses.replace(
        SamplingOptions(), cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, **extras
    )
    K = len(family.kv_geometry(generator.module).scales)
    if isinstance(sampling.temperature, list) and len(sampling.temperature) not in (1, K):
        raise NextScaleError(
            f"scale_temperatures has {len(sampling.temperature)} values; this generator has {K} scales"
        )
    return labels_B, sampling, preview


def scale_callback(node_id, tokenizer: NextScaleModel, num_scales: int, preview: bool):
    """The sampler's per-scale callback: an interrupt check, one progress tick and (optionally) a preview."""
    pbar = comfy.utils.ProgressBar(num_scales, node_id=node_id)

    def on_scale(si: int, K: int, latent: torch.Tensor) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(si + 1, K, preview_image(tokenizer, latent) if preview else None)

    return on_scale


def preview_image(tokenizer: NextScaleModel, latent: torch.Tensor):
    """A JPEG preview of the first batch item from the sampler's running latent (its family decodes it small)."""
    from comfy.cli_args import args
    from PIL import Image

    img = model_to_image(tokenizer.family.preview(tokenizer.module, latent))[0]
    return ("JPEG", Image.fromarray((img.cpu().numpy() * 255).round().astype("uint8")), args.preview_size)


NODES = [NextScaleLoadGenerator, NextScaleSamplerOptions, NextScaleSampler]
