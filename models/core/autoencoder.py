"""The convolutional autoencoder both tokenizers share (taming / LDM "vq-f16"; flux's VQGAN has the same shape).

VAR's multi-scale VQ-VAE (:mod:`.tokenizer`) and Infinity's BSQ tokenizer (:mod:`.bsq`) differ only in details
that a :class:`BlockKit` carries:

- how a convolution and a GroupNorm are laid out in the state dict (BSQ nests each one key level deeper,
  ``.conv.conv`` / ``.norm.norm``);
- the GroupNorm's group count (VAR: 32; BSQ: upstream's 32-else-24 rule);
- the activation (VAR: ``F.silu``; BSQ: ``x * sigmoid(x)`` written out, which upstream's latents depend on to the
  last bit).

VAR's tokenizer may also attend (``AttnBlock``) at the lowest level and in the middle; BSQ never does.

Module names reproduce the official keys: ``conv_in``, ``down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``,
``down.{i}.attn.{j}``, ``down.{i}.downsample.conv``, ``mid.{block_1,attn_1,block_2}``, ``up.{i}.upsample.conv``,
``norm_out``, ``conv_out``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .ops import weight_and_bias


@dataclass(frozen=True)
class BlockKit:
    """How to build a tokenizer's convolutions and norms, and which activation it uses.

    ``conv(c_in, c_out, kernel_size, stride, padding)`` and ``norm(channels)`` return modules; ``act`` is a
    function of a tensor.
    """

    conv: Callable[[int, int, int, int, int], nn.Module]
    norm: Callable[[int], nn.Module]
    act: Callable[[torch.Tensor], torch.Tensor]

    def conv3(self, c_in: int, c_out: int) -> nn.Module:
        return self.conv(c_in, c_out, 3, 1, 1)

    def conv1(self, c_in: int, c_out: int) -> nn.Module:
        return self.conv(c_in, c_out, 1, 1, 0)


class ResnetBlock(nn.Module):
    """``shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))``; a 1x1 ``nin_shortcut`` only when widths differ."""

    def __init__(self, kit: BlockKit, c_in: int, c_out: int):
        super().__init__()
        self.act = kit.act
        self.norm1, self.conv1 = kit.norm(c_in), kit.conv3(c_in, c_out)
        self.norm2, self.conv2 = kit.norm(c_out), kit.conv3(c_out, c_out)
        self.nin_shortcut = kit.conv1(c_in, c_out) if c_in != c_out else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x_BChw)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, ``x + proj_out(softmax(q^T k / sqrt(C)) v)``.

    One 1x1 conv ``qkv`` gives ``3C`` channels laid out as ``[q | k | v]``, each ``C`` wide.
    """

    def __init__(self, kit: BlockKit, channels: int):
        super().__init__()
        self.norm = kit.norm(channels)
        self.qkv = kit.conv1(channels, 3 * channels)
        self.proj_out = kit.conv1(channels, channels)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        q_BlC, k_BlC, v_BlC = self.qkv(self.norm(x_BChw)).view(B, 3, C, H * W).transpose(2, 3).unbind(1)
        o_BlC = F.scaled_dot_product_attention(q_BlC[:, None], k_BlC[:, None], v_BlC[:, None], scale=C**-0.5)[:, 0]
        return x_BChw + self.proj_out(o_BlC.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, kit: BlockKit, channels: int):
        super().__init__()
        self.conv = kit.conv(channels, channels, 3, 2, 0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, kit: BlockKit, channels: int):
        super().__init__()
        self.conv = kit.conv3(channels, channels)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResnetBlocks ``block.{j}``, each followed by ``attn.{j}`` when the level attends.
    The owner adds the level's ``downsample`` (encoder) or ``upsample`` (decoder) and applies it."""

    def __init__(self, kit: BlockKit, c_in: int, c_out: int, num_blocks: int, with_attn: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(kit, c_in if j == 0 else c_out, c_out) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(kit, c_out) for _ in range(num_blocks if with_attn else 0))

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h_BChw = block(h_BChw)
            if len(self.attn):
                h_BChw = self.attn[j](h_BChw)
        return h_BChw


