"""The FlexVAR transformer (upstream ``FlexVAR`` in ``models/flexvar.py``): VAR's blocks, but every scale predicts
the tokens of the whole image at its side rather than a residual, so the schedule is free at inference.

Differences from VAR (:mod:`..var.model`), from upstream's code:
- No ``lvl_embed``: nothing tells a token which step it belongs to. Positions come from one 2-D map ``pos_1LC``
  ``(1, C, 32, 32)`` (initialised with sines of the row and cosines of the column), area-resized to each scale's
  side, so any side and any number of steps have positions.
- The input of scale ``si >= 1`` is ``word_embed`` of the previous scale's token map as codes, bicubic-upsampled to
  side ``pn_si`` (:meth:`..tokenizer.FlexVAE.next_input`), not VAR's accumulated residual.
- Token 0 is ``class_emb(label) + pos_start + position``; the attention is block-causal over scales; ``q`` and
  ``k`` are l2-normalised (``scale_mul_1H11``), as in VAR's released models.

Keys are the official ones. ``attn_bias_for_masking`` (upstream stores whatever mask its last training step used)
and ``blocks.i.attn.zero_k_bias`` are optional in a file, of any shape for the former, and rebuilt or dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import IntervalMask, block_causal_mask
from ..core.blocks import AdaLNBeforeHead, AdaLNSelfAttn
from ..core.checkpoint import (
    SavedConfig,
    SavedModel,
    block_depth,
    key_shape,
)
from ..core.errors import NextScaleError
from ..core.ops import ComputeDtype, TorchOps, cast
from ..core.schedule import token_count, validate_schedule
from ..var.model import VAR, Conditioning, VARConfig

WHAT = "FlexVAR generator"
MASK_KEY = "attn_bias_for_masking"


@dataclass(frozen=True)
class FlexVARConfig(SavedConfig):
    """Architecture of a FlexVAR transformer; ``pos_side`` is the side of the 2-D position map."""

    name: ClassVar[str] = "FlexVAR"

    depth: int
    embed_dim: int
    num_heads: int
    num_classes: int = 1000
    vocab_size: int = 8912
    cvae: int = 32
    pos_side: int = 32
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False

    def __post_init__(self):
        sizes = (self.depth, self.embed_dim, self.num_heads, self.num_classes, self.vocab_size, self.cvae,
                 self.pos_side)
        if min(sizes) < 1 or self.mlp_ratio <= 0:
            raise NextScaleError(f"FlexVAR config has a non-positive size: {self}")
        if self.embed_dim % self.num_heads:
            raise NextScaleError(f"FlexVAR config: width {self.embed_dim} is not divisible by {self.num_heads} heads")

    @classmethod
    def official(cls, depth: int) -> FlexVARConfig:
        """Upstream ``build_vae_var(depth=d)`` (d16, d20, d24 released): ``d`` heads of 64 channels."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth)

    # VARConfig's derived sizes, from the same fields.
    hidden_dim = VARConfig.hidden_dim
    head_dim = VARConfig.head_dim


def sincos_positions(side: int, width: int) -> torch.Tensor:
    """Upstream's initial ``pos_1LC`` ``(1, width, side, side)``: even channels ``sin(row * f)``, odd channels
    ``cos(column * f)``, frequencies ``f = 10000 ** (-2i / width)``."""
    freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * -(math.log(10000.0) / width))
    coords = torch.arange(side, dtype=torch.float32)
    pos = torch.zeros(side, side, width)
    pos[..., 0::2] = torch.sin(coords[:, None, None] * freq)
    pos[..., 1::2] = torch.cos(coords[None, :, None] * freq)
    return pos.permute(2, 0, 1)[None]


