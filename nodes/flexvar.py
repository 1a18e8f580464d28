"""FlexVAR nodes: load a FlexVAR transformer with FlexVAE, see what a resolution and a step count imply, and sample
on any schedule.

FlexVAR (jiaosiyu1999/FlexVAR) predicts each scale's whole image rather than VAR's residual, with positions from a
resizable 2-D map, so the number of steps and the resolution change at inference. Its tokens decode with NextScale
Decode (the last scale) and NextScale Decode Scales (each scale is a picture of its own); NextScale Encode encodes
with FlexVAE on a typed schedule. VAR's edit guides work in their "tokens" mode (each scale's tokens are the
reference's where kept); KV policies bind to the run's schedule. Control models (trained on VAR's hidden states) and
accelerations (built on VAR's residual sum) have no inputs here.
"""

from __future__ import annotations

import dataclasses

import folder_paths
from comfy_api.latest import io, ui

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.core.hooks import SamplerHooks
from ..models.core.tokens import NextScaleTokens
from ..models.flexvar.family import HINT, LOADER
from ..models.flexvar.sampler import CFG_SCHEDULES, FlexVAROptions
from ..models.flexvar.schedule import CELL_PX, MAX_SIDE, ScheduleReport, flex_schedule, parse_sides, resolution_side
from ..models.var.classes import imagenet_class_names
from .generator import bind_policy, class_labels, framed_like_reference, refuse_hooks, scale_callback
from .model_files import FOLDER, model_choices
from .service import TRANSFORMER_DTYPES, NextScaleModel, load, not_found, ready_batch, sub_batches
from .sockets import CATEGORY, FlexVARModel, Guide, KVPolicy, Tokenizer, Tokens
from .validation import check_combos, check_file, check_numbers

FLEXVAR_CATEGORY = f"{CATEGORY}/flexvar"
MAX_BATCH = 16
DEFAULT_CLASS = "golden retriever"
SAMPLER = "NextScale FlexVAR Sampler"


