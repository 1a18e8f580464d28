"""Infinity's tokenizer: a flux-VQGAN-style autoencoder with multi-scale binary spherical quantisation (BSQ).

Official files: ``infinity_vae_d32reg.pth`` and ``infinity_vae_d{16,24,32,64}.pth``
(f16: ``ch_mult (1, 2, 4, 4, 4)``) and ``infinity_vae_d56_f8_14_patchify.pth`` (d = 14, f8: ``ch_mult (1, 2, 4, 4)``).

Conventions:
- Images are ``(B, 3, H, W)`` in ``[-1, 1]``; ``H`` and ``W`` are multiples of ``downsample`` (16, or 8 for f8).
- ``d = codebook_dim`` is both the latent width and the number of bits per token. ``encode_latent`` gives the fp32
  latent ``h_BdHW`` ``(B, d, H/ds, W/ds)``; there is no quant conv and no projection (upstream ``use_vae=False``).
- A schedule is a sequence of ``(h, w)`` token grids, coarse to fine; its last entry is the latent size ``(H, W)``.
- Bits are a list with one bool ``bits_Bhwd`` ``(B, h, w, d)`` per scale; bit ``j`` is True where latent channel ``j``
  is positive (upstream bit labels; ``quantizer.lfq.mask`` weighs bit ``j`` by ``2**(d-1-j)``).
- A code is a unit d-vector with entries ``+-1/sqrt(d)``. ``summed_BdHW`` is the fp32 sum over scales of every
  scale's code map brought to the full latent size; the decoder turns it into an image.
- Code maps move between grids with trilinear interpolation on the 5-D view ``(B, d, 1, h, w)``
  (``align_corners=False``), in both directions; only the encoder's residual goes down with ``area``.
- Module names reproduce upstream's native keys: every conv sits in a wrapper (``...conv_in.conv.weight``) and every
  GroupNorm in one (``...norm1.norm.weight``). The flat flux/LDM layout without the wrappers (``...conv_in.weight``)
  is accepted by an exact rename. Configs are inferred from keys and shapes, never from file names.
- Convolutions and norms come from the op set ``operations`` (:mod:`..core.ops`); encoding and decoding compute on
  the device of the images or codes passed in, in :attr:`BSQTokenizer.compute_dtype`. The bit-weight buffer is only
  checked on load, never read by a forward.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..core.autoencoder import BlockKit, Decoder, Encoder, decode_in_bands
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

WHAT = "Infinity BSQ tokenizer"
MASK_KEY = "quantizer.lfq.mask"
# Upstream's AutoEncoder registers its quantiser twice (``quantizer`` and ``quantize``), so a full upstream
# state_dict() holds the mask under both names. The second copy is checked like the first and dropped.
MASK_ALIAS_KEY = "quantize.lfq.mask"
MAX_CODEBOOK_DIM = 64  # upstream packs bit labels into int64 masks


def _groups(channels: int) -> int:
    """GroupNorm groups as upstream: 32, else 24, else unsupported (0)."""
    return 32 if channels % 32 == 0 else 24 if channels % 24 == 0 else 0


def bit_mask(codebook_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The int64 buffer ``quantizer.lfq.mask``: ``2**(d-1), ..., 2, 1`` (``2**63`` wraps to ``-2**63`` as upstream)."""
    return 2 ** torch.arange(codebook_dim - 1, -1, -1, device=device)


