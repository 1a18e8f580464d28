"""NextScaleTokens: the per-scale token maps that flow between nodes (socket NEXTSCALE_TOKENS)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from .errors import NextScaleError

TOKENIZER_KINDS = {"var": "VAR's multi-scale VQ-VAE", "flexvar": "FlexVAE"}  # NextScaleTokens.tokenizer_kind


def check_tokenizer_kind(tokens: NextScaleTokens, kind: str, what: str = "these tokens") -> None:
    """Refuse ``tokens`` made for another kind of tokenizer than ``kind`` (a tokenizer's ``tokenizer_kind``): their
    indices index another codebook."""
    if tokens.tokenizer_kind != kind:
        made, wanted = (TOKENIZER_KINDS.get(k, k) for k in (tokens.tokenizer_kind, kind))
        raise NextScaleError(
            f"{what} index {made}'s codebook but this tokenizer is {wanted}: use the tokenizer they were made with"
        )


@dataclass
class NextScaleTokens:
    """Token maps of a batch of images, one per scale, and the schedule they belong to.

    Attributes:
        indices: one ``(B, pn, pn)`` int64 tensor per scale, coarse to fine.
        patch_nums: the schedule, ``len(patch_nums) == len(indices)``.
        f_hat: optional accumulated latent ``(B, Cvae, h, w)`` after the last scale. It is kept when it
            cannot be recomputed from the indices (soft "more smooth" sampling); decoders prefer it.
        labels: optional ``(B,)`` class labels the tokens were generated with (or encoded for).
        source: "sampled" or "encoded".
        extra: free-form metadata (seed, cfg, ...) for reports; never required.
        tokenizer_kind: the kind of tokenizer whose codebook the indices index (its ``tokenizer_kind``): "var"
            (VAR's multi-scale VQ-VAE, shared by VAR, HMAR, Switti, CoDe and Distilled Decoding) or "flexvar"
            (FlexVAE). Decoders and guides refuse tokens of another kind.
    """

    indices: list[torch.Tensor]
    patch_nums: tuple[int, ...]
    f_hat: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    source: str = "sampled"
    extra: dict = field(default_factory=dict)
    tokenizer_kind: str = "var"

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        if len(self.indices) != len(self.patch_nums):
            raise NextScaleError(
                f"token maps for {len(self.indices)} scales do not match a schedule of {len(self.patch_nums)} scales"
            )
        for si, (idx, pn) in enumerate(zip(self.indices, self.patch_nums)):
            if idx.dim() != 3 or idx.shape[1:] != (pn, pn):
                raise NextScaleError(f"token map of scale {si} has shape {tuple(idx.shape)}, expected (B, {pn}, {pn})")

    @property
    def batch_size(self) -> int:
        return int(self.indices[0].shape[0])

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def schedule(self) -> tuple[int, ...]:
        """The scales' grids (square sides), as a family's working memory reads them."""
        return self.patch_nums

    @classmethod
    def cat(cls, parts: Sequence[NextScaleTokens]) -> NextScaleTokens:
        """The batches ``parts`` (one schedule) as one, in order; ``f_hat`` and ``labels`` kept when all have them,
        ``source`` and ``extra`` those of the first."""
        first = parts[0]
        f_hats, labels = [p.f_hat for p in parts], [p.labels for p in parts]
        return replace(
            first,
            indices=[torch.cat(maps) for maps in zip(*(p.indices for p in parts))],
            f_hat=None if any(f is None for f in f_hats) else torch.cat(f_hats),
            labels=None if any(lb is None for lb in labels) else torch.cat(labels),
            extra=dict(first.extra),
        )

    def flat(self) -> list[torch.Tensor]:
        """Indices as ``(B, pn*pn)`` per scale (the layout the transformer and quantizer use)."""
        return [idx.reshape(idx.shape[0], -1) for idx in self.indices]

    def select(self, items: list[int]) -> NextScaleTokens:
        """A new batch made of the given batch items."""
        sel = torch.as_tensor(items, dtype=torch.long)
        return replace(
            self,
            indices=[idx[sel] for idx in self.indices],
            f_hat=None if self.f_hat is None else self.f_hat[sel],
            labels=None if self.labels is None else self.labels[sel],
            extra=dict(self.extra),
        )

    def to(self, device) -> NextScaleTokens:
        return replace(
            self,
            indices=[idx.to(device) for idx in self.indices],
            f_hat=None if self.f_hat is None else self.f_hat.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            extra=dict(self.extra),
        )

    def __repr__(self) -> str:  # shown in ComfyUI debug output; keep it short
        return f"NextScaleTokens(B={self.batch_size}, patch_nums={self.patch_nums}, source={self.source!r})"


@dataclass
class NextScaleBitTokens:
    """Bitwise token maps (Infinity): one ``(B, h, w, d)`` bool tensor per scale and the grids they belong to.

    Attributes:
        bits: one ``(B, h, w, d)`` bool tensor per scale, coarse to fine, on the tokenizer's latent grid
            (for a patchifying model, after un-patchifying: ``2h x 2w`` cells of ``d / 4`` bits).
        scales: the latent ``(h, w)`` of each scale.
        summed_codes: optional ``(B, d, H, W)`` sum of every scale's upsampled codes (decoders prefer it).
        source: "sampled" or "encoded".
        extra: free-form metadata (seed, cfg, prompt lengths, ...) for reports; never required.
    """

    bits: list[torch.Tensor]
    scales: tuple[tuple[int, int], ...]
    summed_codes: torch.Tensor | None = None
    source: str = "sampled"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scales = tuple((int(h), int(w)) for h, w in self.scales)
        if len(self.bits) != len(self.scales):
            raise NextScaleError(
                f"bit maps for {len(self.bits)} scales do not match a schedule of {len(self.scales)} scales"
            )
        for si, (b, (h, w)) in enumerate(zip(self.bits, self.scales)):
            if b.dim() != 4 or tuple(b.shape[1:3]) != (h, w):
                raise NextScaleError(f"bit map of scale {si} has shape {tuple(b.shape)}, expected (B, {h}, {w}, d)")

    @property
    def batch_size(self) -> int:
        return int(self.bits[0].shape[0])

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def codebook_dim(self) -> int:
        return int(self.bits[0].shape[-1])

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        """The scales' latent grids, as a family's working memory reads them."""
        return self.scales

    @classmethod
    def cat(cls, parts: Sequence[NextScaleBitTokens]) -> NextScaleBitTokens:
        """The batches ``parts`` (one schedule) as one, in order; ``summed_codes`` kept when all have them,
        ``source`` and ``extra`` those of the first."""
        first, summed = parts[0], [p.summed_codes for p in parts]
        return replace(
            first,
            bits=[torch.cat(maps) for maps in zip(*(p.bits for p in parts))],
            summed_codes=None if any(s is None for s in summed) else torch.cat(summed),
            extra=dict(first.extra),
        )

    def select(self, items: list[int]) -> NextScaleBitTokens:
        sel = torch.as_tensor(items, dtype=torch.long)
        return replace(
            self,
            bits=[b[sel] for b in self.bits],
            summed_codes=None if self.summed_codes is None else self.summed_codes[sel],
            extra=dict(self.extra),
        )

    def to(self, device) -> NextScaleBitTokens:
        return replace(
            self,
            bits=[b.to(device) for b in self.bits],
            summed_codes=None if self.summed_codes is None else self.summed_codes.to(device),
            extra=dict(self.extra),
        )

    def __repr__(self) -> str:
        return f"NextScaleBitTokens(B={self.batch_size}, scales={self.scales}, source={self.source!r})"
