"""The FlexVAR family: class-conditional generators that predict each scale's image (jiaosiyu1999/FlexVAR), and
their tokenizer FlexVAE. The protocol is :class:`~..core.family.Family`.

Its tokens are :class:`~..core.tokens.NextScaleTokens` on any schedule, but not VAR's: every scale is a whole
image, so decoding ``upto`` scales decodes scale ``upto - 1`` alone. FlexVAE's file holds the keys VAR's tokenizer
detection looks for, and a FlexVAR transformer's are VAR's without ``lvl_embed``, so
:data:`~..core.family.BUILTIN_FAMILIES` lists this family before VAR's.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError
from ..core.family import Family, KVGeometry, Role, Workload
from ..core.imageops import ImageFit, fit_square
from ..core.memory import MemoryNeed
from ..core.schedule import SCHEDULE_256
from ..core.tokens import NextScaleTokens, check_tokenizer_kind
from ..var.classes import default_class_names
from ..var.family import FAMILY as VAR_FAMILY
from ..var.family import PREVIEW_LATENT_SIDE
from .model import WHAT, FlexVAR
from .sampler import HOOKS, check_inputs, sample_flexvar
from .schedule import parse_sides
from .tokenizer import WHAT as TOKENIZER_WHAT
from .tokenizer import FlexVAE

LOADER = "NextScale Load FlexVAR"
HINT = (
    "FlexVAR's files are published on Hugging Face in jiaosiyu1999/FlexVAR (FlexVARd16-epo179.pth, "
    "FlexVARd20-epo249.pth, FlexVARd24-epo349.pth and the tokenizer FlexVAE.pth). Put them in ComfyUI/models/nextscale"
)

GENERATOR = Role("generator", WHAT, "a FlexVAR generator (transformer)", LOADER)
TOKENIZER = Role(
    "tokenizer", TOKENIZER_WHAT, "a FlexVAE tokenizer (FlexVAR's VQ-VAE)", LOADER, dtypes=(torch.float32,), auto="vae"
)


class FlexVARFamily(Family):
    name = "flexvar"
    title = "FlexVAR"
    roles = (GENERATOR, TOKENIZER)
    hooks = HOOKS
    files_hint = HINT
    decode_chunk = 8

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        if "class_emb.weight" in keys and "pos_1LC" in keys and "lvl_embed.weight" not in keys:
            return GENERATOR
        if "quantize.embedding.weight" in keys and "encoder.conv_blocks.0.res.0.conv1.weight" in keys:
            return TOKENIZER
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        made = dict(operations=operations, compute_dtype=compute_dtype)
        if role is GENERATOR:
            module = FlexVAR.from_state_dict(state_dict, path=path, config=FlexVAR.config_from_file(path), **made)
        elif role is TOKENIZER:
            module = FlexVAE.from_state_dict(state_dict, path=path, **made)
        else:
            raise NextScaleError(f"{role.what} is not a role of the FlexVAR family")
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: FlexVAR, tokenizer) -> None:
        if not isinstance(tokenizer, FlexVAE):
            raise NextScaleError(
                f"FlexVAR draws FlexVAE's tokens: connect FlexVAE.pth (loaded by {LOADER}), not "
                f"{type(tokenizer).__name__}"
            )
        check_inputs(generator, tokenizer)

    def class_names(self, generator: FlexVAR) -> tuple[str, ...]:
        return default_class_names(generator.num_classes)

    def parse_schedule(self, text: str) -> tuple[int, ...]:
        sides = parse_sides(text)
        if sides is None:
            raise NextScaleError("the schedule is empty: type the sides, e.g. 1,2,3,4,5,6,8,10,13,16")
        return sides

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        return sample_flexvar(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def encode(self, tokenizer: FlexVAE, images_B3HW, schedule=None, resize="center crop"):
        if schedule is None:
            raise NextScaleError("FlexVAR has no fixed schedule: give one to encode on, e.g. 1,2,3,4,6,9,13,16")
        patch_nums = tuple(schedule)
        side = patch_nums[-1] * tokenizer.downsample
        img = fit_square(images_B3HW, side, resize)
        with torch.inference_mode():
            indices = tokenizer.img_to_indices(img, patch_nums)
        fit = ImageFit(images_B3HW.shape[-2], images_B3HW.shape[-1], side, resize)
        return NextScaleTokens(indices=indices, patch_nums=patch_nums, source="encoded", extra={"fit": fit},
                               tokenizer_kind=FlexVAE.tokenizer_kind)

    def check_tokens(self, tokenizer: FlexVAE, tokens) -> None:
        if not isinstance(tokens, NextScaleTokens):
            raise NextScaleError(
                "these tokens were not made by FlexVAR: decode them with the tokenizer they were made with"
            )
        check_tokenizer_kind(tokens, FlexVAE.tokenizer_kind)
        vocab, top = tokenizer.config.vocab_size, max(int(i.max()) for i in tokens.indices)
        if top >= vocab:
            raise NextScaleError(
                f"these tokens use codes up to {top}, but FlexVAE's vocabulary has {vocab} codes: decode with the "
                "tokenizer they were made with"
            )

    def decode(self, tokenizer: FlexVAE, tokens, upto=None):
        """Scale ``upto - 1`` (the last by default) decoded on its own, since each FlexVAR scale is a whole image;
        an earlier scale's image is resized bicubically to the full size (as upstream's multi-scale
        reconstruction), so every scale decodes to one size."""
        self.check_tokens(tokenizer, tokens)
        side = tokens.patch_nums[-1] * tokenizer.downsample
        with torch.inference_mode():
            img = tokenizer.indices_to_img(tokens.indices[(upto or tokens.num_scales) - 1])
            if img.shape[-1] == side:
                return img
            return F.interpolate(img, size=(side, side), mode="bicubic").clamp(-1, 1)

    def preview(self, tokenizer: FlexVAE, latent):
        side = min(PREVIEW_LATENT_SIDE, latent.shape[-1])
        with torch.inference_mode():
            return tokenizer.codes_to_img(F.interpolate(latent[:1].float(), size=(side, side), mode="area"))

    def kv_geometry(self, generator: FlexVAR, schedule=None) -> KVGeometry:
        """The cache over ``schedule`` (None: upstream's 256-px training schedule)."""
        cfg = generator.config
        scales = tuple(schedule) if schedule is not None else SCHEDULE_256
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.head_dim, scales)

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        """VAR's accounting (:meth:`..var.family.VARFamily.memory`: the same blocks, head, KV cache and decoder
        shape) on the workload's schedule, upstream's 256-px training schedule when it has none."""
        return VAR_FAMILY.memory(generator, tokenizer, replace(workload, schedule=workload.schedule or SCHEDULE_256))


FAMILY = FlexVARFamily()
