"""Memory and fidelity of a KV policy against the full cache, on the same condition (labels, or a prompt for Infinity)
and seed.

Memory is measured from the cache during the run (:class:`~.policies.KVStats`): the peak of the allocated
buffers (a compressing policy's working copy included) and the most bytes allocated between two scales, against the
same for the full cache. Both are the bytes of the cache's tensors; in the packed layout (HACK) they are also the
bytes of the tokens held. Fidelity: per scale, the fraction of tokens (Infinity: bits) equal to the full-cache
run's (once one differs the later scales follow another path, so agreement falls with the scale), and the MSE / PSNR
of the decoded images in 0..1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..core.family import Family
from ..core.hooks import SamplerHooks
from ..core.imageops import model_to_image
from ..var.family import FAMILY as VAR_FAMILY
from ..var.sampler import SamplingOptions
from .policies import KVPolicySpec


@dataclass
class KVReport:
    policy: str
    budget: float
    full_peak_bytes: int
    peak_bytes: int
    full_carried_bytes: int
    carried_bytes: int
    token_agreement: list[float]  # per scale
    mse: float
    psnr: float  # dB; inf when the images are equal
    full_images: torch.Tensor  # (B, H, W, 3) in 0..1
    images: torch.Tensor
    unit: str = "token"  # what token_agreement compares: "token" (index maps) or "bit" (Infinity)

    @classmethod
    def merge(cls, parts: Sequence[KVReport]) -> KVReport:
        """One report of runs on consecutive sub-batches (same policy): the images in order, agreement and MSE
        averaged over the images (so equal to one run's on the whole batch), and the KV bytes of the largest run."""
        counts = [p.images.shape[0] for p in parts]
        total = sum(counts)
        mse = sum(p.mse * n for p, n in zip(parts, counts)) / total
        return replace(
            parts[0],
            full_peak_bytes=max(p.full_peak_bytes for p in parts),
            peak_bytes=max(p.peak_bytes for p in parts),
            full_carried_bytes=max(p.full_carried_bytes for p in parts),
            carried_bytes=max(p.carried_bytes for p in parts),
            token_agreement=[
                sum(a * n for a, n in zip(scale, counts)) / total
                for scale in zip(*(p.token_agreement for p in parts))
            ],
            mse=mse,
            psnr=psnr_db(mse),
            full_images=torch.cat([p.full_images for p in parts]),
            images=torch.cat([p.images for p in parts]),
        )

    @property
    def peak_ratio(self) -> float:
        return self.peak_bytes / max(1, self.full_peak_bytes)

    @property
    def carried_ratio(self) -> float:
        return self.carried_bytes / max(1, self.full_carried_bytes)

    def text(self) -> str:
        agree = ", ".join(f"{a:.2f}" for a in self.token_agreement)
        psnr = "identical" if math.isinf(self.psnr) else f"{self.psnr:.2f} dB"
        return (
            f"KV policy: {self.policy}\n"
            f"peak KV bytes: {self.peak_bytes:,} of {self.full_peak_bytes:,} with the full cache "
            f"({self.peak_ratio:.1%})\n"
            f"KV bytes carried between scales: {self.carried_bytes:,} of {self.full_carried_bytes:,} "
            f"({self.carried_ratio:.1%})\n"
            f"{self.unit} agreement with the full cache per scale: {agree}\n"
            f"image vs full cache: MSE {self.mse:.5f}, PSNR {psnr}"
        )


def psnr_mse(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """MSE and PSNR (peak 1) of two image batches in 0..1."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return mse, psnr_db(mse)


def psnr_db(mse: float) -> float:
    """PSNR in dB (peak 1) of a mean squared error; inf when it is 0."""
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def decode(tokenizer, tokens, family: Family = VAR_FAMILY) -> torch.Tensor:
    """ComfyUI IMAGE ``(B, H, W, 3)`` in 0..1 of sampled tokens, on the CPU."""
    return model_to_image(family.decode(tokenizer, tokens)).cpu()


def run_with(var, tokenizer, condition, seed, spec: KVPolicySpec, options=None, device=None,
             family: Family = VAR_FAMILY, schedule=None):
    """``(tokens, policy)`` of one sampling run under ``spec`` (the policy holds the measured stats). ``condition``
    is what ``family.sample`` takes (class labels, a list or a tensor; an Infinity ``TextCondition``), ``schedule``
    the family's schedule of the run (None: its default; Infinity's is also ``options.schedule``)."""
    geometry = family.kv_geometry(var, schedule)
    policy = spec.bind_scales(geometry.layers, geometry.heads, geometry.scales)
    if isinstance(condition, (list, tuple)):
        condition = torch.as_tensor(condition)
    tokens = family.sample(
        var, tokenizer, condition, seed=seed, options=options, hooks=SamplerHooks(kv_policy=policy), device=device,
    )
    return tokens, policy


def scale_maps(tokens) -> tuple[str, list[torch.Tensor]]:
    """``(unit, per-scale maps)`` of sampled tokens: index maps, or an Infinity run's bits."""
    return ("token", tokens.indices) if hasattr(tokens, "indices") else ("bit", tokens.bits)


def kv_report(
    var,
    tokenizer,
    condition,
    seed: int,
    spec: KVPolicySpec,
    options: SamplingOptions | None = None,
    device=None,
    full=None,
    family: Family = VAR_FAMILY,
    schedule=None,
) -> KVReport:
    """Sample with the full cache and with ``spec`` (same condition, seed and options; :func:`run_with`) and compare.
    ``full`` may pass a previous ``(tokens, policy, images)`` full-cache run to reuse; ``family`` is the generator's
    (default VAR)."""
    if full is None:
        full_tokens, full_policy = run_with(
            var, tokenizer, condition, seed, KVPolicySpec("full"), options, device, family, schedule
        )
        full = (full_tokens, full_policy, decode(tokenizer, full_tokens, family))
    full_tokens, full_policy, full_images = full
    tokens, policy = run_with(var, tokenizer, condition, seed, spec, options, device, family, schedule)
    images = decode(tokenizer, tokens, family)
    unit, maps = scale_maps(tokens)
    agreement = [float((a == b).float().mean()) for a, b in zip(scale_maps(full_tokens)[1], maps)]
    mse, psnr = psnr_mse(full_images, images)
    return KVReport(
        policy=spec.describe(),
        budget=spec.budget if spec.policy != "full" else 1.0,
        full_peak_bytes=full_policy.stats.peak_bytes,
        peak_bytes=policy.stats.peak_bytes,
        full_carried_bytes=full_policy.stats.carried_bytes(),
        carried_bytes=policy.stats.carried_bytes(),
        token_agreement=agreement,
        mse=mse,
        psnr=psnr,
        full_images=full_images,
        images=images,
        unit=unit,
    )