@dataclass(frozen=True)
class BSQConfig:
    """Architecture of an Infinity BSQ tokenizer; the defaults (with ``codebook_dim=32``) are ``infinity_vae_d32reg``.

    Fixed as in every released file: 3 image channels, GroupNorm (eps 1e-6), no attention blocks, 2-D convs, and a
    down/upsampling step between every two levels (upstream ``patch_size = 2**(len(ch_mult) - 1)``).
    """

    codebook_dim: int
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not 1 <= self.codebook_dim <= MAX_CODEBOOK_DIM:
            raise NextScaleError(
                f"BSQ tokenizer config: codebook_dim={self.codebook_dim} is out of range (1 to {MAX_CODEBOOK_DIM} bits)"
            )
        if not self.ch_mult or min(self.ch_mult) < 1 or self.base_ch < 1 or self.num_res_blocks < 1:
            raise NextScaleError(
                f"BSQ tokenizer config: base_ch={self.base_ch}, ch_mult={self.ch_mult}, "
                f"num_res_blocks={self.num_res_blocks} must be positive"
            )
        if any(not _groups(self.base_ch * m) for m in self.ch_mult):
            raise NextScaleError(
                f"BSQ tokenizer config: every level width base_ch*ch_mult must be a multiple of 32 or 24 (GroupNorm), "
                f"got base_ch={self.base_ch}, ch_mult={self.ch_mult}"
            )

    @property
    def downsample(self) -> int:
        """Image pixels per latent cell along each side."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> BSQConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NextScaleError(f"BSQ tokenizer config has unknown field(s): {', '.join(sorted(unknown))}")
        if "codebook_dim" not in d:
            raise NextScaleError("BSQ tokenizer config has no 'codebook_dim'")
        return cls(**d)


# -- building blocks (models/core/autoencoder.py, flux VQGAN layout, no attention) ------------------------
# The wrappers exist only for the key layout: upstream nests each Conv2d / GroupNorm one level deeper.


class Conv(nn.Module):
    """An op set's ``Conv2d`` kept under ``.conv`` (keys ``<name>.conv.weight``, ``<name>.conv.bias``)."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0, operations=TorchOps
    ):
        super().__init__()
        self.conv = operations.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(x_BChw)


