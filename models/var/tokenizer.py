"""VAR's tokenizer: a multi-scale residual VQ-VAE (official file ``vae_ch160v4096z32.pth``).

Conventions (upstream ``models/vqvae.py`` and ``models/basic_vae.py``):
- Images are ``(B, 3, H, W)`` in ``[-1, 1]``; ``H`` and ``W`` are multiples of ``downsample`` (16 in VAR).
- ``encode_latent`` gives ``f_BChw`` ``(B, Cvae, H/16, W/16)``; token maps need a square latent whose side is
  the schedule's last scale (256 px -> 16x16 with ``SCHEDULE_256``, 512 px -> 32x32 with ``SCHEDULE_512``).
- Indices are a list with one ``(B, pn*pn)`` int64 tensor per scale, coarse to fine; ``f_hat`` is fp32.
- Module names reproduce the official state-dict keys (``encoder.*``, ``decoder.*``, ``quantize.*``,
  ``quant_conv.*``, ``post_quant_conv.*``); configs are inferred from those keys, never from file names.
- Convolutions, norms and the codebook come from the op set ``operations`` (:mod:`..core.ops`); encoding and
  decoding compute on the device of the images, latents or indices passed in, in :attr:`MultiScaleVQVAE.compute_dtype`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..core.autoencoder import BlockKit, Decoder, Encoder
from ..core.checkpoint import (
    CONFIG_METADATA_KEY,
    check_state_dict,
    check_tensors,
    config_from_metadata,
    key_shape,
    load_on_meta,
    read_state_dict,
    save_safetensors,
    shapes_on_meta,
)
from ..core.errors import NextScaleError
from ..core.family import expect_kind
from ..core.ops import ComputeDtype, TorchOps
from ..core.schedule import SCHEDULE_256, validate_schedule
from .quantizer import MultiScaleQuantizer

WHAT = "VAR tokenizer"
_EMA_KEY = "quantize.ema_vocab_hit_SV"


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture of a multi-scale VQ-VAE; the defaults are the official ``vae_ch160v4096z32``.

    Self-attention follows the official layout: after every ResnetBlock of the lowest-resolution level
    (``using_sa``) and in the mid block of encoder and decoder (``using_mid_sa``). ``share_quant_resi`` selects
    the Phi sharing (0: one per scale, or ``default_qresi_counts`` if set; 1: one for all; n: n shared);
    ``quant_resi`` is Phi's mixing ratio (0: Phi is the identity). ``patch_nums`` is the default schedule.
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    patch_nums: tuple[int, ...] = SCHEDULE_256
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    default_qresi_counts: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if not self.ch_mult or min(self.ch_mult) < 1 or self.ch < 1:
            raise NextScaleError(f"tokenizer config: ch={self.ch}, ch_mult={self.ch_mult} must be positive")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise NextScaleError(
                f"tokenizer config: every level width ch*ch_mult must be a multiple of 32 (GroupNorm), "
                f"got ch={self.ch}, ch_mult={self.ch_mult}"
            )
        if (
            min(self.vocab_size - 1, self.z_channels, self.num_res_blocks, self.in_channels) < 1
            or min(self.share_quant_resi, self.default_qresi_counts) < 0
        ):
            raise NextScaleError(f"tokenizer config has an out-of-range size: {self}")
        validate_schedule(self.patch_nums)

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        """Image side that matches ``patch_nums`` (latent side ``patch_nums[-1]``)."""
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["patch_nums"] = list(self.ch_mult), list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> TokenizerConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NextScaleError(f"tokenizer config has unknown field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# -- building blocks (models/core/autoencoder.py) --------------------------------------------------------


def block_kit(operations) -> BlockKit:
    """The op set's ``Conv2d`` and ``GroupNorm(32, eps 1e-6)`` with plain keys, and SiLU."""
    return BlockKit(
        conv=lambda c_in, c_out, k, stride, padding: operations.Conv2d(
            c_in, c_out, kernel_size=k, stride=stride, padding=padding
        ),
        norm=lambda channels: operations.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True),
        act=F.silu,
    )


KIT = block_kit(TorchOps)  # the default op set's: plain nn.Conv2d / GroupNorm(32) keys, SiLU


# -- the tokenizer -----------------------------------------------------------------------------------


def _schedule(patch_nums: Sequence[int] | None, default: tuple[int, ...]) -> tuple[int, ...]:
    pn = default if patch_nums is None else tuple(int(p) for p in patch_nums)
    validate_schedule(pn)
    return pn