class Mid(nn.Module):
    """``block_1 -> attn_1 -> block_2`` at the lowest resolution (``attn_1`` is the identity, with no keys, when
    the model does not attend there)."""

    def __init__(self, kit: BlockKit, channels: int, with_attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(kit, channels, channels)
        self.attn_1 = AttnBlock(kit, channels) if with_attn else nn.Identity()
        self.block_2 = ResnetBlock(kit, channels, channels)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h_BChw)))


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, z_channels, H/ds, W/ds)``; levels ``down.0`` (full size) to ``down.{n-1}``,
    each but the last ending with a downsample; ``attn`` adds attention to the lowest level."""

    def __init__(self, kit: BlockKit, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 z_channels: int, attn: bool = False, mid_attn: bool = False):
        super().__init__()
        self.act = kit.act
        widths = [ch * m for m in ch_mult]
        self.conv_in = kit.conv3(in_channels, ch)
        self.down = nn.ModuleList()
        c = ch
        for i, c_out in enumerate(widths):
            lowest = i == len(widths) - 1
            level = Level(kit, c, c_out, num_res_blocks, with_attn=lowest and attn)
            if not lowest:
                level.downsample = Downsample(kit, c_out)
            self.down.append(level)
            c = c_out
        self.mid = Mid(kit, c, mid_attn)
        self.norm_out = kit.norm(c)
        self.conv_out = kit.conv3(c, z_channels)

    def forward(self, img_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_BChw)
        for i, level in enumerate(self.down):
            h = level(h)
            if i < len(self.down) - 1:
                h = level.downsample(h)
        return self.conv_out(self.act(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """``(B, z_channels, h, w) -> (B, out_channels, h*ds, w*ds)``, unclamped. Runs ``up.{n-1}`` (lowest) down to
    ``up.0``, each with ``num_res_blocks + 1`` ResnetBlocks; all but ``up.0`` end with an upsample."""

    def __init__(self, kit: BlockKit, *, z_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 out_channels: int, attn: bool = False, mid_attn: bool = False):
        super().__init__()
        self.act = kit.act
        widths = [ch * m for m in ch_mult]
        c = widths[-1]
        self.conv_in = kit.conv3(z_channels, c)
        self.mid = Mid(kit, c, mid_attn)
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            level = Level(kit, c, widths[i], num_res_blocks + 1, with_attn=i == len(widths) - 1 and attn)
            if i > 0:
                level.upsample = Upsample(kit, widths[i])
            self.up.insert(0, level)
            c = widths[i]
        self.norm_out = kit.norm(c)
        self.conv_out = kit.conv3(c, out_channels)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(self.act(self.norm_out(h)))


# -- decoding a band of rows at a time ---------------------------------------------------------------------
# A decoder without attention computes every output row from a few rows around it, except for its GroupNorms,
# whose statistics span the whole feature map. Decoding in bands therefore runs the decoder layer by layer: each
# norm's statistics are summed over the whole map first (fp32, band by band), then every convolution is computed a
# band of rows at a time from the band and one row above and below it (the 3x3 kernels' reach; the image's own
# borders keep their zero padding), so no seam exists. The result is the whole decode up to fp32 rounding (the
# statistics are summed in another order); the peak is three feature maps of the largest level (a block's input,
# its inner map and its output) plus one band's temporaries, instead of about eight whole maps.


def _group_norm(module: nn.Module) -> nn.GroupNorm:
    """The GroupNorm of a kit's norm (BSQ keeps it one level deeper, under ``.norm``)."""
    return module if isinstance(module, nn.GroupNorm) else module.norm


