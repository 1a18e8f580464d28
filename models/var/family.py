"""The VAR family: class-conditional generators, their multi-scale VQ-VAE tokenizers, and the control models made
for them (CAR branches, NextScale adapters). The protocol is :class:`~..core.family.Family`."""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import torch
import torch.nn.functional as F

from ..control.adapters import ADAPTER_PREFIX, ADAPTER_WHAT, CAR_WHAT, AdapterConfig, CARControlNet, ControlAdapter
from ..core.checkpoint import config_from_metadata
from ..core.errors import NextScaleError
from ..core.family import Family, KVGeometry, Role, Workload
from ..core.hooks import SamplerHooks
from ..core.imageops import ImageFit, fit_square
from ..core.memory import MemoryNeed, block_bytes, conv_coder_bytes, draw_bytes, kv_cache_bytes, weight_bytes
from ..core.schedule import parse_schedule
from ..core.tokens import NextScaleTokens, check_tokenizer_kind
from .classes import default_class_names
from .collaborative import check_collaborators, sample_collaborative
from .model import VAR
from .model import WHAT as GENERATOR_WHAT
from .sampler import sample
from .tokenizer import WHAT as TOKENIZER_WHAT
from .tokenizer import MultiScaleVQVAE

PREVIEW_LATENT_SIDE = 8  # previews decode at most an 8x8 latent: cheap even for the official tokenizer
DECODER_COPIES = 5  # feature maps of its largest level held at once while decoding (measured)
STREAM_COPIES = 4  # fp32 copies of the residual stream at a block's MLP (measured: core/memory.py)
HINT = (
    "Official VAR files (vae_ch160v4096z32.pth, var_d16.pth ... var_d36.pth) are published in the Hugging Face "
    "repository FoundationVision/var"
)

GENERATOR = Role("generator", GENERATOR_WHAT, "a VAR generator (transformer)", "NextScale Load Generator")
TOKENIZER = Role(
    "tokenizer", TOKENIZER_WHAT, "a VAR tokenizer (multi-scale VQ-VAE)", "NextScale Load Tokenizer",
    dtypes=(torch.float32,), auto="vae",
)
CAR = Role("control", CAR_WHAT, "a CAR control adapter", "NextScale Load Control")
ADAPTER = Role("control", ADAPTER_WHAT, "a NextScale control adapter", "NextScale Load Control")


def _adapter_config(path: str) -> AdapterConfig:
    config = config_from_metadata(path, AdapterConfig.from_dict, ADAPTER_WHAT)
    if config is None:
        raise NextScaleError(
            f"{ADAPTER_WHAT} file '{path}' has no 'nextscale_config' metadata: adapters are safetensors written by "
            f"training/train_control.py"
        )
    return config


def decoding_bytes(tokenizer: MultiScaleVQVAE, workload: Workload, last_scale: int, preview: bool) -> tuple[int, int]:
    """``(preview, decode)`` bytes of VAR's VQ-VAE decoder: one preview image while sampling (``preview``), and
    ``workload.decode_batch`` full images whose latent is ``last_scale`` cells on a side."""
    levels = [tokenizer.config.ch * m for m in tokenizer.config.ch_mult]
    itemsize, side = workload.decode_dtype.itemsize, PREVIEW_LATENT_SIDE * tokenizer.downsample
    shown = conv_coder_bytes(1, levels, side, side, itemsize, DECODER_COPIES) if preview else 0
    side = last_scale * tokenizer.downsample
    decoded = conv_coder_bytes(workload.decode_batch, levels, side, side, itemsize, DECODER_COPIES)
    return shown, decoded