class MultiScaleVQVAE(ComputeDtype, nn.Module):
    """Multi-scale residual VQ-VAE: image <-> per-scale token maps (upstream ``VQVAE``).

    Build it from a checkpoint with :meth:`from_file` / :meth:`from_state_dict` (eval mode, frozen, fp32).
    Methods that take ``patch_nums`` default to the config's schedule. ``operations``: the op set its layers come
    from (default: plain torch); ``compute_dtype``: the dtype it computes in (default: its weights' dtype).
    """

    tokenizer_kind = "var"  # of the tokens it makes and decodes (NextScaleTokens.tokenizer_kind)

    def __init__(
        self, config: TokenizerConfig | None = None, operations=None, compute_dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.config = cfg = config or TokenizerConfig()
        ops = operations or TorchOps
        kit = block_kit(ops)
        shape = {"ch": cfg.ch, "ch_mult": cfg.ch_mult, "num_res_blocks": cfg.num_res_blocks,
                 "attn": cfg.using_sa, "mid_attn": cfg.using_mid_sa}
        self.encoder = Encoder(kit, in_channels=cfg.in_channels, z_channels=cfg.z_channels, **shape)
        self.decoder = Decoder(kit, z_channels=cfg.z_channels, out_channels=cfg.in_channels, **shape)
        self.quantize = MultiScaleQuantizer(
            cfg.vocab_size,
            cfg.z_channels,
            cfg.patch_nums,
            cfg.quant_resi,
            cfg.share_quant_resi,
            cfg.default_qresi_counts,
            ops,
        )
        self.quant_conv = kit.conv3(cfg.z_channels, cfg.z_channels)
        self.post_quant_conv = kit.conv3(cfg.z_channels, cfg.z_channels)
        self.compute_dtype = compute_dtype

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    # -- checkpoints -------------------------------------------------------------------------------

    @staticmethod
    def expected_shapes(config: TokenizerConfig) -> dict[str, tuple[int, ...]]:
        """Every state-dict key of a model with ``config`` and its shape (built on the meta device)."""
        return shapes_on_meta(lambda: MultiScaleVQVAE(config))

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> TokenizerConfig:
        """The config implied by the keys and shapes of ``state_dict``. The Phi ratio is not stored in a
        checkpoint: 0.5 (VAR's) is assumed when Phi convs exist. The schedule is the 256-px default."""

        hint = " It looks like a VAR transformer: load it as the generator." if "class_emb.weight" in state_dict else ""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, f": it is not a VAR multi-scale VQ-VAE.{hint}")

        def indices(pattern: str) -> list[int]:
            return sorted({int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))})

        vocab, cvae = shape("quantize.embedding.weight", 2)
        ch, in_channels = shape("encoder.conv_in.weight", 4)[:2]
        z_channels = shape("encoder.conv_out.weight", 4)[0]
        levels = indices(r"encoder\.down\.(\d+)\..*")
        blocks = indices(r"encoder\.down\.0\.block\.(\d+)\..*")
        if z_channels != cvae or not levels or not blocks or levels != list(range(len(levels))):
            raise NextScaleError(
                f"{WHAT} file '{path}' has an inconsistent layout (codebook width {cvae}, encoder output {z_channels}, "
                f"encoder levels {levels}, blocks per level {blocks})"
            )
        ch_mult = []
        for i in levels:
            width = shape(f"encoder.down.{i}.block.0.conv1.weight", 4)[0]
            if width % ch:
                raise NextScaleError(
                    f"{WHAT} file '{path}': key 'encoder.down.{i}.block.0.conv1.weight' has {width} output channels, "
                    f"not a multiple of ch={ch}"
                )
            ch_mult.append(width // ch)
        phi_ls = indices(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.weight")
        phi_non = indices(r"quantize\.quant_resi\.(\d+)\.weight")
        phi_one = "quantize.quant_resi.qresi.weight" in state_dict
        share = len(phi_ls) if phi_ls else 0 if phi_non else 1 if phi_one else 4
        try:
            return TokenizerConfig(
                vocab_size=vocab,
                z_channels=z_channels,
                ch=ch,
                ch_mult=tuple(ch_mult),
                num_res_blocks=len(blocks),
                share_quant_resi=share,
                quant_resi=0.5 if (phi_ls or phi_non or phi_one) else 0.0,
                in_channels=in_channels,
                using_sa=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in state_dict,
                using_mid_sa="encoder.mid.attn_1.qkv.weight" in state_dict,
                default_qresi_counts=len(phi_non),
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        patch_nums: Sequence[int] | None = None,
        config: TokenizerConfig | None = None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> MultiScaleVQVAE:
        """A frozen fp32 model in eval mode holding ``state_dict`` (checked strictly against the ``config``,
        inferred when not given), built with ``operations`` to compute in ``compute_dtype``.
        ``quantize.ema_vocab_hit_SV`` is optional and, when its K differs from the schedule's, replaced by the
        module's own (as upstream). The module is built on the meta device and takes the tensors over, so loading
        never holds two copies."""
        check_tensors(state_dict, path, WHAT)
        cfg = config or cls.infer_config(state_dict, path)
        if patch_nums is not None:
            cfg = replace(cfg, patch_nums=_schedule(patch_nums, cfg.patch_nums))
        expected = cls.expected_shapes(cfg)
        sd = dict(state_dict)
        ema, ema_shape = sd.get(_EMA_KEY), expected[_EMA_KEY]
        if ema is None or (ema.dim() == 2 and ema.shape[1] == ema_shape[1] and tuple(ema.shape) != ema_shape):
            sd[_EMA_KEY] = torch.zeros(ema_shape, device=getattr(sd.get("quantize.embedding.weight"), "device", "cpu"))
        check_state_dict(sd, expected, path, WHAT, optional=[_EMA_KEY])
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), sd)

    @staticmethod
    def config_from_file(path: str) -> TokenizerConfig | None:
        """The config stored under the safetensors metadata key ``nextscale_config`` (written by :meth:`save`
        for non-official models), or None when there is none (official files: infer it from the keys)."""
        return config_from_metadata(path, TokenizerConfig.from_dict, WHAT)

    @classmethod
    def from_file(
        cls,
        path: str,
        patch_nums: Sequence[int] | None = None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> MultiScaleVQVAE:
        """Load a ``.safetensors`` or ``.pth`` tokenizer; a config in the file's metadata takes precedence over
        inference (:meth:`config_from_file`). ``operations`` and ``compute_dtype`` as for the constructor."""
        state_dict = read_state_dict(path, WHAT)
        expect_kind(state_dict, path, "var-tokenizer", WHAT)
        return cls.from_state_dict(
            state_dict, path, patch_nums, cls.config_from_file(path), operations=operations,
            compute_dtype=compute_dtype,
        )

    def save(self, path: str) -> None:
        """Save as safetensors with the config in the metadata (reloadable by :meth:`from_file`)."""
        save_safetensors(self.state_dict(), path, {CONFIG_METADATA_KEY: self.config.to_dict()})

    # -- image <-> latent <-> tokens ---------------------------------------------------------------

    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """``f_BChw (B, Cvae, H/ds, W/ds)`` of images in [-1, 1] (encoder then ``quant_conv``); any ``H, W``
        that are multiples of ``downsample``."""
        H, W = img_B3HW.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise NextScaleError(
                f"image size {W}x{H} px is not a multiple of the tokenizer's {self.downsample} px cells; "
                f"resize or crop it"
            )
        return self.quant_conv(self.encoder(img_B3HW.to(self.compute_dtype)))

    def img_to_indices(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per-scale indices ``[(B, pn*pn)]`` of square images of side ``patch_nums[-1] * downsample``."""
        pn = _schedule(patch_nums, self.patch_nums)
        H, W = img_B3HW.shape[-2:]
        if H != W or H != pn[-1] * self.downsample:
            side = pn[-1] * self.downsample
            raise NextScaleError(
                f"image size {W}x{H} px does not fit the schedule {pn}: it needs square {side}x{side} px images "
                f"({pn[-1]} tokens of {self.downsample} px); resize or crop it"
            )
        return self.quantize.f_to_indices(self.encode_latent(img_B3HW), pn)

    def indices_to_fhat(
        self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None, upto: int | None = None
    ) -> torch.Tensor:
        """fp32 ``f_hat (B, Cvae, side, side)`` from the first ``upto`` scales (default: all given)."""
        return self.quantize.indices_to_fhat(indices, _schedule(patch_nums, self.patch_nums), upto=upto)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) from ``f_hat``: ``post_quant_conv`` then the decoder, on ``f_hat``'s device.

        On CPU the decoder runs channels-last (oneDNN's fast layout; the convolutions follow their input): at
        256 px 1.1-1.3x faster in fp32 and 1.5-1.8x in bf16 (batch 1-8, bench/RESULTS.md), equal up to float
        rounding."""
        f_hat = f_hat.to(self.compute_dtype)
        if f_hat.device.type == "cpu":
            f_hat = f_hat.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1).contiguous()

    def indices_to_img(
        self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None, upto: int | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] from per-scale indices; ``upto=k`` decodes the partial image of the first k scales."""
        return self.fhat_to_img(self.indices_to_fhat(indices, patch_nums, upto))
