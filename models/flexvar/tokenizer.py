"""FlexVAE, FlexVAR's tokenizer (upstream ``FlexVAE.pth``): LlamaGen's single-scale VQ-16 VQGAN with an
l2-normalised codebook, used at every scale.

Facts (upstream ``models/vq_llama.py``, ``build_vae_var``):
- Encoder and decoder are the taming VQGAN of :mod:`..core.autoencoder` (GroupNorm(32, eps 1e-6), ``x *
  sigmoid(x)``, attention at the lowest level and in the middle): ``ch = 128``, ``ch_mult = (1, 1, 2, 2, 4)``, two
  ResnetBlocks per level, 16 px cells, ``z_channels = 256``. ``quant_conv`` / ``post_quant_conv`` are 1x1 convs
  between the 256 latent channels and the 32 codebook channels; the codebook has 8912 codes.
- Every code is l2-normalised before use: a token's code vector is ``normalize(embedding.weight[idx])``, and an
  image is quantised at a scale by area-downsampling the encoder's output to the scale's side, ``quant_conv``,
  normalising, and taking the nearest normalised code.
- Unlike VAR's residual VQ-VAE, each scale's token map is a whole image: scale ``si`` decodes on its own
  (``post_quant_conv`` then the decoder), and the last scale is the picture.

Keys: the file uses LlamaGen's names (``encoder.conv_blocks.{i}.res.{j}``, ``.attn.{j}.{q,k,v,proj_out,norm}``,
``encoder.mid.{0,1,2}``, ``decoder.conv_blocks.{k}`` lowest level first, ``quantize.embedding.weight``,
``quantize.codebook_used``). The module is built from the shared autoencoder kit, so loading renames them, one to
one, to the kit's (``down.{i}.block.{j}``, ``mid.block_1/attn_1/block_2``, ``up.{n-1-k}``) and joins each
attention's ``q``, ``k``, ``v`` 1x1 convs into the kit's ``qkv`` conv. The check is strict and names the file's
keys. ``quantize.codebook_used`` (training's code-usage counter) is optional and dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.autoencoder import Decoder, Encoder
from ..core.checkpoint import SavedConfig, check_state_dict, check_tensors, key_shape, load_on_meta, shapes_on_meta
from ..core.errors import NextScaleError
from ..core.ops import ComputeDtype, TorchOps, cast
from ..core.schedule import validate_schedule
from ..var.tokenizer import block_kit

WHAT = "FlexVAE tokenizer"
USAGE_KEY = "quantize.codebook_used"


@dataclass(frozen=True)
class FlexVAEConfig(SavedConfig):
    """Architecture of a FlexVAE (defaults: the released ``FlexVAE.pth``)."""

    name: ClassVar[str] = "FlexVAE"

    vocab_size: int = 8912
    cvae: int = 32
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    attn: bool = True
    mid_attn: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if min(self.vocab_size, self.cvae, self.z_channels, self.ch, self.num_res_blocks, *self.ch_mult) < 1:
            raise NextScaleError(f"FlexVAE config has a non-positive size: {self}")

    @property
    def downsample(self) -> int:
        """Pixels per token side."""
        return 2 ** (len(self.ch_mult) - 1)


def official_names(kit_key: str, levels: int) -> list[str]:
    """The file's key(s) for one of the module's keys: one name, or the ``q``, ``k``, ``v`` keys a ``qkv`` joins."""
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", kit_key)
    key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.conv_blocks.\1.", key)
    key = re.sub(
        r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.conv_blocks.{levels - 1 - int(m.group(1))}.res.", key
    )
    key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.conv_blocks.{levels - 1 - int(m.group(1))}.", key)
    for kit_name, index in (("block_1", 0), ("attn_1", 1), ("block_2", 2)):
        key = key.replace(f".mid.{kit_name}.", f".mid.{index}.")
    if ".qkv." in key:
        return [key.replace(".qkv.", f".{part}.") for part in ("q", "k", "v")]
    return [key]


class FlexQuantizer(nn.Module):
    """FlexVAE's codebook, ``embedding (V, Cvae)`` (key ``quantize.embedding.weight``); codes are used normalised."""

    def __init__(self, vocab_size: int, cvae: int, operations=TorchOps):
        super().__init__()
        self.embedding = operations.Embedding(vocab_size, cvae)

    @property
    def vocab_size(self) -> int:
        return self.embedding.weight.shape[0]


