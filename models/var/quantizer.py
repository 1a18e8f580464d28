"""VAR's multi-scale residual vector quantiser and its Phi refiners.

Conventions (upstream ``models/quant.py``, ``VectorQuantizer2`` and ``Phi``):
- The latent ``f_BChw`` is a square ``side x side`` grid with ``side = patch_nums[-1]``; a scale ``si``
  holds a ``pn x pn`` token map, flattened row-major to ``idx_Bl`` of shape ``(B, pn*pn)``.
- Scale ``si``'s contribution to the latent is ``Phi_si(up(embed(idx_si)))``: the code map is upsampled
  to ``side`` with PyTorch bicubic (``align_corners=False``) -- not at the last scale, which is already
  full size -- and *then* refined by Phi. ``f_hat`` is the fp32 sum of the contributions.
- Going down to a scale's grid (``f_rest`` while encoding, ``f_hat`` for the next transformer input) is
  PyTorch ``area`` interpolation.
- Phi convs are shared between scales: scale ``si`` of ``K`` uses conv ``schedule.phi_index(si, K, n)``.
- Everything computes on the device of the indices or latents passed in, in the quantiser's compute dtype
  (:class:`~..core.ops.ComputeDtype`); the codebook is an op-set ``Embedding``, read through :mod:`..core.ops`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.quantize import nearest_code
from ..core.errors import NextScaleError
from ..core.ops import ComputeDtype, TorchOps, embed, weight_and_bias
from ..core.schedule import phi_index


def _up(h_BChw: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(h_BChw, size=(side, side), mode="bicubic", align_corners=False)


def _down(f_BChw: torch.Tensor, pn: int) -> torch.Tensor:
    return F.interpolate(f_BChw, size=(pn, pn), mode="area")


class Phi(nn.Conv2d):
    """Residual refiner ``Phi(x) = (1 - r) * x + r * conv3x3(x)`` (``r = quant_resi``, 0.5 in VAR). Its weights are
    its own keys (``qresi_ls.{i}.weight``), so it is a torch ``Conv2d`` whatever the op set, casting them to its
    input's device and dtype on every call."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        conv_BChw = self._conv_forward(h_BChw, *weight_and_bias(self, h_BChw.device, h_BChw.dtype))
        return h_BChw.mul(1 - self.ratio) + conv_BChw.mul(self.ratio)


def _make_phi(channels: int, ratio: float) -> nn.Module:
    # With a zero ratio Phi is the identity and holds no weights (as upstream).
    return Phi(channels, ratio) if abs(ratio) > 1e-6 else nn.Identity()


class PhiShared(nn.Module):
    """One Phi for every scale (``share_quant_resi = 1``); key ``quant_resi.qresi.*``."""

    num_convs = 1

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, i: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``n`` Phis spread over the scales (``share_quant_resi = n >= 2``, 4 in VAR); keys ``quant_resi.qresi_ls.{i}``."""

    def __init__(self, qresi_ls: Sequence[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(qresi_ls)

    @property
    def num_convs(self) -> int:
        return len(self.qresi_ls)

    def __getitem__(self, i: int) -> nn.Module:
        return self.qresi_ls[i]


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (``share_quant_resi = 0``); keys ``quant_resi.{i}.*``."""

    @property
    def num_convs(self) -> int:
        return len(self)


def make_phi_bank(channels: int, ratio: float, share: int, num_nonshared: int) -> nn.Module:
    """The Phi container for ``share_quant_resi = share`` (0: ``num_nonshared`` convs, 1: one, n: n)."""
    if share == 0:
        return PhiNonShared([_make_phi(channels, ratio) for _ in range(num_nonshared)])
    if share == 1:
        return PhiShared(_make_phi(channels, ratio))
    return PhiPartiallyShared([_make_phi(channels, ratio) for _ in range(share)])


