"""HMAR nodes: load an HMAR transformer with VAR's VQ-VAE, and sample with masked refinement passes per scale.

HMAR (NVlabs/HMAR) is VAR split into shared base blocks and two branches: the next-scale branch draws a scale from
its own input alone (no KV cache), and the mask branch redraws the least confident tokens of a scale. The tokens are
VAR's: NextScale Decode decodes them, and VAR's inpaint and image-to-image guides edit them.
"""

from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.core.hooks import SamplerHooks
from ..models.core.tokens import NextScaleTokens
from ..models.hmar.family import HINT, LOADER
from ..models.hmar.sampler import REFUSED, HMAROptions, parse_refinement
from ..models.var.classes import imagenet_class_names
from .generator import bind_images, class_labels, framed_like_reference, scale_callback
from .service import NextScaleModel, ready_batch, sub_batches
from .sockets import CATEGORY, Control, Guide, HMARModel, KVPolicy, Tokenizer, Tokens
from .validation import check_numbers
from .vqvae_loaders import VQVAELoader, check_var_vqvae, vqvae_not_found

HMAR_CATEGORY = f"{CATEGORY}/hmar"
MAX_BATCH = 16
DEFAULT_CLASS = "golden retriever"
OFFICIAL_REFINEMENT = "1 | 1,3 | 1,1,2,5"
MISSING_VQVAE = vqvae_not_found("VAR's VQ-VAE", "vae_ch160v4096z32.pth", HINT)


class NextScaleLoadHMAR(VQVAELoader):
    LOADER = LOADER
    MISSING_VQVAE = MISSING_VQVAE

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.loader_schema(
            node_id="NextScaleLoadHMAR",
            category=HMAR_CATEGORY,
            description="Loads an HMAR transformer (hmar-d16.pth, hmar-d20.pth, hmar-d24.pth, hmar-d30.pth; NVIDIA's "
            "non-commercial licence) and VAR's VQ-VAE (vae_ch160v4096z32.pth) from models/nextscale. Sizes are read "
            "from the files; loading is strict.",
            model=HMARModel,
            model_tooltip="An HMAR transformer in ComfyUI/models/nextscale (Hugging Face nvidia/HMAR: hmar-d16.pth "
            "... hmar-d30.pth). Its weights are under NVIDIA's non-commercial licence.",
            vqvae_tooltip="VAR's VQ-VAE, vae_ch160v4096z32.pth (FoundationVision/var): HMAR draws its tokens.",
        )


class NextScaleHMARSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleHMARSampler",
            display_name="NextScale HMAR Sampler",
            category=HMAR_CATEGORY,
            description="Draws a picture of the chosen class coarse to fine with HMAR: each scale is drawn from the "
            "previous ones' picture alone (no KV cache), then its least confident tokens are masked and redrawn in "
            "refinement passes. Guidance grows from coarse to fine as in VAR. Batch item i uses seed + i.",
            inputs=[
                HMARModel.Input("model", tooltip="From NextScale Load HMAR."),
                Tokenizer.Input("vqvae", tooltip="VAR's VQ-VAE, from NextScale Load HMAR."),
                io.Combo.Input(
                    "class_name", options=list(imagenet_class_names()), default=DEFAULT_CLASS,
                    tooltip="ImageNet-1k class to generate.",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Random seed. Batch item i uses seed + i.",
                ),
                io.Float.Input(
                    "cfg", default=1.7, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="Classifier-free guidance strength (HMAR's released setting: 1.7).",
                ),
                io.Int.Input(
                    "top_k", default=1000, min=0, max=100000, tooltip="Keep the k most likely codes (0 = off)."
                ),
                io.Float.Input(
                    "top_p", default=0.99, min=0.0, max=1.0, step=0.01,
                    tooltip="Keep the smallest set of codes whose probability reaches p (0 = off).",
                ),
                io.String.Input(
                    "refinement",
                    default=OFFICIAL_REFINEMENT,
                    tooltip="Masked refinement per scale, coarse to fine, scales separated by '|': the tokens each "
                    "pass settles. '1 | 1,3 | 1,1,2,5' (HMAR's setting): the 1x1 scale in one pass; the 2x2 keeps its "
                    "most confident token and redraws 3; the 3x3 keeps 1, then settles 1, 2 and 5 in three refinement "
                    "passes. Scales not listed take one pass; empty: no refinement.",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="Images per class."),
                io.String.Input(
                    "class_list", default="", optional=True,
                    tooltip="Optional comma-separated classes (names or indices) for a mixed batch; overrides "
                    "class_name. Each gets batch_size images.",
                ),
                Guide.Input(
                    "guide", optional=True,
                    tooltip="From NextScale Inpaint Guide or NextScale Image to Image Guide (the reference encoded "
                    "with VAR's VQ-VAE): which tokens to keep at each scale, applied after the refinement passes.",
                ),
                Control.Input(
                    "control", optional=True,
                    tooltip="Refused: no control adapter was trained for HMAR's split transformer.",
                ),
                KVPolicy.Input(
                    "kv_policy", optional=True,
                    tooltip="Refused: HMAR keeps no KV cache (each scale attends only to its own tokens).",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, top_p: float | None = None) -> bool | str:
        return check_numbers(cls, cfg=cfg, top_p=top_p) or True

    @classmethod
    def execute(
        cls,
        model: NextScaleModel,
        vqvae: NextScaleModel,
        class_name: str,
        seed: int,
        cfg: float,
        top_k: int,
        top_p: float,
        refinement: str,
        batch_size: int,
        class_list: str = "",
        guide=None,
        control=None,
        kv_policy=None,
    ) -> io.NodeOutput:
        for name, connected in (("control", control), ("kv_policy", kv_policy)):
            if connected is not None:
                raise NextScaleError(f"HMAR takes no {name}: {REFUSED[name]}; disconnect it")
        family = model.family
        check_var_vqvae(model, vqvae, LOADER)
        generator = model.module
        labels_B = class_labels(model, class_name, class_list, batch_size, MAX_BATCH)
        patch_nums = generator.patch_nums
        options = HMAROptions(cfg=cfg, top_k=top_k, top_p=top_p, refinement=parse_refinement(refinement, patch_nums))
        B = len(labels_B)
        workload = Workload(guided=cfg != 0, dtype=model.compute_dtype, decode_dtype=vqvae.compute_dtype)
        size = ready_batch(
            model, vqvae, batch=B, what="NextScale HMAR Sampler", kv_settings=False,
            need=lambda images, spec=None: family.memory(generator, vqvae.module, replace(workload, batch_size=images)),
        )
        parts = []
        for start, stop in sub_batches(B, size):  # item i keeps its seed, seed + i, and its guide images
            hooks = SamplerHooks(
                callback=scale_callback(cls.hidden.unique_id, vqvae, len(patch_nums), True),
                **bind_images(guide, None, start, stop, B, model, vqvae, patch_nums),
            )
            parts.append(family.sample(generator, vqvae.module, labels_B[start:stop], seed=seed + start,
                                       options=options, hooks=hooks, device=model.device))
        tokens = NextScaleTokens.cat(parts)
        return io.NodeOutput(framed_like_reference(tokens, guide).to("cpu"))


NODES = [NextScaleLoadHMAR, NextScaleHMARSampler]
