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
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import AdaLNBeforeHead, AdaLNSelfAttn, stream_dtype
from ..core.checkpoint import (
    CONFIG_METADATA_KEY,
    check_state_dict,
    check_tensors,
    config_from_metadata,
    key_shape,
    load_on_meta,
    save_safetensors,
    shapes_on_meta,
)
from ..core.errors import NextScaleError
from ..core.ops import ComputeDtype, TorchOps, cast, embed, weight_and_bias
from ..core.schedule import SCHEDULE_256, schedule_from_counts, schedule_from_levels, token_count, validate_schedule

WHAT = "Distilled Decoding generator"
NOISE, DATA = 0, 1  # rows of n_d_embed


@dataclass(frozen=True)
class DDConfig:
    """Architecture of a DD transformer. ``patch_nums`` is VAR's schedule (without the class token's level);
    ``layerwise`` says whether it has the per-layer ``layerwise_n_d_embed`` linears (the released models do)."""

    depth: int
    embed_dim: int
    num_heads: int
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = SCHEDULE_256
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    layerwise: bool = True

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if (
            min(self.depth, self.embed_dim, self.num_heads, self.num_classes, self.vocab_size, self.cvae) < 1
            or self.mlp_ratio <= 0
        ):
            raise NextScaleError(f"DD config has a non-positive size: {self}")
        if self.embed_dim % self.num_heads:
            raise NextScaleError(f"DD config: width {self.embed_dim} is not divisible by {self.num_heads} heads")
        validate_schedule(self.patch_nums)

    @classmethod
    def official(cls, depth: int) -> DDConfig:
        """Upstream ``build_vae_dd(depth=d)`` (d16, d20, d24 released): ``d`` heads of 64 channels."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth)

    @property
    def num_tokens(self) -> int:
        """``L``: the code positions, the class token not counted."""
        return token_count(self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def hidden_dim(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def scale_start(self, si: int) -> int:
        """The first code position of scale ``si`` (``L`` for ``si = K``)."""
        return token_count(self.patch_nums[:si])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> DDConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NextScaleError(f"DD config has unknown field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise NextScaleError(f"DD config is incomplete: {e}") from None


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


class DistilledVAR(ComputeDtype, nn.Module):
    """DD transformer with the official key layout; build it with :meth:`from_state_dict`.

    ``operations``: the op set its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes
    in (default: its weights' dtype; see :class:`~..core.ops.ComputeDtype`)."""

    def __init__(self, config: DDConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        C = cfg.embed_dim
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, C))
        for name, value in self.rebuilt_buffers(cfg, top_level_only=True).items():
            self.register_buffer(name, value)
        self.word_embed = ops.Linear(cfg.cvae, C)
        self.class_emb = ops.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = ops.Embedding(cfg.num_scales + 1, C)
        self.blocks = nn.ModuleList(
            DDBlock(C, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, False, ops) for _ in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops)
        self.head = ops.Linear(C, cfg.vocab_size)
        self.n_d_embed = ops.Embedding(2, C)
        if cfg.layerwise:
            self.layerwise_n_d_embed = nn.ModuleList(ops.Linear(C, C) for _ in range(cfg.depth + 1))
        self.final_layer_conti = ContinuousHead(C, cfg.cvae, ops)
        self.init_weights()
        self.compute_dtype = compute_dtype

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def num_classes(self) -> int:
        """Number of real classes; label ``num_classes`` is the null class."""
        return self.config.num_classes

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def attention_mask(self, device: torch.device) -> torch.Tensor:
        """The additive mask ``(1 + L, 1 + L)`` (0 / -inf, fp32) on ``device``: every earlier level, and the token
        itself; built from ``lvl_1L`` (the values of ``attn_bias_for_masking``)."""
        lvl_L = cast(self.lvl_1L, device)[0]
        allowed_LL = (lvl_L[None, :] < lvl_L[:, None]) | torch.eye(len(lvl_L), dtype=torch.bool, device=device)
        return torch.zeros(allowed_LL.shape, device=device).masked_fill_(~allowed_LL, float("-inf"))

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
        cond_BD = embed(self.class_emb, label_B, dtype)
        start_B1C = cond_BD[:, None] + cast(self.pos_start, device, dtype)
        x_BLC = torch.cat((start_B1C, self.word_embed(x_BLCv.to(dtype))), dim=1)
        x_BLC = x_BLC + embed(self.lvl_embed, cast(self.lvl_1L, device), dtype) + cast(self.pos_1LC, device, dtype)
        is_data_L = torch.arange(L, device=device) < first_noisy + 1  # the class token counts as data
        nd_1LC = embed(self.n_d_embed, is_data_L.long()[None], dtype)
        x_BLC = x_BLC + nd_1LC
        mask_LL = self.attention_mask(device)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, block.modulation(cond_BD), mask_LL, self._mark(i, nd_1LC))
        h_BLC = x_BLC.float() + self._mark(cfg.depth, nd_1LC).float()
        logits_BLV = F.linear(
            self.head_nm(h_BLC, self.head_nm.modulation(cond_BD)), *weight_and_bias(self.head, device, torch.float32)
        )
        codes_BLCv = self.final_layer_conti(h_BLC, cond_BD)
        return codes_BLCv[:, 1:], logits_BLV[:, 1:]

    def _mark(self, layer: int, nd_1LC: torch.Tensor) -> torch.Tensor:
        """The noise/data mark added at ``layer`` (``depth``: before the heads)."""
        return self.layerwise_n_d_embed[layer](nd_1LC) if self.config.layerwise else nd_1LC

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random weights of VAR's initialisation scale (truncated normals of std ``sqrt(1 / 3C)``, biases zero,
        residual projections divided by ``sqrt(2 depth)``): the tests and the parity bench use them."""
        C = self.config.embed_dim
        std = std if std is not None else (1 / (3 * C)) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for block in self.blocks:
            block.attn.scale_mul_1H11.fill_(math.log(4.0))
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))

    # -- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def rebuilt_buffers(config: DDConfig, top_level_only: bool = False, device=None) -> dict[str, torch.Tensor]:
        """The deterministic buffers: ``lvl_1L`` (level per token, the class token's 0), ``attn_bias_for_masking``
        (DD's mask) and, unless ``top_level_only``, every ``zero_k_bias``."""
        levels = [0] + [si + 1 for si, pn in enumerate(config.patch_nums) for _ in range(pn * pn)]
        lvl_L = torch.tensor(levels, dtype=torch.long, device=device)
        allowed_LL = (lvl_L[None, :] < lvl_L[:, None]) | torch.eye(len(levels), dtype=torch.bool, device=device)
        bias_LL = torch.zeros(allowed_LL.shape, device=device).masked_fill_(~allowed_LL, float("-inf"))
        out = {"lvl_1L": lvl_L[None], "attn_bias_for_masking": bias_LL[None, None]}
        if not top_level_only:
            for i in range(config.depth):
                out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(config.embed_dim, device=device)
        return out

    @staticmethod
    def expected_shapes(config: DDConfig) -> dict[str, tuple[int, ...]]:
        return shapes_on_meta(lambda: DistilledVAR(config))

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> DDConfig:
        """The config implied by the keys and shapes. The schedule comes from ``lvl_1L`` when present (and
        readable; its level 0 is the class token), else from ``(L + 1, K + 1)`` among the known schedules."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, ": it is not a Distilled Decoding transformer")

        rows, C = shape("class_emb.weight", 2)
        blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise NextScaleError(f"{WHAT} file '{path}' has blocks {blocks[:8]}...; expected blocks.0 ... blocks.<d-1>")
        if "shared_ada_lin.1.weight" in state_dict:
            raise NextScaleError(
                f"{WHAT} file '{path}' has a shared AdaLN (shared_ada_lin): no released DD model has one and "
                f"NextScale does not load it"
            )
        levels, positions = shape("lvl_embed.weight", 2)[0], shape("pos_1LC", 3)[1]
        lvl = state_dict.get("lvl_1L")
        try:
            if lvl is not None and not lvl.is_meta:
                patch_nums = schedule_from_levels([lv - 1 for lv in lvl.reshape(-1).tolist()[1:]])
                if len(patch_nums) + 1 != levels or token_count(patch_nums) + 1 != positions:
                    raise NextScaleError(
                        f"key 'lvl_1L' describes {len(patch_nums)} scales and {token_count(patch_nums)} tokens after "
                        f"the class token, but 'lvl_embed.weight' has {levels} levels and 'pos_1LC' {positions} tokens"
                    )
            else:
                patch_nums = schedule_from_counts(positions - 1, levels - 1)
            return DDConfig(
                depth=len(blocks),
                embed_dim=C,
                num_heads=shape("blocks.0.attn.scale_mul_1H11", 4)[1],
                num_classes=rows - 1,
                vocab_size=shape("head.weight", 2)[0],
                cvae=shape("word_embed.weight", 2)[1],
                patch_nums=patch_nums,
                mlp_ratio=shape("blocks.0.ffn.fc1.weight", 2)[0] / C,
                layerwise="layerwise_n_d_embed.0.weight" in state_dict,
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        config: DDConfig | None = None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> DistilledVAR:
        """A frozen fp32 model in eval mode holding ``state_dict``, checked strictly (key for key, every shape)
        against ``config`` (inferred when not given); built on the meta device, taking the tensors over."""
        check_tensors(state_dict, path, WHAT, integer_keys=["lvl_1L"])
        cfg = config or cls.infer_config(state_dict, path)
        rebuildable = cls.rebuilt_buffers(cfg, device="meta").keys()
        check_state_dict(state_dict, cls.expected_shapes(cfg), path, WHAT, optional=rebuildable)
        anchor = state_dict.get("class_emb.weight")
        rebuilt = cls.rebuilt_buffers(cfg, device=None if anchor is None else anchor.device)
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), {**state_dict, **rebuilt})

    @staticmethod
    def config_from_file(path: str) -> DDConfig | None:
        """The config stored under the safetensors metadata key ``nextscale_config``, or None."""
        return config_from_metadata(path, DDConfig.from_dict, WHAT)

    def save(self, path: str) -> None:
        """Save as safetensors with the config in the metadata."""
        save_safetensors(self.state_dict(), path, {CONFIG_METADATA_KEY: self.config.to_dict()})

    def extra_repr(self) -> str:
        c = self.config
        return f"depth={c.depth}, width={c.embed_dim}, heads={c.num_heads}, patch_nums={c.patch_nums}"