def vae_not_found(name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
    return (
        f"model not found: FlexVAE '{name}' is not in the NextScale model folder ({folders}). Put FlexVAE.pth there "
        f"and refresh the node. {HINT}"
    )


def run_schedule(resolution: int, steps: int, schedule: str) -> tuple[int, ...]:
    """A typed schedule when given, else the one ``resolution`` and ``steps`` imply."""
    return parse_sides(schedule) or flex_schedule(resolution_side(resolution), steps)


class NextScaleLoadFlexVAR(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadFlexVAR",
            display_name=LOADER,
            category=FLEXVAR_CATEGORY,
            description="Loads a FlexVAR transformer (FlexVARd16-epo179.pth, FlexVARd20-epo249.pth, "
            "FlexVARd24-epo349.pth) and its tokenizer FlexVAE.pth from models/nextscale. Sizes are read from the "
            "files; loading is strict.",
            inputs=[
                io.Combo.Input(
                    "model_name", options=model_choices(),
                    tooltip="A FlexVAR transformer in ComfyUI/models/nextscale (jiaosiyu1999/FlexVAR on Hugging Face).",
                ),
                io.Combo.Input(
                    "vae_name", options=model_choices(),
                    tooltip="FlexVAE.pth (jiaosiyu1999/FlexVAR): FlexVAR's tokenizer, a LlamaGen VQ-16 with 8912 "
                    "codes.",
                ),
                io.Combo.Input(
                    "dtype", options=TRANSFORMER_DTYPES, default="auto",
                    tooltip="Transformer precision. auto: ComfyUI's choice for the device and its --*-unet flags "
                    "(float32 on CPU, bfloat16 on recent GPUs, fp8_e4m3fn under --fp8_e4m3fn-unet); fp8_e4m3fn: "
                    "8-bit matrices with per-tensor scales, computing in bfloat16/float16 (half of bfloat16's "
                    "memory). FlexVAE stays float32 (unless --fp16-vae / --bf16-vae); logits are always float32.",
                ),
            ],
            outputs=[
                FlexVARModel.Output("model", display_name="model"),
                Tokenizer.Output("vae", display_name="vae"),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name: str, vae_name: str, dtype: str) -> bool | str:
        choices = model_choices()
        return (
            check_file(model_name, choices, lambda name: not_found(name, LOADER, "generator"))
            or check_file(vae_name, choices, vae_not_found)
            or check_combos(dtype=(dtype, TRANSFORMER_DTYPES))
            or True
        )

    @classmethod
    def execute(cls, model_name: str, vae_name: str, dtype: str) -> io.NodeOutput:
        model = load(model_name, LOADER, "generator", dtype)
        vae = load(vae_name, LOADER, "tokenizer", "auto")
        model.family.check_pair(model.module, vae.module)
        return io.NodeOutput(model, vae)


class NextScaleFlexVARSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleFlexVARSchedule",
            display_name="NextScale FlexVAR Schedule",
            category=FLEXVAR_CATEGORY,
            description="Shows the scales a resolution and a number of steps imply for FlexVAR: each step's side, "
            "pixels and tokens, which sides are drawn and which are taken greedily (sides training never saw, or "
            "above max_pn), and the KV cache per image. Connect 'schedule' to the sampler's schedule input.",
            inputs=[
                io.Int.Input("resolution", default=256, min=2 * CELL_PX, max=MAX_SIDE * CELL_PX, step=CELL_PX,
                             tooltip="Image side in pixels (16 px per token). FlexVAR was trained at 256 px."),
                io.Int.Input("steps", default=10, min=2, max=MAX_SIDE,
                             tooltip="Number of scales. 10 is training's; upstream's best FID at 256 px is 13."),
                io.String.Input("custom_schedule", default="", optional=True,
                                tooltip="Sides typed as 1,2,3,...; overrides resolution and steps when set."),
                io.Int.Input("max_pn", default=16, min=1, max=MAX_SIDE, optional=True,
                             tooltip="Sides above this are taken greedily and at full guidance (upstream: 16)."),
                io.Int.Input("depth", default=16, min=1, max=64, optional=True,
                             tooltip="Depth of the FlexVAR the KV figure is for (d16, d20, d24 released)."),
            ],
            outputs=[
                io.String.Output("schedule", display_name="schedule", tooltip="The sides, for the sampler."),
                io.String.Output("report", display_name="report", tooltip="The schedule as a text table."),
                io.Int.Output("tokens", display_name="tokens", tooltip="Total number of tokens over all scales."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, resolution: int, steps: int, custom_schedule: str = "", max_pn: int = 16,
                depth: int = 16) -> io.NodeOutput:
        patch_nums = run_schedule(resolution, steps, custom_schedule)
        report = ScheduleReport(patch_nums, max_pn)
        kv_bytes = 2 * 2 * depth * report.tokens * 64 * depth * 2  # K and V, CFG's two rows, every layer, fp16
        kv_line = f"full KV cache of a FlexVAR-d{depth} per image with CFG: {kv_bytes / 2**20:.0f} MiB in fp16"
        text = f"{report.text()}\n{kv_line}"
        return io.NodeOutput(",".join(map(str, patch_nums)), text, report.tokens, ui=ui.PreviewText(text))


class NextScaleFlexVARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleFlexVARSampler",
            display_name=SAMPLER,
            category=FLEXVAR_CATEGORY,
            description="Draws a picture of the chosen class with FlexVAR at any resolution and number of steps: "
            "each step predicts the whole image at its side from the previous step's image. Batch item i uses "
            "seed + i. Decode with NextScale Decode; NextScale Decode Scales shows every step's picture.",
            inputs=[
                FlexVARModel.Input("model", tooltip="From NextScale Load FlexVAR."),
                Tokenizer.Input("vae", tooltip="FlexVAE, from NextScale Load FlexVAR."),
                io.Combo.Input("class_name", options=list(imagenet_class_names()), default=DEFAULT_CLASS,
                               tooltip="ImageNet-1k class to generate."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Random seed. Batch item i uses seed + i."),
                io.Int.Input("resolution", default=256, min=2 * CELL_PX, max=MAX_SIDE * CELL_PX, step=CELL_PX,
                             tooltip="Image side in pixels (16 px per token). Trained at 256 px; 512 works "
                             "zero-shot."),
                io.Int.Input("steps", default=10, min=2, max=MAX_SIDE,
                             tooltip="Number of scales (NextScale FlexVAR Schedule shows the sides they imply)."),
                io.Float.Input("cfg", default=2.5, min=0.0, max=20.0, step=0.1,
                               tooltip="Classifier-free guidance (0: none). Upstream evaluates with 2.5 at 256 px, "
                               "3.0 at 512 px."),
                io.Int.Input("top_k", default=900, min=0, max=10000, tooltip="Top-k filter (0: off)."),
                io.Float.Input("top_p", default=0.95, min=0.0, max=1.0, step=0.01, tooltip="Top-p filter (0: off)."),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="Images per class."),
                io.String.Input("schedule", default="", optional=True,
                                tooltip="Sides typed as 1,2,3,... (or from NextScale FlexVAR Schedule); overrides "
                                "resolution and steps when set."),
                io.Combo.Input("cfg_schedule", options=list(CFG_SCHEDULES), default="linear", optional=True,
                               tooltip="linear: upstream's ramp, cfg * step / min(steps - 1, 9); constant: cfg at "
                               "every step (upstream's LlamaGen guidance g is constant with cfg = g - 1)."),
                io.Int.Input("max_pn", default=16, min=1, max=MAX_SIDE, optional=True,
                             tooltip="Sides above this are taken greedily at full guidance (upstream: 16)."),
                io.String.Input("class_list", default="", optional=True,
                                tooltip="Optional comma-separated classes (names or indices) for a mixed batch; "
                                "overrides class_name. Each gets batch_size images."),
                KVPolicy.Input("kv_policy", optional=True,
                               tooltip="What the KV cache keeps (NextScale KV Policy); default: everything."),
                Guide.Input("guide", optional=True,
                            tooltip="An edit (NextScale Inpaint Guide in 'tokens' mode, or Image to Image Guide) of "
                            "tokens that NextScale Encode made with FlexVAE on this sampler's schedule."),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, top_p: float | None = None) -> bool | str:
        return check_numbers(cls, cfg=cfg, top_p=top_p) or True

    @classmethod
    def execute(
        cls, model: NextScaleModel, vae: NextScaleModel, class_name: str, seed: int, resolution: int, steps: int,
        cfg: float, top_k: int, top_p: float, batch_size: int, schedule: str = "", cfg_schedule: str = "linear",
        max_pn: int = 16, class_list: str = "", kv_policy=None, guide=None,
    ) -> io.NodeOutput:
        family = model.family
        if vae.family is not family:
            raise NextScaleError(f"'{vae.name}' is {vae.kind.describe()}: connect FlexVAE from {LOADER}")
        family.check_pair(model.module, vae.module)
        refuse_hooks(family, guide=guide, kv_policy=kv_policy)
        if getattr(guide, "mode", "tokens") != "tokens":
            raise NextScaleError(
                f"FlexVAR keeps no running latent to blend (each scale is a whole image): set the guide's mode to "
                f"'tokens', not '{guide.mode}'"
            )
        options = FlexVAROptions(run_schedule(resolution, steps, schedule), cfg, cfg_schedule, top_k, top_p, max_pn)
        patch_nums = options.patch_nums
        labels_B = class_labels(model, class_name, class_list, batch_size, MAX_BATCH)
        B = len(labels_B)
        workload = Workload(guided=cfg != 0, schedule=patch_nums, dtype=model.compute_dtype,
                            decode_dtype=vae.compute_dtype)

        def need(images: int, spec=kv_policy):
            policy = bind_policy(spec, model, patch_nums)
            return family.memory(model.module, vae.module, dataclasses.replace(
                workload, batch_size=images, kv_policy=policy))

        size = ready_batch(model, vae, batch=B, need=need, what=SAMPLER)
        parts = []
        for start, stop in sub_batches(B, size):  # item i keeps its seed, seed + i, and its guide images
            labels = labels_B[start:stop]
            hooks = SamplerHooks(
                callback=scale_callback(cls.hidden.unique_id, vae, len(patch_nums), True),
                guide=None if guide is None else guide.images(start, stop, B).bind(
                    vae.module, patch_nums, len(labels), model.device
                ),
                kv_policy=bind_policy(kv_policy, model, patch_nums),
            )
            parts.append(family.sample(model.module, vae.module, labels, seed=seed + start, options=options,
                                       hooks=hooks, device=model.device))
        tokens = parts[0] if len(parts) == 1 else NextScaleTokens.cat(parts)
        return io.NodeOutput(framed_like_reference(tokens, guide).to("cpu"))


NODES = [NextScaleLoadFlexVAR, NextScaleFlexVARSchedule, NextScaleFlexVARSampler]