def scale_memory(generator, tokenizer, workload: Workload, kv: int, step: int) -> MemoryNeed:
    """The need of a VAR-shaped generator holding ``kv`` bytes of keys and values: the larger of a block's and the
    draw's peak for ``step`` new tokens per row, the VQ-VAE's preview and decoding (on the workload's schedule),
    and the weights, the workload's controls' included."""
    activations = preview = decode = 0
    if generator is not None:
        cfg, rows, size = generator.config, workload.rows, workload.dtype.itemsize
        activations = max(
            block_bytes(rows, step, cfg.embed_dim, cfg.hidden_dim, size, STREAM_COPIES),
            draw_bytes(workload.batch_size, rows, step, cfg.embed_dim, cfg.vocab_size, workload.guided),
        )
    if tokenizer is not None:
        last_scale = (workload.schedule or tokenizer.patch_nums)[-1]
        preview, decode = decoding_bytes(tokenizer, workload, last_scale, preview=generator is not None)
    weights = sum(weight_bytes(m) for m in (generator, tokenizer, *workload.controls) if m is not None)
    return MemoryNeed(weights, kv, activations, preview, decode)


class VARFamily(Family):
    name = "var"
    title = "VAR"
    roles = (GENERATOR, TOKENIZER, CAR, ADAPTER)
    hooks = frozenset({"guide", "control", "kv_policy", "accel", "callback"})
    files_hint = HINT
    decode_chunk = 8

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        if any(k.startswith("car_") for k in keys):  # CAR alone, or merged with its VAR-d16
            return CAR
        if any(k.startswith(ADAPTER_PREFIX) for k in keys):
            return ADAPTER
        if "class_emb.weight" in keys and any(k.startswith("blocks.") for k in keys):
            return GENERATOR
        if "quantize.embedding.weight" in keys and any(k.startswith("decoder.") for k in keys):
            return TOKENIZER
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        made = dict(operations=operations, compute_dtype=compute_dtype)  # the one place they reach the classes
        if role is GENERATOR:
            config = VAR.config_from_file(path)
            module = VAR.from_state_dict(state_dict, path=path, config=config, **made)
        elif role is TOKENIZER:
            config = MultiScaleVQVAE.config_from_file(path)
            module = MultiScaleVQVAE.from_state_dict(state_dict, path=path, config=config, **made)
        elif role is CAR:
            module = CARControlNet.from_state_dict(state_dict, path=path, **made)
        elif role is ADAPTER:
            module = ControlAdapter.from_state_dict(state_dict, path=path, **made, config=_adapter_config(path))
        else:
            raise NextScaleError(f"{role.what} is not a role of the VAR family")
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: VAR, tokenizer: MultiScaleVQVAE) -> None:
        problems = []
        if generator.config.vocab_size != tokenizer.config.vocab_size:
            problems.append(f"vocabulary {generator.config.vocab_size} vs {tokenizer.config.vocab_size}")
        if generator.config.cvae != tokenizer.config.z_channels:
            problems.append(f"latent channels {generator.config.cvae} vs {tokenizer.config.z_channels}")
        if problems:
            raise NextScaleError(
                f"the generator and the tokenizer do not belong together ({'; '.join(problems)}). Official VAR "
                f"generators use vae_ch160v4096z32; the embedded generator uses the embedded tokenizer"
            )

    def class_names(self, generator: VAR) -> tuple[str, ...]:
        names = generator.class_names
        return tuple(names) if names else default_class_names(generator.config.num_classes)

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        return sample(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def check_collaborators(self, drafter, refiner, tokenizer, draft_scales):
        check_collaborators(drafter, refiner, tokenizer, draft_scales)

    def sample_collaborative(
        self, drafter, refiner, tokenizer, condition, *, draft_scales, seed, options=None, hooks=None,
        drafter_hooks=None, device=None,
    ):
        drafter_hooks = drafter_hooks or SamplerHooks()
        return sample_collaborative(
            drafter, refiner, tokenizer, condition, draft_scales=draft_scales, seed=seed, options=options,
            hooks=hooks, drafter_control=drafter_hooks.control, drafter_kv_policy=drafter_hooks.kv_policy,
            device=device,
        )

    def parse_schedule(self, text: str) -> tuple[int, ...]:
        return parse_schedule(text)

    def encode(self, tokenizer: MultiScaleVQVAE, images_B3HW, schedule=None, resize="center crop"):
        patch_nums = tuple(schedule) if schedule is not None else tokenizer.patch_nums
        side = patch_nums[-1] * tokenizer.downsample
        img = fit_square(images_B3HW, side, resize)
        with torch.inference_mode():
            indices = tokenizer.img_to_indices(img, patch_nums=patch_nums)
            f_hat = tokenizer.indices_to_fhat(indices, patch_nums=patch_nums).float()
        per_scale = [idx.view(-1, pn, pn) for idx, pn in zip(indices, patch_nums)]
        fit = ImageFit(images_B3HW.shape[-2], images_B3HW.shape[-1], side, resize)
        return NextScaleTokens(
            indices=per_scale, patch_nums=patch_nums, f_hat=f_hat, source="encoded", extra={"fit": fit}
        )

    def check_tokens(self, tokenizer: MultiScaleVQVAE, tokens) -> None:
        if not isinstance(tokens, NextScaleTokens):
            raise NextScaleError(
                "these tokens were not made by a VAR model: decode them with the tokenizer they were made with"
            )
        check_tokenizer_kind(tokens, tokenizer.tokenizer_kind)
        vocab, top = tokenizer.config.vocab_size, max(int(i.max()) for i in tokens.indices)
        if top >= vocab:
            raise NextScaleError(
                f"these tokens use codes up to {top}, but the tokenizer's vocabulary has {vocab} codes: decode with "
                "the tokenizer they were made with"
            )

    def decode(self, tokenizer: MultiScaleVQVAE, tokens, upto=None):
        self.check_tokens(tokenizer, tokens)
        with torch.inference_mode():
            if upto is None and tokens.f_hat is not None:
                f_hat = tokens.f_hat
            else:
                f_hat = tokenizer.indices_to_fhat(tokens.flat(), patch_nums=tokens.patch_nums, upto=upto)
            return tokenizer.fhat_to_img(f_hat)

    def preview(self, tokenizer: MultiScaleVQVAE, latent):
        side = min(PREVIEW_LATENT_SIDE, latent.shape[-1])
        f_hat = F.interpolate(latent[:1].float(), size=(side, side), mode="area")
        with torch.inference_mode():
            return tokenizer.fhat_to_img(f_hat)

    def kv_geometry(self, generator: VAR, schedule=None) -> KVGeometry:
        cfg = generator.config
        scales = tuple(schedule) if schedule is not None else generator.patch_nums
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.embed_dim // cfg.num_heads, scales)

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        kv = step = 0
        if generator is not None:
            geometry = self.kv_geometry(generator, workload.schedule)
            rows, size = workload.rows, workload.dtype.itemsize
            kv = kv_cache_bytes(geometry, rows, size, workload.kv_policy)
            for control in workload.controls:  # a CAR branch runs its blocks through its own full cache
                if isinstance(control, CARControlNet):
                    branch = KVGeometry(len(control.car_blocks), geometry.heads, geometry.head_dim, geometry.scales)
                    kv += kv_cache_bytes(branch, rows, size)
            step = workload.step_tokens or max(geometry.areas)
        return scale_memory(generator, tokenizer, workload, kv, step)


class VARTokensFamily(Family):
    """The base of a family whose tokens are VAR's (its tokenizer is VAR's multi-scale VQ-VAE): encoding, checking,
    decoding and previews are VAR's."""

    def encode(self, tokenizer, images_B3HW, schedule=None, resize="center crop"):
        return FAMILY.encode(tokenizer, images_B3HW, schedule, resize)

    def check_tokens(self, tokenizer, tokens) -> None:
        FAMILY.check_tokens(tokenizer, tokens)

    def decode(self, tokenizer, tokens, upto=None):
        return FAMILY.decode(tokenizer, tokens, upto)

    def preview(self, tokenizer, latent):
        return FAMILY.preview(tokenizer, latent)


FAMILY = VARFamily()
