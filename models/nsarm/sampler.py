"""The NSARM super-resolution run (upstream ``autoregressive_infer_cfg`` with ``LR_img``): a low-quality image to
the bits of its high-quality version.

1. The tokenizer encodes the input (``G * ds`` px square: 256 px for the released model) to its latent
   ``(B, d, G, G)``; the transformation network maps it to the bits of the first mapped scales
   (:meth:`~.mapper.ScaleMapper.bits`).
2. The Infinity scale loop (:func:`~..infinity.sampler.sample_infinity`, unchanged) runs on the model's 1:1
   schedule; a :class:`~..infinity.sampler.KeepScales` guide gives the first ``input_scales`` scales the mapped
   bits (upstream's ``gt_leak``), the transformer predicts the rest. The loop still draws bits at the kept scales
   (and discards them), as upstream does, so a seed draws the same bits.
3. One difference from Infinity's loop: NSARM brings the summed codes down to the next scale's grid with ``area``
   (its tokenizer's ``z_interplote_down``, which its loop uses), not trilinear. On the released schedule the two
   give the same inputs up to the 8 x 8 latent grid and differ from the 12 x 12 one on (measured against upstream
   by ``bench/compare_official_nsarm.py``), so the loop is handed the tokenizer through :class:`AreaNextInput`.

Upstream's settings (``scripts/infer.sh``): ``cfg = 1`` (no guidance), ``tau = 0.5``, top-k 2 and top-p 0.97 per
bit (fixed in its loop), every mapped scale kept, the prompt a caption of the image or empty.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks
from ..core.tokens import NextScaleBitTokens
from ..infinity.sampler import InfinityOptions, KeepScales, TextCondition, latent_scales, sample_infinity
from .model import NSARM


@dataclass
class UpscaleCondition:
    """Low-quality images ``(B, 3, S, S)`` in -1..1 at the model's input size, and optionally flan-T5 features of a
    prompt ``text_BTC`` with its mask ``mask_BT`` (None: the learned empty prompt, :meth:`NSARM.empty_prompt`)."""

    images_B3SS: torch.Tensor
    text_BTC: torch.Tensor | None = None
    mask_BT: torch.Tensor | None = None


@dataclass
class UpscaleOptions:
    """Upstream's defaults; ``input_scales``: how many first scales come from the input (None: every mapped one)."""

    cfg: float = 1.0
    tau: float = 0.5
    top_k: int = 2
    top_p: float = 0.97
    input_scales: int | None = None


class AreaNextInput:
    """The tokenizer as NSARM's loop uses it: every attribute is the tokenizer's, except that the next scale's input
    is the summed codes averaged (``area``) onto its grid."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    @staticmethod
    def downsample_codes(summed_BdHW: torch.Tensor, size_hw) -> torch.Tensor:
        return F.adaptive_avg_pool2d(summed_BdHW, tuple(size_hw))


def input_size(model: NSARM, tokenizer) -> int:
    """The side in pixels of the images the model takes (its network's grid times the tokenizer's cell)."""
    return model.mapper_config.grid * tokenizer.downsample


def output_size(model: NSARM, tokenizer) -> int:
    """The side in pixels of the images it makes (its schedule's last latent grid times the tokenizer's cell)."""
    return latent_scales(model, tokenizer, model.schedule())[-1][0] * tokenizer.downsample


def check_pair(model: NSARM, tokenizer) -> None:
    """Refuse a tokenizer whose latent is not the one the transformation network was trained on."""
    latent = latent_scales(model, tokenizer, model.schedule())  # refuses a tokenizer of another width
    cfg = model.mapper_config
    if tokenizer.codebook_dim != cfg.channels:
        raise NextScaleError(
            f"the NSARM transformation network maps {cfg.channels}-channel latents but the tokenizer codes "
            f"{tokenizer.codebook_dim}: use infinity_vae_d56_f8_14_patchify.pth"
        )
    mapped = [s[0] for s in latent[: cfg.num_scales]]
    if mapped != list(cfg.sides) or any(h != w for h, w in latent[: cfg.num_scales]):
        raise NextScaleError(
            f"the NSARM transformation network maps scales of sides {list(cfg.sides)} but this tokenizer's first "
            f"latent grids are {mapped}: use the tokenizer the model was trained with"
        )


@torch.no_grad()
def sample_nsarm(
    model: NSARM,
    tokenizer,
    condition: UpscaleCondition,
    *,
    seed: int,
    options: UpscaleOptions | None = None,
    hooks: SamplerHooks | None = None,
    device: str | torch.device | None = None,
) -> NextScaleBitTokens:
    """Bits of the upscaled images (module docstring); batch item ``i`` draws with ``seed + i``. ``hooks`` may set
    a KV policy, a control and a callback; the guide is the mapped scales'."""
    options = options or UpscaleOptions()
    hooks = hooks or SamplerHooks()
    if hooks.guide is not None:
        raise NextScaleError("NSARM's first scales come from the input image: a guide cannot be connected")
    check_pair(model, tokenizer)
    images = condition.images_B3SS
    side, mapped = input_size(model, tokenizer), model.mapper_config.num_scales
    device = torch.device(device) if device is not None else images.device
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, side, side):
        raise NextScaleError(f"NSARM takes ({side} x {side} px) RGB images, got shape {list(images.shape)}")
    keep = mapped if options.input_scales is None else options.input_scales
    if not 0 <= keep <= mapped:
        raise NextScaleError(f"input_scales = {keep}: this model maps 0..{mapped} scales from the input")
    B = images.shape[0]
    if condition.text_BTC is None:
        text, mask = model.empty_prompt(B, device)
    else:
        text, mask = condition.text_BTC.to(device), condition.mask_BT.to(device)
    latent = tokenizer.encode_latent(images.to(device))
    bits = model.map_transformer.bits(latent, keep) if keep else []
    schedule = model.schedule()
    infinity_options = InfinityOptions(
        cfg=options.cfg, tau=options.tau, top_k=options.top_k, top_p=options.top_p, schedule=schedule
    )
    tokens = sample_infinity(
        model, AreaNextInput(tokenizer), TextCondition(text, mask), seed=seed, options=infinity_options,
        hooks=replace(hooks, guide=KeepScales(bits, keep)), device=device,
    )
    tokens.extra.update(input_scales=keep)
    return tokens
