"""Switti nodes: load a Switti transformer and its VQ-VAE, encode a prompt with SDXL's two CLIP encoders the way
Switti was trained, and sample.

Text: Switti conditions on the *last* hidden states of CLIP ViT-L/14 and ViT-bigG/14 (SDXL takes the penultimate
ones), on bigG's pooled output *without* its text projection (SDXL takes the projected one) and on a key bias that
hides the padding; 77 tokens, longer prompts truncated. NextScale Switti Text Encode asks ComfyUI's SDXL CLIP object
(DualCLIPLoader, type sdxl) for exactly that; its output is marked, so that CLIP Text Encode's SDXL conditioning
(same widths, other values) is refused by the sampler rather than used. The tokens are VAR's: NextScale Decode
decodes them with the VQ-VAE.
"""

from __future__ import annotations

import dataclasses

import comfy.sd1_clip
import torch
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import Workload
from ..models.core.hooks import SamplerHooks
from ..models.core.schedule import KNOWN_SCHEDULES
from ..models.core.tokens import NextScaleTokens
from ..models.switti.family import HINT, LOADER
from ..models.switti.model import TEXT_TOKENS, SwittiText
from ..models.switti.sampler import NO_CACHE, SwittiCondition, SwittiOptions
from .generator import bind_policy, framed_like_reference, refuse_hooks, scale_callback
from .service import NextScaleModel, ready_batch, sub_batches
from .sockets import CATEGORY, Guide, KVPolicy, SwittiModel, Tokenizer, Tokens
from .validation import check_combos, check_numbers
from .vqvae_loaders import VQVAELoader, vqvae_not_found

SWITTI_CATEGORY = f"{CATEGORY}/switti"
MAX_BATCH = 16
MARK = "nextscale_switti_text"  # the conditioning entry NextScale Switti Text Encode sets
RESOLUTIONS = ["model's own", *KNOWN_SCHEDULES]
MISSING_VQVAE = vqvae_not_found("Switti's VQ-VAE", "it", HINT)


class NextScaleLoadSwitti(VQVAELoader):
    LOADER = LOADER
    MISSING_VQVAE = MISSING_VQVAE
    SHARDS = True

    @classmethod
    def define_schema(cls) -> io.Schema:
        return cls.loader_schema(
            node_id="NextScaleLoadSwitti",
            category=SWITTI_CATEGORY,
            description="Loads a Switti text-to-image transformer (Switti, Switti-AR, Switti-1024, Switti-1024-AR: "
            "the Hugging Face folder with model.safetensors and config.json, or the file) and Switti's VQ-VAE "
            "(VQVAE-Switti) from models/nextscale. Sizes are read from the files; loading is strict.",
            model=SwittiModel,
            model_tooltip="A Switti transformer in ComfyUI/models/nextscale: a folder as downloaded from Hugging "
            "Face (yresearch/Switti, Switti-AR, Switti-1024, Switti-1024-AR), or its model.safetensors "
            "renamed, with config.json renamed alike beside it (switti_ar.safetensors + switti_ar.json).",
            vqvae_tooltip="Switti's VQ-VAE (yresearch/VQVAE-Switti: its folder or its model.safetensors).",
        )


def _one_chunk(chunks: list, special: dict) -> list:
    """ComfyUI's token-weight chunks of one prompt as the single 77-token sequence a Hugging Face CLIP tokenizer
    makes with ``truncation=True``: start, the first 75 tokens of the prompt, end, padding."""
    start, end, pad = special["start"], special["end"], special["pad"]
    content = []
    for chunk in chunks:
        body = chunk[1:]
        stop = next((i for i, (t, _) in enumerate(body) if isinstance(t, int) and t == end), len(body))
        content += body[:stop]
    content = content[: TEXT_TOKENS - 2]
    out = [(start, 1.0), *content, (end, 1.0)]
    return out + [(pad, 1.0)] * (TEXT_TOKENS - len(out))


