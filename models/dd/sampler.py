"""Distilled Decoding's few-step sampler (upstream ``sample.py``): noise to VAR-layout tokens in one pass per step.

A run draws one Gaussian noise ``(L, Cvae)`` per image and walks the steps ``t_1 = 0 < t_2 < ...`` (scale indices;
the released models use ``(0,)`` for one step and ``(0, 4)`` or ``(0, 5)`` for two). At step ``t``:
1. The positions of scales ``>= t`` are set back to the run's noise (the same noise at every step); the earlier
   ones keep the previous step's codes (data).
2. One transformer pass predicts logits and a continuous code vector at every position.
3. The new codes: positions of scales ``< t`` keep their data; the others take the prediction, as the codebook
   row of the argmax of the logits for scales ``< split`` (greedy) and as the continuous vector from ``split`` on.

The result holds, per scale, the codebook index of each code (the argmax for the greedy scales, the nearest code of
the continuous vectors otherwise) and ``f_hat``, the sum of every scale's code map through VAR's ``Phi`` (upstream
``get_next_autoregressive_input``), which decoders prefer: the continuous scales are not codebook rows.

Randomness: batch item ``i`` draws its noise from its own CPU generator seeded ``(seed + i) mod 2**64`` (standard
normals, applied on the sampling device), so item ``i`` of a batch is the batch-of-1 image of seed ``seed + i``.
Upstream draws the batch's noise at once from the global generator: same distribution, other images for a seed.

Hooks: ``callback(step, num_steps, f_hat)`` after each step. There is no KV cache (each step is one pass over the
whole sequence), no per-scale draw a guide could replace and no control adapter trained for DD: ``guide``,
``control`` and ``kv_policy`` are refused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..core.errors import NextScaleError
from ..core.hooks import SamplerHooks
from ..core.sampling import item_generators
from ..core.tokens import NextScaleTokens
from ..var.sampler import check_labels
from .model import DistilledVAR

HOOKS = frozenset({"callback"})
REFUSED = {
    "guide": "DD predicts every scale in one pass from noise: there is no per-scale draw for a guide to replace",
    "control": "no control adapter was trained for DD's transformer",
    "kv_policy": "DD keeps no KV cache: each step is one pass over the whole sequence",
}


@dataclass(frozen=True)
class DDOptions:
    """``steps``: the scale index each step regenerates from (the first is 0); ``split``: the first scale whose
    codes are the continuous prediction (earlier scales take the logits' argmax). Upstream's released settings are
    ``steps=(0,)`` or ``(0, split)`` with ``split`` 5 for d16 and 4 for d20 and d24 (:func:`official_split`)."""

    steps: tuple[int, ...] = (0,)
    split: int = 5

    def check(self, num_scales: int) -> None:
        steps = tuple(self.steps)
        if not steps or steps[0] != 0 or any(b <= a for a, b in itertools.pairwise(steps)) or steps[-1] >= num_scales:
            raise NextScaleError(
                f"DD steps {steps} must start at scale 0 and increase, each below {num_scales} (the model's scales)"
            )
        if not 0 <= self.split <= num_scales:
            raise NextScaleError(f"DD split scale {self.split} must be in 0..{num_scales}")


def official_split(depth: int) -> int:
    """Upstream's ``loss_split_t`` for a released depth: 5 for d16, 4 for d20 and d24 (5 up to depth 16, 4 deeper)."""
    return 5 if depth <= 16 else 4


def check_inputs(generator: DistilledVAR, tokenizer) -> None:
    cfg, quantize = generator.config, tokenizer.quantize
    if (cfg.vocab_size, cfg.cvae) != tuple(quantize.embedding.weight.shape):
        raise NextScaleError(
            f"the DD generator draws {cfg.vocab_size} codes of {cfg.cvae} channels, the tokenizer has "
            f"{tuple(quantize.embedding.weight.shape)}: DD uses VAR's VQ-VAE, vae_ch160v4096z32.pth"
        )
    if tuple(tokenizer.patch_nums)[-1] != cfg.patch_nums[-1]:
        raise NextScaleError(
            f"the DD generator ends at {cfg.patch_nums[-1]}x{cfg.patch_nums[-1]} codes, the tokenizer at "
            f"{tokenizer.patch_nums[-1]}: use VAR's 256 px VQ-VAE, vae_ch160v4096z32.pth"
        )


def noise(seed: int, batch: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``(B, *shape)`` fp32 standard normals on ``device``, item ``i``'s drawn on the CPU with seed ``seed + i``."""
    return torch.stack([torch.randn(shape, generator=g) for g in item_generators(seed, batch)]).to(device)


def nearest_codes(codes_BLCv: torch.Tensor, codebook_VCv: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` index of the codebook row nearest (L2) each code vector."""
    distance_BLV = (
        codes_BLCv.square().sum(-1, keepdim=True) - 2 * codes_BLCv @ codebook_VCv.T + codebook_VCv.square().sum(-1)
    )
    return distance_BLV.argmin(-1)


def dd_step(
    generator: DistilledVAR, labels_B: torch.Tensor, x_BLCv: torch.Tensor, t: int, split: int, codebook_VCv
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DD step from scale ``t`` on ``x_BLCv`` (its positions from scale ``t`` on hold noise): the new codes
    ``(B, L, Cvae)`` and their indices ``(B, L)`` (argmax before ``split``, nearest code after)."""
    cfg = generator.config
    first_noisy, first_continuous = cfg.scale_start(t), cfg.scale_start(split)
    codes_BLCv, logits_BLV = generator(labels_B, x_BLCv, first_noisy)
    noisy_L = torch.arange(cfg.num_tokens, device=x_BLCv.device) >= first_noisy
    greedy_L = torch.arange(cfg.num_tokens, device=x_BLCv.device) < first_continuous
    continuous_BLCv = torch.where(noisy_L[:, None], codes_BLCv, x_BLCv)
    index_BL = torch.where(noisy_L, logits_BLV.argmax(-1), nearest_codes(x_BLCv, codebook_VCv))
    out_BLCv = torch.where(greedy_L[:, None], codebook_VCv[index_BL], continuous_BLCv)
    index_BL = torch.where(greedy_L, index_BL, nearest_codes(out_BLCv, codebook_VCv))
    return out_BLCv, index_BL


def codes_to_fhat(tokenizer, codes_BLCv: torch.Tensor, patch_nums) -> torch.Tensor:
    """``f_hat (B, Cvae, h, w)``, fp32: every scale's code map through VAR's ``Phi``, summed."""
    B, _, Cv = codes_BLCv.shape
    f_hat = None
    for si, pn in enumerate(patch_nums):
        begin = sum(p * p for p in patch_nums[:si])
        h_BChw = codes_BLCv[:, begin : begin + pn * pn].transpose(1, 2).reshape(B, Cv, pn, pn)
        part = tokenizer.quantize.contribution(si, patch_nums, h_BChw)
        f_hat = part if f_hat is None else f_hat + part
    return f_hat


@torch.no_grad()
def sample_dd(
    generator: DistilledVAR,
    tokenizer,
    labels_B: torch.Tensor,
    *,
    seed: int,
    options: DDOptions | None = None,
    hooks: SamplerHooks | None = None,
    device: str | torch.device | None = None,
) -> NextScaleTokens:
    """One image per label in ``len(options.steps)`` transformer passes; see the module docstring."""
    options = options or DDOptions(split=official_split(generator.depth))
    hooks = hooks or SamplerHooks()
    for name, why in REFUSED.items():
        if getattr(hooks, name) is not None:
            raise NextScaleError(f"Distilled Decoding takes no {name}: {why}; disconnect it")
    cfg = generator.config
    options.check(cfg.num_scales)
    check_inputs(generator, tokenizer)
    labels_B = torch.as_tensor(labels_B, device=device)
    check_labels(labels_B, cfg.num_classes)
    device = labels_B.device
    B, patch_nums = labels_B.shape[0], cfg.patch_nums
    codebook_VCv = tokenizer.quantize.codebook(device).float()
    noise_BLCv = noise(seed, B, (cfg.num_tokens, cfg.cvae), device)
    x_BLCv = noise_BLCv
    for step, t in enumerate(options.steps):
        noisy_L = torch.arange(cfg.num_tokens, device=device) >= cfg.scale_start(t)
        x_BLCv = torch.where(noisy_L[:, None], noise_BLCv, x_BLCv)
        x_BLCv, index_BL = dd_step(generator, labels_B, x_BLCv, t, options.split, codebook_VCv)
        f_hat = codes_to_fhat(tokenizer, x_BLCv, patch_nums)
        if hooks.callback is not None:
            hooks.callback(step, len(options.steps), f_hat)
    indices = [
        index_BL[:, cfg.scale_start(si) : cfg.scale_start(si + 1)].reshape(B, pn, pn)
        for si, pn in enumerate(patch_nums)
    ]
    return NextScaleTokens(
        indices, patch_nums, f_hat=f_hat, labels=labels_B,
        extra={"seed": seed, "steps": list(options.steps), "split": options.split},
    )