class FlexVAE(ComputeDtype, nn.Module):
    """FlexVAE with the kit's module names; build it from a file's state dict with :meth:`from_state_dict`.
    ``operations`` and ``compute_dtype`` as for the other tokenizers (:mod:`..core.ops`)."""

    tokenizer_kind = "flexvar"  # of the tokens it makes and decodes (NextScaleTokens.tokenizer_kind)

    def __init__(self, config: FlexVAEConfig | None = None, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config or FlexVAEConfig()
        ops = operations or TorchOps
        kit = block_kit(ops)
        shape = {"ch": cfg.ch, "ch_mult": cfg.ch_mult, "num_res_blocks": cfg.num_res_blocks, "attn": cfg.attn,
                 "mid_attn": cfg.mid_attn}
        self.encoder = Encoder(kit, in_channels=cfg.in_channels, z_channels=cfg.z_channels, **shape)
        self.decoder = Decoder(kit, z_channels=cfg.z_channels, out_channels=cfg.in_channels, **shape)
        self.quantize = FlexQuantizer(cfg.vocab_size, cfg.cvae, ops)
        self.quant_conv = kit.conv1(cfg.z_channels, cfg.cvae)
        self.post_quant_conv = kit.conv1(cfg.cvae, cfg.z_channels)
        self.compute_dtype = compute_dtype

    @property
    def downsample(self) -> int:
        return self.config.downsample

    # -- checkpoints ---------------------------------------------------------------------------------

    @staticmethod
    def official_shapes(config: FlexVAEConfig) -> dict[str, tuple[int, ...]]:
        """Every key of a file with ``config`` (the file's names) and its shape."""
        out = {}
        for key, shape in shapes_on_meta(lambda: FlexVAE(config)).items():
            names = official_names(key, len(config.ch_mult))
            part = (shape[0] // len(names), *shape[1:])
            out.update((name, part) for name in names)
        return out

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> FlexVAEConfig:
        """The config implied by the file's keys and shapes."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, ": it is not a FlexVAE (LlamaGen VQ) tokenizer.")

        def indices(pattern: str) -> list[int]:
            return sorted({int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))})

        vocab, cvae = shape("quantize.embedding.weight", 2)
        ch, in_channels = shape("encoder.conv_in.weight", 4)[:2]
        levels = indices(r"encoder\.conv_blocks\.(\d+)\..*")
        blocks = indices(r"encoder\.conv_blocks\.0\.res\.(\d+)\..*")
        if not levels or not blocks or levels != list(range(len(levels))):
            raise NextScaleError(
                f"{WHAT} file '{path}' has encoder levels {levels} and blocks per level {blocks}; expected "
                f"encoder.conv_blocks.0 ... with res.0 ..."
            )
        widths = [shape(f"encoder.conv_blocks.{i}.res.0.conv1.weight", 4)[0] for i in levels]
        if any(w % ch for w in widths):
            raise NextScaleError(f"{WHAT} file '{path}': level widths {widths} are not multiples of ch={ch}")
        try:
            return FlexVAEConfig(
                vocab_size=vocab, cvae=cvae, z_channels=shape("encoder.conv_out.weight", 4)[0], ch=ch,
                ch_mult=tuple(w // ch for w in widths), num_res_blocks=len(blocks), in_channels=in_channels,
                attn=f"encoder.conv_blocks.{levels[-1]}.attn.0.q.weight" in state_dict,
                mid_attn="encoder.mid.1.q.weight" in state_dict,
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>", config: FlexVAEConfig | None = None,
        *, operations=None, compute_dtype: torch.dtype | None = None,
    ) -> FlexVAE:
        """A frozen model in eval mode holding the file's ``state_dict``, checked key for key against ``config``
        (inferred when not given), renamed to the kit's keys (module docstring). Built on the meta device."""
        check_tensors(state_dict, path, WHAT)
        cfg = config or cls.infer_config(state_dict, path)
        official = dict(state_dict)
        usage = official.pop(USAGE_KEY, None)
        if usage is not None and usage.dim() != 1:
            raise NextScaleError(f"{WHAT} file '{path}': key '{USAGE_KEY}' has shape {tuple(usage.shape)}, not 1-D")
        check_state_dict(official, cls.official_shapes(cfg), path, WHAT)
        levels = len(cfg.ch_mult)
        kit = {
            key: torch.cat([official[name] for name in names]) if len(names) > 1 else official[names[0]]
            for key in shapes_on_meta(lambda: FlexVAE(cfg))
            for names in [official_names(key, levels)]
        }
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), kit)

    # -- image <-> tokens ----------------------------------------------------------------------------

    def codebook(self, device: torch.device) -> torch.Tensor:
        """The l2-normalised codebook ``(V, Cvae)`` in fp32 on ``device``."""
        return F.normalize(cast(self.quantize.embedding.weight, device, torch.float32), dim=-1)

    def code_map(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """fp32 ``(B, Cvae, h, w)``: the normalised codes of a token map, on the indices' device."""
        return self.codebook(idx_Bhw.device)[idx_Bhw].permute(0, 3, 1, 2)

    def img_to_indices(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
        """``(B, pn, pn)`` indices per scale of square images of side ``patch_nums[-1] * downsample``: the encoder's
        output area-downsampled to each side, ``quant_conv``, and the nearest normalised code."""
        validate_schedule(patch_nums)
        H, W = img_B3HW.shape[-2:]
        side = patch_nums[-1] * self.downsample
        if H != W or H != side:
            raise NextScaleError(
                f"image size {W}x{H} px does not fit the schedule {tuple(patch_nums)}: it needs square {side}x{side} "
                f"px images ({patch_nums[-1]} tokens of {self.downsample} px); resize or crop it"
            )
        h_BChw = self.encoder(img_B3HW.to(self.compute_dtype))
        codebook_VC = self.codebook(h_BChw.device)
        out = []
        for pn in patch_nums:
            z_BChw = self.quant_conv(F.interpolate(h_BChw, size=(pn, pn), mode="area")).float()
            z_BlC = F.normalize(z_BChw.flatten(2).transpose(1, 2), dim=-1)
            out.append((z_BlC @ codebook_VC.T).argmax(dim=-1).view(-1, pn, pn))
        return out

    def codes_to_img(self, codes_BChw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (clamped) of code maps ``(B, Cvae, h, w)``: ``post_quant_conv`` then the decoder."""
        z_BChw = codes_BChw.to(self.compute_dtype)
        return self.decoder(self.post_quant_conv(z_BChw)).clamp(-1, 1).contiguous()

    def indices_to_img(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of one scale's token maps ``(B, h, w)``."""
        return self.codes_to_img(self.code_map(idx_Bhw))

    def next_input(self, idx_Bhw: torch.Tensor, side: int) -> torch.Tensor:
        """fp32 ``(B, side**2, Cvae)``: the next scale's input, the token map's codes bicubic-upsampled to
        ``side`` (upstream's teacher and sampler input)."""
        up_BChw = F.interpolate(self.code_map(idx_Bhw), size=(side, side), mode="bicubic")
        return up_BChw.flatten(2).transpose(1, 2)

    def teacher_input(self, indices: Sequence[torch.Tensor], patch_nums: Sequence[int]) -> torch.Tensor:
        """fp32 ``(B, L - 1, Cvae)``: the inputs of scales 1.. from the token maps of scales 0..K-2."""
        return torch.cat([self.next_input(idx, pn) for idx, pn in zip(indices, patch_nums[1:])], dim=1)
