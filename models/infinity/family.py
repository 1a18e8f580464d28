"""The Infinity family: text-to-image bitwise transformers and their BSQ tokenizers. The protocol is
:class:`~..core.family.Family`.

Schedules: a run samples an :class:`~.schedule.InfinitySchedule` (the transformer's token grids); the tokenizer
encodes and decodes on its latent grids (the same grids, twice as fine for a patchifying model such as the 8B:
:func:`~.sampler.latent_scales`). :meth:`InfinityFamily.encode` takes latent grids, and
:meth:`InfinityFamily.memory` reads ``workload.schedule`` as an ``InfinitySchedule`` when it is given a
generator and as the tokens' latent grids when it decodes alone.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError
from ..core.family import Family, KVGeometry, Role, Workload
from ..core.imageops import ImageFit, fit_square
from ..core.memory import (
    MemoryNeed,
    banded_decoder_bytes,
    block_bytes,
    conv_coder_bytes,
    draw_bytes,
    kv_cache_bytes,
    weight_bytes,
)
from ..core.tokens import NextScaleBitTokens
from .bsq import WHAT as TOKENIZER_WHAT
from .bsq import BSQTokenizer
from .model import WHAT as GENERATOR_WHAT
from .model import Infinity
from .sampler import latent_scales, patch_factor, sample_infinity
from .schedule import RESOLUTIONS, InfinitySchedule

PREVIEW_LATENT_SIDE = 16  # previews decode at most a 16x16 latent
DECODER_COPIES = 8  # feature maps of its largest level held at once while decoding (measured)
BAND_COPIES = 3  # band-sized maps a block holds at once while decoding in bands (measured)
STREAM_COPIES = 6  # fp32 copies of the residual stream at a block's MLP, cross-attention's included (core/memory.py)
HINT = (
    "Infinity's files are published in the Hugging Face repository FoundationVision/Infinity: put "
    "infinity_2b_reg.pth and infinity_vae_d32reg.pth (or the 8B's infinity_8b_weights folder and "
    "infinity_vae_d56_f8_14_patchify.pth) into the NextScale model folder, and flan-t5-xl (google/flan-t5-xl) into "
    "ComfyUI/models/text_encoders"
)

SCHEDULE_FORMAT = (
    "an Infinity schedule is the Text Sampler's resolution ({resolutions}) with an optional aspect ratio "
    "width:height, e.g. '0.06M' (the embedded model) or '1M 4:3'"
)

GENERATOR = Role("generator", GENERATOR_WHAT, "an Infinity transformer (text-to-image)", "NextScale Load Infinity")
TOKENIZER = Role(
    "tokenizer", TOKENIZER_WHAT, "an Infinity BSQ tokenizer", "NextScale Load Infinity",
    dtypes=(torch.float32,), auto="vae",
)


def _decoder_levels(tokenizer: BSQTokenizer) -> list[int]:
    return [tokenizer.config.base_ch * m for m in tokenizer.config.ch_mult]


class InfinityFamily(Family):
    name = "infinity"
    title = "Infinity"
    roles = (GENERATOR, TOKENIZER)
    hooks = frozenset({"guide", "control", "kv_policy", "accel", "callback"})
    files_hint = HINT
    decode_chunk = 4
    banded_decode = True

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        if any(k.startswith("block_chunks.") for k in keys) or "cfg_uncond" in keys or any(
            k.startswith("text_norm") for k in keys
        ):
            return GENERATOR
        if "quantize.embedding.weight" in keys or not any(k.startswith("decoder.") for k in keys):
            return None  # VAR's tokenizer has a codebook; BSQ codes are bits
        if any(k.startswith(("quantizer.", "quantize.")) for k in keys) or "decoder.conv_in.conv.weight" in keys:
            return TOKENIZER  # the mask buffer (quantizer.lfq.mask) is optional: the conv layout tells it too
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        made = dict(operations=operations, compute_dtype=compute_dtype)  # the one place they reach the classes
        if role is GENERATOR:
            config = Infinity.config_from_file(path)
            module = Infinity.from_state_dict(state_dict, path=path, config=config, **made)
        elif role is TOKENIZER:
            config = BSQTokenizer.config_from_file(path)
            module = BSQTokenizer.from_state_dict(state_dict, path=path, config=config, **made)
        else:
            raise NextScaleError(f"{role.what} is not a role of the Infinity family")
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: Infinity, tokenizer: BSQTokenizer) -> None:
        patch_factor(generator, tokenizer)

    def class_names(self, generator: Infinity) -> tuple[str, ...]:
        raise NextScaleError("Infinity models take a text prompt, not a class: use NextScale Sampler (Text)")

    def parse_schedule(self, text: str) -> tuple[tuple[int, int], ...]:
        """The latent grids of a resolution and optional aspect ratio, e.g. '0.06M' or '1M 4:3' (the Text Sampler's
        choices; 1:1 when none is given), for a tokenizer that does not patchify (Infinity-2B's, the embedded
        model's)."""
        words = text.replace(",", " ").split()
        fmt = SCHEDULE_FORMAT.format(resolutions=", ".join(RESOLUTIONS))
        if not words or words[0] not in RESOLUTIONS:
            raise NextScaleError(f"schedule '{text}' is not understood: {fmt}")
        h_div_w = 1.0
        if len(words) > 1:
            width, _, height = words[1].partition(":")
            if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
                raise NextScaleError(f"schedule '{text}' is not understood: {fmt}")
            h_div_w = int(height) / int(width)
        return InfinitySchedule.from_template(h_div_w, words[0]).scales

    def guide_schedule(self, generator: Infinity, tokenizer: BSQTokenizer, schedule=None):
        """The latent grids of ``schedule`` (None: 1:1 at 1M) for ``generator``: twice as fine for a patchifying
        model (Infinity-8B: 2 x 2 cells a token), which samples and is guided on them (:func:`latent_scales`)."""
        scales = schedule or InfinitySchedule.from_template().scales
        return tuple(latent_scales(generator, tokenizer, InfinitySchedule.custom(scales)))

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        return sample_infinity(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def encode(self, tokenizer: BSQTokenizer, images_B3HW, schedule=None, resize="stretch"):
        """Bits of the images on the latent grids ``schedule`` (None: 1:1 at 1M, the Text Sampler's default).
        Images are stretched (bicubic) to the grids' size; onto a square grid they may also be centre-cropped or
        padded (:func:`~..core.imageops.fit_square`), and the tokens record the fit (``extra["fit"]``) for the
        guides' masks and Decode's composite."""
        scales = tuple((int(h), int(w)) for h, w in (schedule or InfinitySchedule.from_template().scales))
        size = (scales[-1][0] * tokenizer.downsample, scales[-1][1] * tokenizer.downsample)
        square = size[0] == size[1]
        if resize != "stretch" and not square:
            raise NextScaleError(
                f"images are fitted to a {size[1]}x{size[0]} px Infinity schedule by stretching only; resize "
                f"'{resize}' fits squares (1:1 schedules): choose resize 'stretch'"
            )
        if resize == "stretch":
            img = F.interpolate(images_B3HW, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        else:
            img = fit_square(images_B3HW, size[0], resize)
        with torch.inference_mode():
            bits = tokenizer.encode_bits(img, scales)
        extra = {"fit": ImageFit(images_B3HW.shape[-2], images_B3HW.shape[-1], size[0], resize)} if square else {}
        return NextScaleBitTokens(bits=bits, scales=scales, source="encoded", extra=extra)

    def check_tokens(self, tokenizer: BSQTokenizer, tokens) -> None:
        if not isinstance(tokens, NextScaleBitTokens):
            raise NextScaleError(
                "these tokens were not made by an Infinity model: decode them with the tokenizer they were made with"
            )
        if tokens.codebook_dim != tokenizer.codebook_dim:
            raise NextScaleError(
                f"these tokens have {tokens.codebook_dim} bits per cell but the tokenizer codes "
                f"{tokenizer.codebook_dim}: decode with the tokenizer they were made with"
            )

    def decode(self, tokenizer: BSQTokenizer, tokens, upto=None, bands: int = 1):
        """As :meth:`Family.decode`; ``bands > 1`` decodes each image that many bands of rows at a time (the BSQ
        decoder has no attention), the same images up to fp32 rounding at less memory."""
        self.check_tokens(tokenizer, tokens)
        with torch.inference_mode():
            if upto is None and tokens.summed_codes is not None:
                summed = tokens.summed_codes
            else:
                summed = tokenizer.bits_to_summed_codes(tokens.bits[: upto or tokens.num_scales], tokens.scales[-1])
            return tokenizer.decode(summed, bands)

    def preview(self, tokenizer: BSQTokenizer, latent):
        H, W = latent.shape[-2:]
        scale = min(1.0, PREVIEW_LATENT_SIDE / max(H, W))
        size = (max(1, round(H * scale)), max(1, round(W * scale)))
        summed = F.interpolate(latent[:1].float(), size=size, mode="area")
        with torch.inference_mode():
            return tokenizer.decode(summed)

    def kv_geometry(self, generator: Infinity, schedule=None) -> KVGeometry:
        cfg = generator.config
        schedule = schedule or InfinitySchedule.from_template()
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.head_dim, schedule.scales)

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        kv = activations = preview = decode = 0
        latent = workload.schedule or InfinitySchedule.from_template().scales
        if generator is not None:
            schedule = workload.schedule or InfinitySchedule.from_template()
            geometry = self.kv_geometry(generator, schedule)
            cfg, rows, size = generator.config, workload.rows, workload.dtype.itemsize
            text = workload.text_tokens or cfg.text_maxlen
            kv = kv_cache_bytes(geometry, rows, size, workload.kv_policy)
            kv += 2 * cfg.depth * rows * text * cfg.embed_dim * size  # every block's cross-attention keys, values
            step = workload.step_tokens or max(geometry.areas)
            activations = max(
                block_bytes(rows, step, cfg.embed_dim, cfg.hidden_dim, size, STREAM_COPIES),
                draw_bytes(workload.batch_size, rows, step, cfg.embed_dim, 2 * cfg.token_dim, workload.guided),
            )
            latent = latent_scales(generator, tokenizer, schedule) if tokenizer is not None else None
            if tokenizer is not None:
                side = PREVIEW_LATENT_SIDE * tokenizer.downsample
                preview = conv_coder_bytes(
                    1, _decoder_levels(tokenizer), side, side, workload.decode_dtype.itemsize, DECODER_COPIES
                )
        if tokenizer is not None and workload.decode_batch and latent:
            h, w = latent[-1]
            size = (workload.decode_batch, _decoder_levels(tokenizer), h * tokenizer.downsample,
                    w * tokenizer.downsample, workload.decode_dtype.itemsize)
            if workload.decode_bands > 1:
                decode = banded_decoder_bytes(*size, BAND_COPIES, workload.decode_bands)
            else:
                decode = conv_coder_bytes(*size, DECODER_COPIES)
        weights = sum(weight_bytes(m) for m in (generator, tokenizer) if m is not None)
        return MemoryNeed(weights, kv, activations, preview, decode)


FAMILY = InfinityFamily()
