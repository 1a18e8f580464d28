"""Tokenizer nodes: load VAR's multi-scale VQ-VAE, encode images to per-scale tokens, decode them."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..models.core.checkpoint import read_state_dict
from ..models.core.errors import NextScaleError
from ..models.core.imageops import RESIZE_MODES, fit_square, image_to_model, model_to_image
from ..models.core.schedule import parse_schedule
from ..models.core.tokens import NextScaleBitTokens, NextScaleTokens
from ..models.infinity.bsq import BSQTokenizer
from ..models.var.editing import composite
from ..models.var.tokenizer import MultiScaleVQVAE
from .model_files import DTYPES, LoadedModel, check_kind, load_model, model_choices
from .sockets import CATEGORY, Tokenizer, Tokens
from .validation import check_combos


def build_tokenizer(path: str) -> MultiScaleVQVAE:
    state_dict = read_state_dict(path, what="tokenizer")
    check_kind(state_dict, path, "var-tokenizer")
    return MultiScaleVQVAE.from_state_dict(state_dict, path=path, config=MultiScaleVQVAE.config_from_file(path))


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
                    options=model_choices("tokenizer"),
                    tooltip="File in ComfyUI/models/nextscale (.safetensors or .pth). 'nextscale-embedded' is the "
                    "pack's own small 64 px model.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPES,
                    default="auto",
                    tooltip="Weight precision. auto: float32 (the tokenizer is small and precision-sensitive).",
                ),
            ],
            outputs=[Tokenizer.Output("tokenizer", display_name="tokenizer")],
        )

    @classmethod
    def validate_inputs(cls, tokenizer_name: str, dtype: str) -> bool | str:
        return check_combos(tokenizer_name=(tokenizer_name, model_choices("tokenizer")), dtype=(dtype, DTYPES))

    @classmethod
    def execute(cls, tokenizer_name: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load_model(tokenizer_name, "tokenizer", dtype, build_tokenizer))


def _schedule_for(tokenizer: MultiScaleVQVAE, schedule: str) -> tuple[int, ...]:
    return tokenizer.patch_nums if not schedule.strip() else parse_schedule(schedule)


class NextScaleEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleEncode",
            display_name="NextScale Encode",
            category=CATEGORY,
            description="Encodes images into per-scale token maps (1x1 up to the full latent grid) with the "
            "tokenizer's residual quantizer. Images are resized to the schedule's resolution first.",
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
                    "default. The last side times the downsampling factor is the resolution.",
                ),
            ],
            outputs=[Tokens.Output("tokens", display_name="tokens")],
        )

    @classmethod
    def validate_inputs(cls, resize: str) -> bool | str:
        return check_combos(resize=(resize, RESIZE_MODES))

    @classmethod
    def execute(cls, tokenizer: LoadedModel, image: torch.Tensor, resize: str, schedule: str = "") -> io.NodeOutput:
        vae: MultiScaleVQVAE = tokenizer.ready()
        if isinstance(vae, BSQTokenizer):
            raise NextScaleError(
                "this is an Infinity tokenizer: Infinity encodes images inside NextScale Sampler (Text) (connect the "
                "image there and set keep_scales)"
            )
        patch_nums = _schedule_for(vae, schedule)
        side = patch_nums[-1] * vae.downsample
        device = tokenizer.device
        indices, f_hats = [], []
        with torch.inference_mode():
            for chunk in torch.split(image, 8):  # bound peak memory on large batches
                mm.throw_exception_if_processing_interrupted()
                img = fit_square(image_to_model(chunk), side, resize).to(device=device, dtype=tokenizer.dtype)
                idx = vae.img_to_indices(img, patch_nums=patch_nums)
                indices.append([i.cpu() for i in idx])
                f_hats.append(vae.indices_to_fhat(idx, patch_nums=patch_nums).float().cpu())
        per_scale = [torch.cat([c[si] for c in indices]).view(-1, pn, pn) for si, pn in enumerate(patch_nums)]
        tokens = NextScaleTokens(indices=per_scale, patch_nums=patch_nums, f_hat=torch.cat(f_hats), source="encoded")
        return io.NodeOutput(tokens)


def check_vocab(vae: MultiScaleVQVAE, tokens: NextScaleTokens) -> None:
    if isinstance(tokens, NextScaleBitTokens) or isinstance(vae, BSQTokenizer):
        return  # bitwise tokens have no vocabulary; decode_tokens checks the pairing and the bit count
    vocab = vae.config.vocab_size
    top = max(int(i.max()) for i in tokens.indices)
    if top >= vocab:
        raise NextScaleError(
            f"these tokens use codes up to {top}, but the tokenizer's vocabulary has {vocab} codes: decode with the "
            "tokenizer they were made with"
        )


def decode_tokens(
    tokenizer: LoadedModel, tokens: NextScaleTokens | NextScaleBitTokens, upto: int | None
) -> torch.Tensor:
    """ComfyUI IMAGE of the tokens' first ``upto`` scales (None: all, using the tokens' own f_hat when kept).
    Bitwise tokens (Infinity) go through their BSQ tokenizer."""
    vae = tokenizer.ready()
    if isinstance(tokens, NextScaleBitTokens) or isinstance(vae, BSQTokenizer):
        if not (isinstance(tokens, NextScaleBitTokens) and isinstance(vae, BSQTokenizer)):
            raise NextScaleError(
                "Infinity (bitwise) tokens decode with the Infinity tokenizer of NextScale Load Infinity, and VAR "
                "tokens with a VAR tokenizer: connect the tokenizer the tokens were made with"
            )
        from .infinity import decode_bits

        return decode_bits(tokenizer, tokens, upto)
    device, dtype = tokenizer.device, tokenizer.dtype
    images = []
    with torch.inference_mode():
        for b in range(0, tokens.batch_size, 8):
            mm.throw_exception_if_processing_interrupted()
            part = tokens.select(list(range(b, min(b + 8, tokens.batch_size)))).to(device)
            if upto is None and part.f_hat is not None:
                f_hat = part.f_hat.to(dtype)
            else:
                f_hat = vae.indices_to_fhat(part.flat(), patch_nums=tokens.patch_nums, upto=upto)
            images.append(model_to_image(vae.fhat_to_img(f_hat)).to(mm.intermediate_device()))
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
                    tooltip="Optional original image for an inpaint/outpaint composite: where composite_mask is 0 "
                    "the output is exactly this image. It must already have the decoded size (the model's "
                    "resolution), fitted the way NextScale Encode's resize fitted it.",
                ),
                io.Mask.Input(
                    "composite_mask",
                    optional=True,
                    tooltip="Mask of the composite, same size: 1 = the decoded image (the regenerated area), "
                    "0 = composite_image unchanged, in between = a blend (feathered edges).",
                ),
            ],
            outputs=[io.Image.Output("image", display_name="image")],
        )

    @classmethod
    def execute(
        cls,
        tokenizer: LoadedModel,
        tokens: NextScaleTokens,
        scales: int,
        composite_image: torch.Tensor | None = None,
        composite_mask: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        if (composite_image is None) != (composite_mask is None):
            raise NextScaleError("a composite needs both composite_image and composite_mask (or neither)")
        check_vocab(tokenizer.ready(), tokens)
        if scales > tokens.num_scales:
            raise NextScaleError(f"scales = {scales}, but these tokens have only {tokens.num_scales} scales (0 = all)")
        upto = scales if 0 < scales < tokens.num_scales else None
        decoded = decode_tokens(tokenizer, tokens, upto)
        if composite_image is not None:
            decoded = composite(decoded, composite_image, composite_mask)
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
    def execute(cls, tokenizer: LoadedModel, tokens: NextScaleTokens) -> io.NodeOutput:
        check_vocab(tokenizer.ready(), tokens)
        K = tokens.num_scales
        stages = [decode_tokens(tokenizer, tokens, k if k < K else None) for k in range(1, K + 1)]
        images = torch.stack(stages, dim=1).flatten(0, 1)  # (B, K, H, W, C) -> image-major
        return io.NodeOutput(images, K)


NODES = [NextScaleLoadTokenizer, NextScaleEncode, NextScaleDecode, NextScaleDecodeScales]
