"""Distilled Decoding nodes: load a DD transformer with VAR's VQ-VAE, and sample in one or two steps.

DD (microsoft/distilled_decoding) maps Gaussian noise to all of VAR's tokens in one transformer pass, and a second
pass may redo the finer scales from the first pass's coarse ones. The tokens are VAR's: NextScale Decode decodes
them with the VQ-VAE (from the sample's latent, since the finer scales are continuous codes, not codebook rows).
"""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..models.core.family import Workload
from ..models.core.hooks import SamplerHooks
from ..models.core.tokens import NextScaleTokens
from ..models.dd.family import HINT, LOADER
from ..models.dd.sampler import DDOptions, official_split
from ..models.var.classes import imagenet_class_names
from .generator import class_labels, scale_callback
from .service import NextScaleModel, ready_batch, sub_batches
from .sockets import CATEGORY, DDModel, Tokenizer, Tokens
from .vqvae_loaders import VQVAELoader, check_var_vqvae, vqvae_not_found

DD_CATEGORY = f"{CATEGORY}/distilled decoding"
MAX_BATCH = 16
DEFAULT_CLASS = "golden retriever"
MISSING_VQVAE = vqvae_not_found("VAR's VQ-VAE", "vae_ch160v4096z32.pth", HINT)


class NextScaleLoadDD(VQVAELoader):
    LOADER = LOADER
    MISSING_VQVAE = MISSING_VQVAE

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.loader_schema(
            node_id="NextScaleLoadDD",
            category=DD_CATEGORY,
            description="Loads a Distilled Decoding transformer (VAR-DD var-d16.pth, var-d20.pth, var-d24.pth: VAR "
            "distilled to one or two steps) and VAR's VQ-VAE (vae_ch160v4096z32.pth) from models/nextscale. Sizes "
            "are read from the files; loading is strict.",
            model=DDModel,
            model_tooltip="A DD transformer in ComfyUI/models/nextscale (microsoft/distilled_decoding, "
            "VAR-DD/var-d16.pth, var-d20.pth or var-d24.pth; rename them, e.g. dd-var-d16.pth, to keep "
            "them apart from VAR's own var_d16.pth).",
            vqvae_tooltip="VAR's VQ-VAE, vae_ch160v4096z32.pth (FoundationVision/var): DD draws its tokens.",
        )


class NextScaleDDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleDDSampler",
            display_name="NextScale Distilled Decoding Sampler",
            category=DD_CATEGORY,
            description="Draws a picture of the chosen class from noise in one or two transformer passes "
            "(Distilled Decoding): one pass predicts every scale at once; a second pass keeps the first pass's "
            "coarse scales and redoes the finer ones from the same noise (better images, twice the time). No "
            "guidance: the teacher's was distilled in. Batch item i uses seed + i.",
            inputs=[
                DDModel.Input("model", tooltip="From NextScale Load Distilled Decoding."),
                Tokenizer.Input("vqvae", tooltip="VAR's VQ-VAE, from NextScale Load Distilled Decoding."),
                io.Combo.Input(
                    "class_name", options=list(imagenet_class_names()), default=DEFAULT_CLASS,
                    tooltip="ImageNet-1k class to generate.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Random seed of the noise. Batch item i uses seed + i.",
                ),
                io.Int.Input(
                    "steps", default=1, min=1, max=2,
                    tooltip="Transformer passes: 1 (fastest) or 2 (the released models' better setting).",
                ),
                io.Int.Input(
                    "refine_from_scale", default=0, min=0, max=32,
                    tooltip="The scale the second pass redoes from, which is also the first scale kept as a "
                    "continuous prediction rather than the most likely code. 0: the released setting (5 for d16, "
                    "4 for d20 and d24).",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="Images per class."),
                io.String.Input(
                    "class_list", default="", optional=True,
                    tooltip="Optional comma-separated classes (names or indices) for a mixed batch; overrides "
                    "class_name. Each gets batch_size images.",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model: NextScaleModel,
        vqvae: NextScaleModel,
        class_name: str,
        seed: int,
        steps: int,
        refine_from_scale: int,
        batch_size: int,
        class_list: str = "",
    ) -> io.NodeOutput:
        family = model.family
        check_var_vqvae(model, vqvae, LOADER)
        generator = model.module
        labels_B = class_labels(model, class_name, class_list, batch_size, MAX_BATCH)
        split = refine_from_scale or official_split(generator.depth)
        options = DDOptions(steps=(0, split)[:steps], split=split)
        options.check(generator.config.num_scales)
        B = len(labels_B)
        workload = Workload(guided=False, dtype=model.compute_dtype, decode_dtype=vqvae.compute_dtype)
        size = ready_batch(
            model, vqvae, batch=B, what="NextScale Distilled Decoding Sampler", kv_settings=False,
            need=lambda images, spec=None: family.memory(generator, vqvae.module, replace(workload, batch_size=images)),
        )
        parts = [
            family.sample(generator, vqvae.module, labels_B[start:stop], seed=seed + start, options=options,
                          hooks=SamplerHooks(callback=scale_callback(cls.hidden.unique_id, vqvae, steps, True)),
                          device=model.device)
            for start, stop in sub_batches(B, size)
        ]
        tokens = NextScaleTokens.cat(parts)
        return io.NodeOutput(tokens.to("cpu"))


NODES = [NextScaleLoadDD, NextScaleDDSampler]
