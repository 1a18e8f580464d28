"""The Distilled Decoding transformer (upstream ``DD_Model`` in ``VAR/models/dd.py``): a VAR transformer distilled
to map noise to all of VAR's tokens in one pass, optionally refined by a second pass.

Conventions (upstream; key layout in docs/dd.md):
- The sequence is the class token followed by one token per position of VAR's schedule ``patch_nums``, ``1 + L``
  tokens. Upstream writes it as the schedule ``(1, *patch_nums)``: the class token is a scale of its own, so
  ``lvl_embed`` has ``K + 1`` rows and ``pos_1LC`` ``L + 1`` positions; ``lvl_1L`` and ``attn_bias_for_masking``
  are deterministic buffers, optional in a file and rebuilt on load (as VAR's).
- Every position holds a continuous code vector ``(Cvae)``: real data (a code of an earlier step) or Gaussian
  noise. ``n_d_embed`` (2 rows: 0 noise, 1 data) marks which, added to the input embedding; with
  ``layerwise_n_d_embed`` (``depth + 1`` linears), linear ``i`` of that mark is added in block ``i`` between the
  attention and the MLP, and the last linear's before both heads. Without them the raw mark is used.
- Attention: a token sees every token of an earlier level and itself, nothing else of its own level.
- Two heads read every position: VAR's ``head_nm``/``head`` give fp32 logits over the codebook, and
  ``final_layer_conti`` (LayerNorm without affine, ``(1 + scale)`` and ``shift`` from ``scale_shift_table +
  class embedding``, then a linear to ``Cvae``) a continuous code vector. Position ``i``'s outputs predict
  position ``i`` itself (not the next token as in VAR).
- Class ``num_classes`` is the null class; DD has no guidance (the teacher's was distilled in).
- Layers come from the op set ``operations`` (:mod:`..core.ops`); computation on the labels' device in
  :attr:`DistilledVAR.compute_dtype`, both heads in fp32.
- :class:`DistilledVAR` is a :class:`~..var.model.VAR` (same modules, loading, checks and saving) that adds the
  noise/data embeddings, the continuous head and its own forward; its sampling-only VAR paths (``forward_scale``,
  ``forward_teacher``) are not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import AdaLNSelfAttn, stream_dtype
from ..core.errors import NextScaleError
from ..core.ops import TorchOps, cast, embed, weight_and_bias
from ..var.model import VAR, VARConfig

WHAT = "Distilled Decoding generator"


@dataclass(frozen=True)
class DDConfig(VARConfig):
    """Architecture of a DD transformer: VAR's, where ``patch_nums`` is VAR's schedule (without the class token's
    level), never with ``shared_aln``; ``layerwise`` says whether it has the per-layer ``layerwise_n_d_embed``
    linears (the released models do)."""

    layerwise: bool = True

    name: ClassVar[str] = "DD"

    def __post_init__(self):
        super().__post_init__()
        if self.shared_aln:
            raise NextScaleError("DD config: no released DD model has a shared AdaLN (shared_aln)")

    @classmethod
    def official(cls, depth: int) -> DDConfig:
        """Upstream ``build_vae_dd(depth=d)`` (d16, d20, d24 released): ``d`` heads of 64 channels."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth)

    @property
    def token_levels(self) -> tuple[int, ...]:
        """The class token's level 0, then the code positions' (scale ``si`` at level ``si + 1``)."""
        return (0, *(level + 1 for level in super().token_levels))


class DDBlock(AdaLNSelfAttn):
    """VAR's block with DD's noise/data mark ``nd_BLC`` added to the stream between the attention and the MLP."""

    def forward(self, x_BLC: torch.Tensor, ada_B16C: torch.Tensor, attn_mask: torch.Tensor, nd_BLC: torch.Tensor):
        stream = stream_dtype(self.compute_dtype)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.to(stream).unbind(2)
        x_BLC = self._residual(x_BLC.to(stream), lambda h: self.attn(h, attn_mask), scale1, shift1, gamma1)
        x_BLC = x_BLC + nd_BLC.to(stream)
        return self._residual(x_BLC, self.ffn, scale2, shift2, gamma2)