class MultiScaleQuantizer(ComputeDtype, nn.Module):
    """Multi-scale residual VQ (upstream ``VectorQuantizer2`` with ``using_znorm=False``).

    Submodules give the official keys under ``quantize.``: ``embedding.weight (V, Cvae)``, the Phi bank
    ``quant_resi.*`` and the buffer ``ema_vocab_hit_SV (K, V)`` (a training statistic, unused here).
    """

    def __init__(
        self,
        vocab_size: int,
        channels: int,
        patch_nums: Sequence[int],
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        operations=TorchOps,
    ):
        super().__init__()
        self.vocab_size, self.channels = vocab_size, channels
        self.patch_nums = tuple(patch_nums)
        self.code_search: str | None = None  # nearest_code backend; None = automatic
        self.quant_resi = make_phi_bank(
            channels, quant_resi, share_quant_resi, default_qresi_counts or len(self.patch_nums)
        )
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = operations.Embedding(vocab_size, channels)

    # -- building blocks ---------------------------------------------------------------------------

    def phi(self, si: int, num_scales: int) -> nn.Module:
        """The Phi refiner of scale ``si`` in a schedule of ``num_scales`` scales."""
        return self.quant_resi[phi_index(si, num_scales, self.quant_resi.num_convs)]

    def codebook(self, device: torch.device) -> torch.Tensor:
        """The code vectors ``(V, Cvae)`` on ``device``, in the compute dtype."""
        return weight_and_bias(self.embedding, device, self.compute_dtype)[0]

    def embed(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Code map ``(B, Cvae, pn, pn)`` of the indices ``(B, pn*pn)`` (or ``(B, pn, pn)``), on their device."""
        B = idx_Bl.shape[0]
        return (
            embed(self.embedding, idx_Bl.reshape(B, pn * pn), self.compute_dtype)
            .transpose(1, 2)
            .reshape(B, self.channels, pn, pn)
        )

    def contribution(self, si: int, patch_nums: Sequence[int], h_BChw: torch.Tensor) -> torch.Tensor:
        """``Phi_si(up(h))`` in fp32: what scale ``si``'s code map ``h (B, Cvae, pn, pn)`` adds to ``f_hat``."""
        K = len(patch_nums)
        if si < K - 1:
            h_BChw = _up(h_BChw, patch_nums[-1])
        return self.phi(si, K)(h_BChw.to(self.compute_dtype)).float()

    # -- encoding ----------------------------------------------------------------------------------

    def _residual_quantize(
        self, f_BChw: torch.Tensor, patch_nums: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The encoding loop (upstream ``f_to_idxBl_or_fhat``) on a detached fp32 copy of ``f``; returns
        the per-scale indices and the cumulative ``f_hat`` after each scale (carrying gradients to codebook and Phi)."""
        B, C, H, W = f_BChw.shape
        if H != W or W != patch_nums[-1]:
            raise NextScaleError(
                f"the latent grid is {H}x{W} but the schedule {tuple(patch_nums)} ends at "
                f"{patch_nums[-1]}x{patch_nums[-1]}; the image side must be {patch_nums[-1]} x the downsampling factor"
            )
        K = len(patch_nums)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list, fhat_list = [], []
        for si, pn in enumerate(patch_nums):
            z_NC = (f_rest if si == K - 1 else _down(f_rest, pn)).permute(0, 2, 3, 1).reshape(-1, C)
            idx_Bl = nearest_code(z_NC, self.codebook(z_NC.device), self.code_search).view(B, pn * pn)
            h_BChw = self.contribution(si, patch_nums, self.embed(idx_Bl, pn))
            f_hat = f_hat + h_BChw
            f_rest.sub_(h_BChw.detach())
            idx_list.append(idx_Bl)
            fhat_list.append(f_hat)
        return idx_list, fhat_list

    @torch.no_grad()
    def f_to_indices_and_fhat(
        self, f_BChw: torch.Tensor, patch_nums: Sequence[int]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-scale indices ``[(B, pn*pn)]`` of the latent ``f (B, Cvae, side, side)`` and the final fp32 ``f_hat``."""
        idx_list, fhat_list = self._residual_quantize(f_BChw, patch_nums)
        return idx_list, fhat_list[-1]

    def f_to_indices(self, f_BChw: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
        """Per-scale indices ``[(B, pn*pn)]`` of the latent ``f (B, Cvae, side, side)``."""
        return self.f_to_indices_and_fhat(f_BChw, patch_nums)[0]

    def forward(self, f_BChw: torch.Tensor, patch_nums: Sequence[int] | None = None, beta: float = 0.25):
        """Training pass: ``(f_hat, vq_loss, indices)``. ``f_hat`` passes gradients straight through to ``f``;
        the loss averages over scales ``beta * ||sg(f_hat_si) - f||^2 + ||f_hat_si - sg(f)||^2`` (MSE)."""
        idx_list, fhat_list = self._residual_quantize(f_BChw, patch_nums or self.patch_nums)
        f = f_BChw.float()
        loss = sum(beta * F.mse_loss(fh.detach(), f) + F.mse_loss(fh, f.detach()) for fh in fhat_list) / len(fhat_list)
        f_hat = f + (fhat_list[-1] - f).detach()
        return f_hat, loss, idx_list

    # -- decoding and the transformer's inputs -----------------------------------------------------

    def indices_to_fhat(
        self,
        indices: Sequence[torch.Tensor],
        patch_nums: Sequence[int],
        latent_hw: int | tuple[int, int] | None = None,
        upto: int | None = None,
    ) -> torch.Tensor:
        """``f_hat (B, Cvae, side, side)`` fp32 from the first ``upto`` scales' indices (default: all given).

        ``indices`` may hold fewer scales than ``patch_nums`` (a generation in progress); ``patch_nums`` is
        always the full schedule, so a partial ``f_hat`` equals the cumulative one of a complete encoding.
        ``latent_hw``, when given, must be the schedule's square latent grid.
        """
        side = patch_nums[-1]
        hw = (latent_hw, latent_hw) if isinstance(latent_hw, int) else latent_hw
        if hw is not None and tuple(hw) != (side, side):
            raise NextScaleError(
                f"latent grid {latent_hw} does not match the schedule {tuple(patch_nums)} (side {side})"
            )
        k = len(indices) if upto is None else upto
        if not 0 <= k <= len(indices) or len(indices) > len(patch_nums):
            raise NextScaleError(
                f"cannot use {k} of {len(indices)} token maps with a schedule of {len(patch_nums)} scales"
            )
        B, device = (indices[0].shape[0], indices[0].device) if indices else (1, None)
        f_hat = torch.zeros(B, self.channels, side, side, dtype=torch.float32, device=device)
        for si in range(k):
            idx_Bl = indices[si]
            if idx_Bl.numel() != B * patch_nums[si] ** 2:
                raise NextScaleError(
                    f"token map of scale {si} has shape {tuple(idx_Bl.shape)}, expected ({B}, {patch_nums[si] ** 2})"
                )
            f_hat.add_(self.contribution(si, patch_nums, self.embed(idx_Bl, patch_nums[si])))
        return f_hat

    def next_input(
        self, si: int, patch_nums: Sequence[int], f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference step (upstream ``get_next_autoregressive_input``): ``f_hat += Phi_si(up(h))`` **in
        place**, then return ``(f_hat, area(f_hat -> pn_{si+1}))``, or ``(f_hat, f_hat)`` after the last scale.

        ``h (B, Cvae, pn, pn)`` is the sampled code map; it may be a soft mixture of codes.
        """
        f_hat.add_(self.contribution(si, patch_nums, h_BChw))
        if si == len(patch_nums) - 1:
            return f_hat, f_hat
        return f_hat, _down(f_hat, patch_nums[si + 1])

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> torch.Tensor:
        """Transformer input ``x_BLCv (B, L - 1, Cvae)`` fp32 for given indices (upstream ``idxBl_to_var_input``):
        for each scale but the last, ``next_input``'s output flattened row-major, concatenated."""
        B, side = indices[0].shape[0], patch_nums[-1]
        f_hat = torch.zeros(B, self.channels, side, side, dtype=torch.float32, device=indices[0].device)
        pieces = []
        for si in range(len(patch_nums) - 1):
            f_hat, next_BChw = self.next_input(si, patch_nums, f_hat, self.embed(indices[si], patch_nums[si]))
            pieces.append(next_BChw.flatten(2).transpose(1, 2))
        return torch.cat(pieces, dim=1)