def _statistics(norm: nn.GroupNorm, x_BChw: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(mean, 1 / std)`` per image and group, ``(B, G, 1, 1, 1)``, of the whole map, summed a band at a time."""
    B, C, H, W = x_BChw.shape
    G = norm.num_groups
    total = torch.zeros(B, G, dtype=torch.float32, device=x_BChw.device)
    squares = torch.zeros_like(total)
    for r in range(0, H, rows):
        band = x_BChw[:, :, r : r + rows].float().reshape(B, G, -1)
        total += band.sum(-1)
        squares += band.square().sum(-1)
    count = C // G * H * W
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0)
    return mean.view(B, G, 1, 1, 1), (var + norm.eps).rsqrt().view(B, G, 1, 1, 1)


def _normalised(norm: nn.GroupNorm, stats, band_BCrw: torch.Tensor) -> torch.Tensor:
    """``norm(band)`` with the whole map's statistics, in the band's dtype."""
    B, C, r, W = band_BCrw.shape
    mean, rstd = stats
    x = (band_BCrw.float().view(B, norm.num_groups, -1, r, W) - mean).mul_(rstd).view(B, C, r, W)
    weight, bias = weight_and_bias(norm, band_BCrw.device, torch.float32)
    return x.mul_(weight.view(1, C, 1, 1)).add_(bias.view(1, C, 1, 1)).to(band_BCrw.dtype)


def _by_bands(
    rows: int, height: int, scale: int, compute: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """A map of ``height * scale`` rows filled a band of ``rows`` input rows at a time: ``compute(lo, hi)`` returns
    the output rows of the input rows ``lo .. hi - 1``, which hold the band and its neighbour row on each side
    (fewer at the borders)."""
    out = None
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        lo, hi = max(start - 1, 0), min(stop + 1, height)
        band = compute(lo, hi)[:, :, (start - lo) * scale : (stop - lo) * scale]
        if out is None:
            out = band.new_empty(*band.shape[:2], height * scale, band.shape[3])
        out[:, :, start * scale : stop * scale] = band
    return out


def _block_in_bands(block: ResnetBlock, x_BChw: torch.Tensor, rows: int) -> torch.Tensor:
    """``block(x)`` a band of ``rows`` rows at a time."""
    H = x_BChw.shape[2]
    norm1, norm2 = _group_norm(block.norm1), _group_norm(block.norm2)
    stats = _statistics(norm1, x_BChw, rows)
    h = _by_bands(rows, H, 1, lambda lo, hi: block.conv1(block.act(_normalised(norm1, stats, x_BChw[:, :, lo:hi]))))
    stats = _statistics(norm2, h, rows)
    return _by_bands(rows, H, 1, lambda lo, hi: block.nin_shortcut(x_BChw[:, :, lo:hi]) + block.conv2(
        block.act(_normalised(norm2, stats, h[:, :, lo:hi]))))


def _upsample_in_bands(upsample: Upsample, x_BChw: torch.Tensor, rows: int) -> torch.Tensor:
    """``upsample(x)`` a band of ``rows`` input rows at a time."""
    return _by_bands(rows, x_BChw.shape[2], 2, lambda lo, hi: upsample.conv(
        F.interpolate(x_BChw[:, :, lo:hi], scale_factor=2.0, mode="nearest")))


def decode_in_bands(decoder: Decoder, z_BChw: torch.Tensor, bands: int) -> torch.Tensor:
    """``decoder(z)`` computed in ``bands`` bands of rows at every layer (the comment above): the same images up to
    fp32 rounding, at about three feature maps' peak. For decoders without attention (BSQ's)."""
    if any(isinstance(m, AttnBlock) for m in decoder.modules()):
        raise ValueError("a decoder that attends cannot decode in bands")
    rows = lambda x: -(-x.shape[2] // bands)  # noqa: E731
    h = decoder.conv_in(z_BChw)
    for block in (decoder.mid.block_1, decoder.mid.block_2):
        h = _block_in_bands(block, h, rows(h))
    for i in reversed(range(len(decoder.up))):
        for block in decoder.up[i].block:
            h = _block_in_bands(block, h, rows(h))
        if i > 0:
            h = _upsample_in_bands(decoder.up[i].upsample, h, rows(h))
    norm = _group_norm(decoder.norm_out)
    stats = _statistics(norm, h, rows(h))
    return _by_bands(rows(h), h.shape[2], 1,
                     lambda lo, hi: decoder.conv_out(decoder.act(_normalised(norm, stats, h[:, :, lo:hi]))))