class ContinuousHead(nn.Module):
    """``final_layer_conti``: ``Linear(LN(h)(1 + scale) + shift)`` to ``Cvae`` channels, ``(shift, scale) =
    scale_shift_table + cond_BD``; fp32. Keys ``scale_shift_table (2, C)``, ``linear.weight/.bias``."""

    def __init__(self, embed_dim: int, cvae: int, operations=TorchOps):
        super().__init__()
        self.embed_dim = embed_dim
        self.scale_shift_table = nn.Parameter(torch.randn(2, embed_dim) / embed_dim**0.5)
        self.linear = operations.Linear(embed_dim, cvae)

    def forward(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        table = cast(self.scale_shift_table, h_BLC.device, torch.float32)
        shift_B1C, scale_B1C = (table[None] + cond_BD.float()[:, None]).chunk(2, dim=1)
        h_BLC = F.layer_norm(h_BLC.float(), (self.embed_dim,), eps=1e-6) * (1 + scale_B1C) + shift_B1C
        return F.linear(h_BLC, *weight_and_bias(self.linear, h_BLC.device, torch.float32))


class DistilledVAR(VAR):
    """DD transformer with the official key layout: VAR's modules with one more level and position for the class
    token, :class:`DDBlock` blocks, and DD's ``n_d_embed``, ``layerwise_n_d_embed`` and ``final_layer_conti``. Build
    it with :meth:`from_state_dict`; ``operations`` and ``compute_dtype`` as for :class:`~..var.model.VAR`."""

    config_type = DDConfig
    what = WHAT
    file_kind = "dd-generator"
    block_type = DDBlock
    class_levels = 1

    def add_modules(self, operations) -> None:
        C = self.config.embed_dim
        self.n_d_embed = operations.Embedding(2, C)
        if self.config.layerwise:
            self.layerwise_n_d_embed = nn.ModuleList(operations.Linear(C, C) for _ in range(self.config.depth + 1))
        self.final_layer_conti = ContinuousHead(C, self.config.cvae, operations)

    @staticmethod
    def visible(lvl_L: torch.Tensor) -> torch.Tensor:
        """DD's rule: every token of an earlier level, and the token itself."""
        eye_LL = torch.eye(len(lvl_L), dtype=torch.bool, device=lvl_L.device)
        return (lvl_L[None, :] < lvl_L[:, None]) | eye_LL

    @staticmethod
    def config_fields(state_dict: Mapping[str, torch.Tensor], path: str) -> dict:
        if "shared_ada_lin.1.weight" in state_dict:
            raise NextScaleError(
                f"{WHAT} file '{path}' has a shared AdaLN (shared_ada_lin): no released DD model has one and "
                f"NextScale does not load it"
            )
        return {"layerwise": "layerwise_n_d_embed.0.weight" in state_dict}

    def forward(
        self, label_B: torch.Tensor, x_BLCv: torch.Tensor, first_noisy: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes_BLCv, logits_BLV)``, both fp32, predicted for every position of ``x_BLCv (B, L, Cvae)``, whose
        positions from ``first_noisy`` on hold noise and the earlier ones data (upstream ``forward`` at the step
        ``t`` whose first noisy position is ``first_noisy``)."""
        cfg, dtype, device = self.config, self.compute_dtype, label_B.device
        if tuple(x_BLCv.shape[1:]) != (cfg.num_tokens, cfg.cvae) or x_BLCv.shape[0] != label_B.shape[0]:
            raise NextScaleError(
                f"DD needs labels (B,) and codes (B, {cfg.num_tokens}, {cfg.cvae}), got {tuple(label_B.shape)} and "
                f"{tuple(x_BLCv.shape)}"
            )
        L = cfg.num_tokens + 1
        cond = self.condition(label_B)
        x_BLC = torch.cat((self.start_token(cond.cond_BD), self.word_embed(x_BLCv.to(dtype))), dim=1)
        is_data_L = torch.arange(L, device=device) < first_noisy + 1  # the class token counts as data
        nd_1LC = embed(self.n_d_embed, is_data_L.long()[None], dtype)
        x_BLC = x_BLC + cond.lvl_pos_1LC + nd_1LC
        mask_LL = self.teacher_mask(L, device)
        for i, (block, ada_B16C) in enumerate(zip(self.blocks, cond.ada_B16C)):
            x_BLC = block(x_BLC, ada_B16C, mask_LL, self._mark(i, nd_1LC))
        h_BLC = x_BLC.float() + self._mark(cfg.depth, nd_1LC).float()
        logits_BLV = self.logits(h_BLC, cond)
        codes_BLCv = self.final_layer_conti(h_BLC, cond.cond_BD)
        return codes_BLCv[:, 1:], logits_BLV[:, 1:]

    def _mark(self, layer: int, nd_1LC: torch.Tensor) -> torch.Tensor:
        """The noise/data mark added at ``layer`` (``depth``: before the heads)."""
        return self.layerwise_n_d_embed[layer](nd_1LC) if self.config.layerwise else nd_1LC