class Norm(nn.Module):
    """An op set's affine ``GroupNorm`` (eps 1e-6) kept under ``.norm`` (keys ``<name>.norm.weight``, ``.bias``)."""

    def __init__(self, channels: int, operations=TorchOps):
        super().__init__()
        self.norm = operations.GroupNorm(num_groups=_groups(channels), num_channels=channels, eps=1e-6, affine=True)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.norm(x_BChw)


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` written out as upstream: ``F.silu`` differs in the last bit, and latents then drift by
    ~1e-6."""
    return x * torch.sigmoid(x)


def block_kit(operations) -> BlockKit:
    """Convs and norms of the op set one key level deeper, and upstream's activation."""
    return BlockKit(
        conv=lambda c_in, c_out, k, stride, padding: Conv(c_in, c_out, k, stride, padding, operations),
        norm=lambda channels: Norm(channels, operations),
        act=swish,
    )


class BitQuantizer(nn.Module):
    """Holds the bit-weight buffer ``mask`` (upstream ``BSQ``); the quantisation itself lives in ``BSQTokenizer``."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.register_buffer("mask", bit_mask(codebook_dim))


class MultiScaleQuantizer(nn.Module):
    """Key holder for ``quantizer.lfq.mask`` (upstream ``MultiScaleBSQ``; no projections, no layer norm, no Phi)."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.lfq = BitQuantizer(codebook_dim)


# -- key layouts ---------------------------------------------------------------------------------------


def flat_key(native_key: str) -> str:
    """The flat flux/LDM name of a native weight key: the wrapper level (``.conv`` / ``.norm`` before the last
    component) is dropped, e.g. ``encoder.down.0.downsample.conv.conv.weight -> encoder.down.0.downsample.conv.weight``.
    Keys outside a wrapper (the mask) are unchanged."""
    parts = native_key.split(".")
    if native_key in (MASK_KEY, MASK_ALIAS_KEY):
        return native_key
    if len(parts) < 3 or parts[-2] not in ("conv", "norm") or parts[-1] not in ("weight", "bias"):
        raise AssertionError(f"not a wrapped BSQ tokenizer key: {native_key}")  # every parameter sits in a wrapper
    return ".".join(parts[:-2] + parts[-1:])


def _lookup(state_dict: Mapping[str, torch.Tensor], native_key: str) -> tuple[str, torch.Tensor] | None:
    """``(key as found, tensor)`` for a native key in either layout, or None."""
    for key in (native_key, flat_key(native_key)):
        if key in state_dict:
            return key, state_dict[key]
    return None


def _to_native(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: str
) -> dict[str, torch.Tensor]:
    """Check ``state_dict`` strictly in the layout it uses (so that errors name the file's own keys) and return it
    in the native layout. A file must use one layout throughout; the mask keys are optional in both."""
    params = [k for k in expected if k != MASK_KEY]
    native = [k for k in params if k in state_dict]
    flat = [flat_key(k) for k in params if flat_key(k) in state_dict]
    if native and flat:
        raise NextScaleError(
            f"{WHAT} file '{path}' mixes two key layouts: '{native[0]}' is native (convs and norms wrapped, "
            f"'.conv.'/'.norm.' inside) but '{flat[0]}' is flat; re-save it in one layout"
        )
    rename = {flat_key(k): k for k in expected} if flat else {k: k for k in expected}
    in_file = {f: expected[k] for f, k in rename.items()}
    in_file[MASK_ALIAS_KEY] = expected[MASK_KEY]
    check_state_dict(state_dict, in_file, path, WHAT, optional=[MASK_KEY, MASK_ALIAS_KEY])
    return {rename[k]: v for k, v in state_dict.items() if k != MASK_ALIAS_KEY}


def _check_mask(state_dict: Mapping[str, torch.Tensor], codebook_dim: int, path: str) -> None:
    want = bit_mask(codebook_dim)
    for key in (MASK_KEY, MASK_ALIAS_KEY):
        mask = state_dict.get(key)
        if mask is not None and not mask.is_meta and not torch.equal(mask.detach().cpu().long(), want):
            raise NextScaleError(
                f"{WHAT} file '{path}': key '{key}' holds {mask.flatten()[:4].tolist()}..., expected the powers of two "
                f"{want[:4].tolist()}... (2**{codebook_dim - 1} down to 1); the file is damaged or not an Infinity "
                f"tokenizer: download it again"
            )


# -- the tokenizer -------------------------------------------------------------------------------------


def _trilinear(x_Bdhw: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Trilinear resize on the 5-D view ``(B, d, 1, h, w)`` as upstream (``z_interplote_up``)."""
    return F.interpolate(x_Bdhw.unsqueeze(2), size=(1, *size_hw), mode="trilinear").squeeze(2)


def _area(x_Bdhw: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Area resize on the 5-D view (upstream ``z_interplote_down``, used for the encoder's residual)."""
    return F.interpolate(x_Bdhw.unsqueeze(2), size=(1, *size_hw), mode="area").squeeze(2)


def _size(size_hw: Sequence[int], what: str) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size_hw)
    except (TypeError, ValueError):
        raise NextScaleError(f"{what} must be an (h, w) pair of token counts, got {size_hw!r}") from None
    if h < 1 or w < 1:
        raise NextScaleError(f"{what} must be positive, got {(h, w)}")
    return h, w


class BSQTokenizer(ComputeDtype, nn.Module):
    """Infinity's multi-scale BSQ tokenizer (upstream ``AutoEncoder`` with ``MultiScaleBSQ``, ``new_quant=True``),
    inference only: image <-> latent <-> per-scale bits.

    Build it from a checkpoint with :meth:`from_file` / :meth:`from_state_dict` (eval mode, frozen, fp32).
    ``operations``: the op set its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes
    in (default: its weights' dtype).
    """

    def __init__(self, config: BSQConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        kit = block_kit(operations or TorchOps)
        shape = {"ch": config.base_ch, "ch_mult": config.ch_mult, "num_res_blocks": config.num_res_blocks}
        self.encoder = Encoder(kit, in_channels=3, z_channels=config.codebook_dim, **shape)
        self.decoder = Decoder(kit, z_channels=config.codebook_dim, out_channels=3, **shape)
        self.quantizer = MultiScaleQuantizer(config.codebook_dim)
        self.compute_dtype = compute_dtype

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def downsample(self) -> int:
        return self.config.downsample

    # -- checkpoints -------------------------------------------------------------------------------

    @staticmethod
    def expected_shapes(config: BSQConfig) -> dict[str, tuple[int, ...]]:
        """Every native state-dict key of a model with ``config`` and its shape (built on the meta device)."""
        return shapes_on_meta(lambda: BSQTokenizer(config))

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> BSQConfig:
        """The config implied by the keys and shapes of ``state_dict`` (either layout):
        ``codebook_dim`` = output channels of ``encoder.conv_out``, ``base_ch`` = output channels of
        ``encoder.conv_in``, ``ch_mult[i]`` = output channels of ``encoder.down.{i}.block.0.conv1`` / ``base_ch``,
        ``num_res_blocks`` = number of ``encoder.down.0.block.{j}``. Attention blocks and a downsampling pattern
        other than "every level but the last" are refused."""

        hint = ""
        if "quantize.embedding.weight" in state_dict:
            hint = " It looks like a VAR tokenizer: load it with 'NextScale Load Tokenizer'."
        elif any(k.startswith("block_chunks.") for k in state_dict):
            hint = " It looks like an Infinity transformer, not its tokenizer."

        def shape(native_key: str, ndim: int) -> tuple[int, ...]:
            found = _lookup(state_dict, native_key)
            missing = f" (nor its flat form '{flat_key(native_key)}'): it is not an Infinity BSQ tokenizer.{hint}"
            return key_shape(state_dict, native_key if found is None else found[0], ndim, path, WHAT, missing)

        def indices(pattern: str) -> list[int]:
            return sorted({int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))})

        attn = [k for k in state_dict if re.match(r"(encoder|decoder)\.(mid\.attn_1|(down|up)\.\d+\.attn\.\d+)\.", k)]
        if attn:
            raise NextScaleError(
                f"{WHAT} file '{path}' has attention blocks (e.g. '{attn[0]}'); NextScale supports the released "
                f"tokenizers, which have none (upstream cnn_attention='no')"
            )
        codebook_dim = shape("encoder.conv_out.conv.weight", 4)[0]
        base_ch = shape("encoder.conv_in.conv.weight", 4)[0]
        levels = indices(r"encoder\.down\.(\d+)\..*")
        blocks = indices(r"encoder\.down\.0\.block\.(\d+)\..*")
        if not levels or levels != list(range(len(levels))) or not blocks or blocks != list(range(len(blocks))):
            raise NextScaleError(
                f"{WHAT} file '{path}' has an inconsistent encoder layout "
                f"(levels {levels}, blocks in level 0 {blocks}); "
                f"expected encoder.down.0 ... encoder.down.n-1, each with block.0 ... block.m-1"
            )
        ch_mult = []
        for i in levels:
            key = f"encoder.down.{i}.block.0.conv1.conv.weight"
            width = shape(key, 4)[0]
            if width % base_ch:
                raise NextScaleError(
                    f"{WHAT} file '{path}': key '{_lookup(state_dict, key)[0]}' has {width} output channels, "
                    f"not a multiple of base_ch={base_ch} (the output channels of encoder.conv_in)"
                )
            ch_mult.append(width // base_ch)
        n = len(levels)
        down = indices(r"encoder\.down\.(\d+)\.downsample\..*")
        up = indices(r"decoder\.up\.(\d+)\.upsample\..*")
        if down != list(range(n - 1)) or up != list(range(1, n)):
            raise NextScaleError(
                f"{WHAT} file '{path}' downsamples on encoder levels {down} and upsamples on decoder levels {up}; "
                f"with {n} levels NextScale expects {list(range(n - 1))} and {list(range(1, n))} "
                f"(upstream patch_size = 2**{n - 1})"
            )
        try:
            return BSQConfig(
                codebook_dim=codebook_dim, base_ch=base_ch, ch_mult=tuple(ch_mult), num_res_blocks=len(blocks)
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        config: BSQConfig | None = None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> BSQTokenizer:
        """A frozen fp32 model in eval mode holding ``state_dict`` (native or flat layout, checked strictly against
        ``config``, inferred when not given), built with ``operations`` to compute in ``compute_dtype``. The mask
        buffer is optional, value-checked when present and always rebuilt. The module is built on the meta device
        and takes the tensors over, so loading never holds two copies."""
        mask_keys = [k for k in (MASK_KEY, MASK_ALIAS_KEY) if k in state_dict]
        check_tensors(state_dict, path, WHAT, integer_keys=mask_keys)
        cfg = config or cls.infer_config(state_dict, path)
        sd = _to_native(state_dict, cls.expected_shapes(cfg), path)
        _check_mask(state_dict, cfg.codebook_dim, path)
        sd[MASK_KEY] = bit_mask(cfg.codebook_dim, device=sd["encoder.conv_in.conv.weight"].device)
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), sd)

    @staticmethod
    def config_from_file(path: str) -> BSQConfig | None:
        """The config stored under the safetensors metadata key ``nextscale_config`` (written by :meth:`save`), or
        None when there is none (official files: infer it from the keys)."""
        return config_from_metadata(path, BSQConfig.from_dict, WHAT)

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> BSQTokenizer:
        """Load a ``.safetensors`` or ``.pth`` tokenizer (weights nested under ``['vae']`` or ``['ema']`` are
        unwrapped); a config in the file's metadata takes precedence over inference. ``operations`` and
        ``compute_dtype`` as for the constructor."""
        state_dict = read_state_dict(path, WHAT)
        expect_kind(state_dict, path, "infinity-tokenizer", WHAT)
        return cls.from_state_dict(
            state_dict, path, cls.config_from_file(path), operations=operations, compute_dtype=compute_dtype
        )

    def save(self, path: str) -> None:
        """Save as safetensors in the native layout with the config in the metadata (reloadable by
        :meth:`from_file`)."""
        save_safetensors(self.state_dict(), path, {CONFIG_METADATA_KEY: self.config.to_dict()})

    # -- image <-> latent ----------------------------------------------------------------------------

    def latent_size(self, H: int, W: int) -> tuple[int, int]:
        """The latent ``(h, w)`` of an ``H x W`` image (checked to be a multiple of ``downsample``)."""
        if H % self.downsample or W % self.downsample or H < 1 or W < 1:
            raise NextScaleError(
                f"image size {W}x{H} px is not a multiple of the BSQ tokenizer's {self.downsample} px cells; "
                f"resize or crop it"
            )
        return H // self.downsample, W // self.downsample

    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """fp32 ``h_BdHW (B, d, H/ds, W/ds)`` of images in [-1, 1]."""
        if img_B3HW.dim() != 4 or img_B3HW.shape[1] != 3:
            raise NextScaleError(f"the BSQ tokenizer encodes (B, 3, H, W) images, got shape {list(img_B3HW.shape)}")
        self.latent_size(*img_B3HW.shape[-2:])
        return self.encoder(img_B3HW.to(self.compute_dtype)).float()

    def decode(self, summed_BdHW: torch.Tensor, bands: int = 1) -> torch.Tensor:
        """Images ``(B, 3, H*ds, W*ds)`` in [-1, 1] (clamped) from summed codes; ``bands > 1``: computed that many
        bands of rows at a time (``autoencoder.decode_in_bands``: the same images up to fp32 rounding, at about
        three feature maps' peak instead of eight)."""
        self._check_codes(summed_BdHW, "summed codes")
        z = summed_BdHW.to(self.compute_dtype)
        return (self.decoder(z) if bands == 1 else decode_in_bands(self.decoder, z, bands)).clamp(-1, 1)

    # -- latent <-> bits -----------------------------------------------------------------------------

    def _check_codes(self, x_BdHW: torch.Tensor, what: str) -> None:
        if x_BdHW.dim() != 4 or x_BdHW.shape[1] != self.codebook_dim:
            raise NextScaleError(
                f"{what} must have shape (B, {self.codebook_dim}, h, w) for this d={self.codebook_dim} tokenizer, "
                f"got {list(x_BdHW.shape)}"
            )

    def _schedule(self, scales: Sequence[Sequence[int]], latent_hw: tuple[int, int], px: int) -> list[tuple[int, int]]:
        sched = [_size(s, f"scale {i} of the schedule") for i, s in enumerate(scales)]
        if not sched:
            raise NextScaleError("the scale schedule is empty")
        h, w = latent_hw
        if sched[-1] != (h, w):
            hs, ws = sched[-1]
            raise NextScaleError(
                f"the image gives a {h}x{w} (h x w) latent ({w * px}x{h * px} px at {px} px per cell), but the "
                f"schedule ends at {hs}x{ws}: it expects {ws * px}x{hs * px} px images; resize or crop the image, "
                f"or choose a schedule for its size"
            )
        big = [s for s in sched if s[0] > h or s[1] > w]
        if big:
            raise NextScaleError(f"the schedule has scale(s) {big} larger than its last scale {sched[-1]}")
        return sched

    def quantize_latent(
        self, h_BdHW: torch.Tensor, scales: Sequence[Sequence[int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-scale residual BSQ of a latent: ``(bits per scale, summed_BdHW)``. At each scale the residual goes
        down to ``(h, w)`` (area), each d-vector's sign gives its bits and its code ``+-1/sqrt(d)``, and the code map,
        brought back to full size (trilinear), is added to the sum and taken from the residual."""
        self._check_codes(h_BdHW, "the latent")
        H, W = h_BdHW.shape[-2:]
        sched = self._schedule(scales, (H, W), self.downsample)
        s = 1.0 / math.sqrt(self.codebook_dim)
        residual = h_BdHW.float()
        summed = torch.zeros_like(residual)
        bits = []
        for hw in sched:
            x = residual if hw == (H, W) else _area(residual, hw)
            x = F.normalize(x, dim=1)
            positive = x > 0
            code = torch.where(positive, s, -s).to(residual.dtype)
            bits.append(positive.permute(0, 2, 3, 1).contiguous())
            up = self.upsample_codes(code, (H, W))
            residual = residual - up
            summed = summed + up
        return bits, summed

    def encode_bits(self, img_B3HW: torch.Tensor, scales: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-scale bool ``bits_Bhwd (B, h, w, d)`` of images in [-1, 1]; ``scales`` is a sequence of ``(h, w)``
        grids whose last equals the latent size ``(H/ds, W/ds)``."""
        self._schedule(scales, self.latent_size(*img_B3HW.shape[-2:]), self.downsample)  # before running the encoder
        return self.quantize_latent(self.encode_latent(img_B3HW), scales)[0]

    def bits_to_codes(self, bits_Bhwd: torch.Tensor) -> torch.Tensor:
        """fp32 ``codes_Bdhw (B, d, h, w)`` of bit labels (bool, or 0/1 integers or floats): ``bits*2s - s`` with
        ``s = 1/sqrt(d)``, L2-normalised over d. The result is a permuted view (d innermost in memory), as upstream's:
        the trilinear resize then rounds exactly as upstream's, so summed codes match it bit for bit."""
        if bits_Bhwd.dim() != 4 or bits_Bhwd.shape[-1] != self.codebook_dim:
            raise NextScaleError(
                f"bits must have shape (B, h, w, {self.codebook_dim}) for this d={self.codebook_dim} tokenizer, "
                f"got {list(bits_Bhwd.shape)}"
            )
        s = 1.0 / math.sqrt(self.codebook_dim)
        codes_Bhwd = bits_Bhwd.to(torch.float32) * s * 2 - s
        return F.normalize(codes_Bhwd, dim=-1).permute(0, 3, 1, 2)

    @staticmethod
    def upsample_codes(codes_Bdhw: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
        """A scale's code map brought up to ``size_hw`` (trilinear on the 5-D view; unchanged when already there)."""
        size = _size(size_hw, "the target size")
        return codes_Bdhw if tuple(codes_Bdhw.shape[-2:]) == size else _trilinear(codes_Bdhw, size)

    @staticmethod
    def downsample_codes(summed_BdHW: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
        """Summed codes brought down to the next scale's grid, the transformer's next input: trilinear on the 5-D view
        as upstream's inference loop (not area, which only the encoder's residual uses)."""
        return _trilinear(summed_BdHW, _size(size_hw, "the target size"))

    def bits_to_summed_codes(
        self, bits_list: Sequence[torch.Tensor], size_hw: Sequence[int] | None = None
    ) -> torch.Tensor:
        """fp32 ``summed_BdHW``: the codes of every scale brought to ``size_hw`` (default: the last scale's grid) and
        added in order; with the first k scales and the full size it gives the partial image of k scales."""
        *_, summed = self.running_summed_codes(bits_list, size_hw)
        return summed

    def running_summed_codes(
        self, bits_list: Sequence[torch.Tensor], size_hw: Sequence[int] | None = None
    ) -> Iterator[torch.Tensor]:
        """The summed codes after each scale in turn (:meth:`bits_to_summed_codes` of the first 1, 2, ... scales),
        each a new tensor."""
        if not bits_list:
            raise NextScaleError("no scales to sum: the bit list is empty")
        size = _size(size_hw if size_hw is not None else bits_list[-1].shape[1:3], "the target size")
        summed = None
        for bits in bits_list:
            up = self.upsample_codes(self.bits_to_codes(bits), size)
            summed = up if summed is None else summed + up
            yield summed