def _bigg_tokenizer(clip) -> comfy.sd1_clip.SDTokenizer:
    """SDXL's CLIP-G tokenizer as laion's bigG tokenizer (upstream's) tokenizes: '!' is its padding token, hence a
    special token that is always a token of its own (id 0), where openai's CLIP-L (and ComfyUI's CLIP-G) merge it
    into the word ("cube!!" is 3 tokens to bigG, 2 to CLIP-L)."""
    return comfy.sd1_clip.SDTokenizer(
        pad_with_end=False, embedding_directory=clip.tokenizer.clip_g.embedding_directory, embedding_size=1280,
        embedding_key="clip_g", tokenizer_args={"pad_token": "!"},
    )


def encode_switti_text(clip, text: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(context (1, 77, Cl + Cg), pooled (1, Cg), mask (1, 77))`` of ``text`` from ComfyUI's SDXL CLIP object:
    both encoders' last hidden states (final layer norm applied, padding masked in their attention as upstream's
    ``FrozenCLIPEmbedder`` does; bigG's tokens as laion's tokenizer makes them), bigG's unprojected pooled output and
    the mask of bigG's real tokens (end token included), which upstream applies to both. Weighted words
    ``(word:1.2)`` are applied as CLIP Text Encode applies them."""
    te = getattr(clip, "cond_stage_model", None)
    encoders = (getattr(te, "clip_l", None), getattr(te, "clip_g", None))
    if any(e is None for e in encoders):
        raise NextScaleError(
            "Switti needs SDXL's two text encoders: connect DualCLIPLoader with clip_l, clip_g and type sdxl"
        )
    pairs = {
        "l": [_one_chunk(clip.tokenizer.clip_l.tokenize_with_weights(text), encoders[0].special_tokens)],
        "g": [_one_chunk(_bigg_tokenizer(clip).tokenize_with_weights(text), encoders[1].special_tokens)],
    }
    clip.load_model()
    masks = [e.enable_attention_masks for e in encoders]
    try:
        te.reset_clip_options()
        te.set_clip_options({"layer": None, "projected_pooled": False})  # the last layer, unprojected pooling
        for e in encoders:
            e.enable_attention_masks = True
        context, pooled = te.encode_token_weights(pairs)[:2]
    finally:
        for e, m in zip(encoders, masks):
            e.enable_attention_masks = m
        te.reset_clip_options()
    end = encoders[1].special_tokens["end"]
    length = next(i for i, (t, _) in enumerate(pairs["g"][0]) if isinstance(t, int) and t == end and i > 0) + 1
    mask = torch.zeros(1, context.shape[1], dtype=torch.bool)
    mask[:, :length] = True
    return context.float(), pooled.float(), mask


class NextScaleSwittiTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleSwittiTextEncode",
            display_name="NextScale Switti Text Encode",
            category=SWITTI_CATEGORY,
            description="Encodes a prompt for Switti with SDXL's CLIP-L and CLIP-G (DualCLIPLoader, type sdxl) as "
            "Switti was trained: the last hidden states of both, CLIP-G's unprojected pooled output and a padding "
            "mask, 77 tokens (longer prompts are cut). CLIP Text Encode's (word:1.2) weighting works.",
            inputs=[
                io.Clip.Input("clip", tooltip="From DualCLIPLoader: clip_l + clip_g (SDXL's), type sdxl."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        context, pooled, mask = encode_switti_text(clip, text)
        return io.NodeOutput([[context, {"pooled_output": pooled, "attention_mask": mask, MARK: True}]])


def switti_text(conditioning, what: str) -> SwittiText:
    """The :class:`SwittiText` of a CONDITIONING made by NextScale Switti Text Encode (its first entry)."""
    if not conditioning:
        raise NextScaleError(f"the {what} conditioning is empty: connect NextScale Switti Text Encode")
    entry = conditioning[0]
    extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if not extra.get(MARK):
        raise NextScaleError(
            f"the {what} conditioning was not made by NextScale Switti Text Encode (CLIP Text Encode gives SDXL's "
            f"penultimate layer and projected pooling, not what Switti was trained on): encode it with NextScale "
            f"Switti Text Encode"
        )
    mask = extra["attention_mask"].reshape(entry[0].shape[:2]).bool()
    bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    return SwittiText(entry[0].float(), extra["pooled_output"].float(), bias)


def text_rows(text: SwittiText, start: int, stop: int) -> SwittiText:
    """The rows ``start .. stop - 1`` of a sub-batch of one text per image; a single text serves every image."""
    if text.context_BTC.shape[0] == 1:
        return text
    return SwittiText(text.context_BTC[start:stop], text.pooled_BC[start:stop], text.bias_BT[start:stop])


class NextScaleSwittiSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleSwittiSampler",
            display_name="NextScale Switti Sampler",
            category=SWITTI_CATEGORY,
            description="Generates token maps coarse to fine with a Switti transformer from a prompt: guidance "
            "growing with the scale (VAR's ramp) between cfg_start_scale and cfg_stop_scale, top-k/top-p, optional "
            "Gumbel smoothing, one progress step and preview per scale. Batch item i uses seed + i. Decode the "
            "tokens with NextScale Decode and the VQ-VAE.",
            inputs=[
                SwittiModel.Input("model", tooltip="From NextScale Load Switti."),
                Tokenizer.Input("vqvae", tooltip="Switti's VQ-VAE, from NextScale Load Switti."),
                io.Conditioning.Input("positive", tooltip="The prompt, from NextScale Switti Text Encode."),
                io.Conditioning.Input(
                    "negative", tooltip="The null prompt for guidance, from NextScale Switti Text Encode (upstream: "
                    "the empty prompt)."
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Random seed. Batch item i uses seed + i.",
                ),
                io.Float.Input(
                    "cfg", default=6.0, min=0.0, max=30.0, step=0.1, round=0.01,
                    tooltip="Guidance strength (upstream's 6), ramped from 0 at the first scale to cfg at the last; "
                    "0 = no guidance.",
                ),
                io.Int.Input(
                    "top_k", default=400, min=0, max=100000, tooltip="Keep the k most likely codes (0 = off)."
                ),
                io.Float.Input(
                    "top_p", default=0.95, min=0.0, max=1.0, step=0.01,
                    tooltip="Keep the smallest set of codes whose probability reaches p (0 = off).",
                ),
                io.Boolean.Input(
                    "more_smooth", default=False,
                    tooltip="Gumbel-softmax smoothing of the code maps from smooth_start_scale while guidance is on "
                    "(upstream's README turns it on).",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="Images per prompt."),
                io.Int.Input(
                    "smooth_start_scale", default=0, min=0, max=13, optional=True,
                    tooltip="First scale (from 0) smoothed by more_smooth (upstream's README: 2).",
                ),
                io.Int.Input(
                    "cfg_start_scale", default=0, min=0, max=14, optional=True,
                    tooltip="First scale (from 0) with guidance; earlier scales use the prompt alone.",
                ),
                io.Int.Input(
                    "cfg_stop_scale", default=10, min=0, max=14, optional=True,
                    tooltip="First scale (from 0) without guidance: from here the null prompt is dropped, which "
                    "saves time (Switti has 10 scales at 512 px, 14 at 1024 px; upstream's README uses 11 at 1024).",
                ),
                io.Float.Input(
                    "temperature", default=1.0, min=0.01, max=5.0, step=0.01, optional=True,
                    tooltip="Temperature of the scales without guidance (from cfg_stop_scale on; upstream's "
                    "last_scale_temp, its README uses 0.1 at 1024 px); 1 = unchanged.",
                ),
                io.Combo.Input(
                    "resolution", options=RESOLUTIONS, default="model's own", optional=True,
                    tooltip="The schedule to sample: the model's own (512 or 1024 px), or another of as many scales "
                    "(a 512 px model also samples 256 px, 10 scales each).",
                ),
                Guide.Input(
                    "guide", optional=True,
                    tooltip="From NextScale Inpaint Guide or NextScale Image to Image Guide, the reference encoded "
                    "with the VQ-VAE on the sampled schedule: which tokens of it to keep at each scale.",
                ),
                KVPolicy.Input(
                    "kv_policy", optional=True,
                    tooltip="Switti-AR only: what its KV cache keeps across scales (Switti attends within each "
                    "scale and keeps no cache).",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(
        cls, cfg: float | None = None, top_p: float | None = None, temperature: float | None = None,
        resolution: str = RESOLUTIONS[0],
    ) -> bool | str:
        return (
            check_combos(resolution=(resolution, RESOLUTIONS))
            or check_numbers(cls, cfg=cfg, top_p=top_p, temperature=temperature)
            or True
        )

    @classmethod
    def execute(
        cls,
        model: NextScaleModel,
        vqvae: NextScaleModel,
        positive,
        negative,
        seed: int,
        cfg: float,
        top_k: int,
        top_p: float,
        more_smooth: bool,
        batch_size: int,
        smooth_start_scale: int = 0,
        cfg_start_scale: int = 0,
        cfg_stop_scale: int = 10,
        temperature: float = 1.0,
        resolution: str = RESOLUTIONS[0],
        guide=None,
        kv_policy=None,
    ) -> io.NodeOutput:
        family = model.family
        if str(vqvae.kind) != "var-tokenizer":
            raise NextScaleError(
                f"'{vqvae.name}' is {vqvae.kind.describe()}: connect Switti's VQ-VAE from NextScale Load Switti"
            )
        refuse_hooks(family, guide=guide, kv_policy=kv_policy)
        if kv_policy is not None and not model.module.config.causal:
            raise NextScaleError(NO_CACHE)
        family.check_pair(model.module, vqvae.module)
        schedule = model.module.patch_nums if resolution == RESOLUTIONS[0] else KNOWN_SCHEDULES[resolution]
        options = SwittiOptions(
            cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth, smooth_start=smooth_start_scale,
            guidance_start=cfg_start_scale, guidance_stop=cfg_stop_scale, temperature=temperature,
            schedule=schedule,
        )
        text, null = switti_text(positive, "positive").expand(batch_size), switti_text(negative, "negative")
        workload = Workload(
            guided=options.has_null_rows(len(schedule)), schedule=schedule, dtype=model.compute_dtype,
            decode_dtype=vqvae.compute_dtype,
        )

        def need(images: int, spec=kv_policy):
            return family.memory(model.module, vqvae.module, dataclasses.replace(
                workload, batch_size=images, kv_policy=bind_policy(spec, model, schedule)))

        causal = model.module.config.causal  # Switti-AR: the one with a KV cache
        size = ready_batch(model, vqvae, batch=batch_size, need=need, what="NextScale Switti Sampler",
                           kv_settings=causal)
        device = model.device
        parts = []
        for start, stop in sub_batches(batch_size, size):
            hooks = SamplerHooks(
                callback=scale_callback(cls.hidden.unique_id, vqvae, len(schedule), True),
                guide=None if guide is None else guide.images(start, stop, batch_size).bind(
                    vqvae.module, schedule, stop - start, device
                ),
                kv_policy=bind_policy(kv_policy, model, schedule),
            )
            condition = SwittiCondition(text_rows(text, start, stop), text_rows(null, start, stop))
            parts.append(family.sample(model.module, vqvae.module, condition, seed=seed + start, options=options,
                                       hooks=hooks, device=device))
        tokens = NextScaleTokens.cat(parts)
        return io.NodeOutput(framed_like_reference(tokens, guide).to("cpu"))


NODES = [NextScaleLoadSwitti, NextScaleSwittiTextEncode, NextScaleSwittiSampler]