class FlexVAR(SavedModel, ComputeDtype, nn.Module):
    """FlexVAR transformer with the official key layout; build it with :meth:`from_state_dict`. ``operations``:
    the op set of its layers; ``compute_dtype``: what it computes in (logits always fp32)."""

    config_type: ClassVar[type[FlexVARConfig]] = FlexVARConfig
    what: ClassVar[str] = WHAT

    def __init__(self, config: FlexVARConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        C = cfg.embed_dim
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(sincos_positions(cfg.pos_side, C))
        self.word_embed = ops.Linear(cfg.cvae, C)
        self.class_emb = ops.Embedding(cfg.num_classes + 1, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, cfg.shared_aln, ops) for _ in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops)
        self.head = ops.Linear(C, cfg.vocab_size)
        self.compute_dtype = compute_dtype

    # VAR's properties, read from the config.
    depth = VAR.depth
    num_classes = VAR.num_classes

    # -- forward paths ------------------------------------------------------------------------------

    def positions(self, patch_nums: Sequence[int], device: torch.device) -> torch.Tensor:
        """``(1, L, C)``: ``pos_1LC`` area-resized to each side of ``patch_nums``, scale after scale."""
        pos_1Chw = cast(self.pos_1LC, device, self.compute_dtype)
        return torch.cat(
            [F.interpolate(pos_1Chw, size=(pn, pn), mode="area").flatten(2).transpose(1, 2) for pn in patch_nums],
            dim=1,
        )

    def condition(self, label_B: torch.Tensor, patch_nums: Sequence[int]) -> Conditioning:
        """The per-run conditioning of rows with classes ``label_B`` over the schedule ``patch_nums``."""
        return self.class_conditioning(label_B, self.positions(patch_nums, label_B.device))

    # VAR's conditioning from the class and the positions, and its input of scale 0 (class embedding + ``pos_start``
    # + the 1x1 scale's position): they read the same parameters.
    class_conditioning = VAR.class_conditioning
    start_token = VAR.start_token
    first_token_map = VAR.first_token_map

    def scale_input(self, begin: int, next_BlCv: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``x_BlC`` of the scale whose tokens start at ``begin`` from its input codes ``(B, l, Cvae)``."""
        x_BlC = self.word_embed(next_BlCv.to(self.compute_dtype))
        return x_BlC + cond.lvl_pos_1LC[:, begin : begin + next_BlCv.shape[1]]

    # VAR's head and KV-cached scale step, unchanged: they read only the blocks, the head and the conditioning.
    logits = VAR.logits
    forward_scale = VAR.forward_scale

    def forward_teacher(self, label_B: torch.Tensor, x_BLCv: torch.Tensor, patch_nums: Sequence[int]) -> torch.Tensor:
        """fp32 ``logits_BLV`` of the whole schedule ``patch_nums`` at once with the block-causal mask; ``x_BLCv``
        ``(B, L - 1, Cvae)`` is :meth:`..tokenizer.FlexVAE.teacher_input`. No label dropout (unlike upstream's
        training forward)."""
        validate_schedule(patch_nums)
        L = token_count(patch_nums)
        if x_BLCv.dim() != 3 or tuple(x_BLCv.shape[1:]) != (L - 1, self.config.cvae):
            raise NextScaleError(
                f"teacher forcing on {tuple(patch_nums)} needs inputs (B, {L - 1}, {self.config.cvae}), got "
                f"{tuple(x_BLCv.shape)}"
            )
        cond = self.condition(label_B, patch_nums)
        x_BLC = torch.cat((self.first_token_map(cond), self.scale_input(1, x_BLCv, cond)), dim=1)
        mask_LL = IntervalMask.block_causal(block_causal_mask(patch_nums, device=x_BLC.device), patch_nums)
        for block, ada_B16C in zip(self.blocks, cond.ada_B16C):
            x_BLC = block(x_BLC, ada_B16C, attn_mask=mask_LL)
        return self.logits(x_BLC, cond)

    forward = forward_teacher

    # -- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def rebuilt_buffers(config: FlexVARConfig, device=None) -> dict[str, torch.Tensor]:
        """The deterministic ``blocks.i.attn.zero_k_bias`` buffers, optional in a file."""
        return {f"blocks.{i}.attn.zero_k_bias": torch.zeros(config.embed_dim, device=device)
                for i in range(config.depth)}

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> FlexVARConfig:
        """The config implied by the keys and shapes of ``state_dict``."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, ": it is not a FlexVAR transformer.")

        rows, C = shape("class_emb.weight", 2)
        depth = block_depth(state_dict, path, WHAT)
        pos = shape("pos_1LC", 4)
        if pos[2] != pos[3]:
            raise NextScaleError(f"{WHAT} file '{path}': key 'pos_1LC' has shape {pos}, expected (1, C, side, side)")
        try:
            return FlexVARConfig(
                depth=depth,
                embed_dim=C,
                num_heads=shape("blocks.0.attn.scale_mul_1H11", 4)[1],
                num_classes=rows - 1,
                vocab_size=shape("head.weight", 2)[0],
                cvae=shape("word_embed.weight", 2)[1],
                pos_side=pos[2],
                mlp_ratio=shape("blocks.0.ffn.fc1.weight", 2)[0] / C,
                shared_aln="shared_ada_lin.1.weight" in state_dict,
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def loadable(cls, state_dict: Mapping[str, torch.Tensor], config: FlexVARConfig, path: str):
        """``state_dict`` without ``attn_bias_for_masking`` (upstream's last training mask, of any shape)."""
        return {k: v for k, v in state_dict.items() if k != MASK_KEY}

    def extra_repr(self) -> str:
        c = self.config
        return f"depth={c.depth}, width={c.embed_dim}, heads={c.num_heads}, pos_side={c.pos_side}"
