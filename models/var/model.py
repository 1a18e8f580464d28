"""The VAR transformer (upstream ``VAR``): class-conditional next-scale prediction over a multi-scale token pyramid.

Conventions (upstream ``models/var.py``; key layout in docs/architecture.md):
- The sequence holds ``L = sum(pn**2)`` tokens, scale by scale, each scale's ``pn x pn`` map row-major. Token 0 is
  the class embedding plus ``pos_start``; the tokens of scale ``si >= 1`` are ``word_embed`` of the tokenizer's
  ``(B, pn_si**2, Cvae)`` next-scale input. Every token adds ``lvl_embed(its scale) + pos_1LC``.
- Class ``num_classes`` is the null class (unconditional / CFG branch); ``cond_BD = class_emb(label)`` drives
  every block's AdaLN and the head's.
- Two forward paths share the blocks: :meth:`VAR.forward_teacher` (the whole sequence at once with the
  block-causal mask; training, calibration, teacher forcing) and :meth:`VAR.forward_scale` (one scale through
  a KV cache, no mask; the sampler). Logits are fp32 ``(B, l, V)`` in both.
- Module names reproduce the official keys. ``lvl_1L``, ``attn_bias_for_masking`` and ``blocks.i.attn.zero_k_bias``
  are deterministic buffers: optional in a file (shape-checked when present) and always rebuilt on load. The
  teacher-forcing mask is built on the compute device (:meth:`VAR.teacher_mask`), not read from its buffer, which an
  fp8 copy of the model would hold as NaN.
- Layers come from the op set ``operations`` (:mod:`..core.ops`); everything computes on the device of the labels
  and inputs the caller passes, in :attr:`VAR.compute_dtype` (logits in fp32).
- The config is inferred from the keys and shapes, never from a file name; a ``nextscale_config`` JSON entry in
  the safetensors metadata (written by :meth:`VAR.save`) takes precedence and carries class names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ...kernels.attention import IntervalMask, additive_mask
from ..core.blocks import AdaLNBeforeHead, AdaLNSelfAttn, init_trunc_normal
from ..core.checkpoint import (
    SavedConfig,
    SavedModel,
    block_depth,
    key_shape,
    read_state_dict,
)
from ..core.errors import NextScaleError
from ..core.family import expect_kind
from ..core.kv_cache import KVCache
from ..core.ops import ComputeDtype, TorchOps, cast, embed, weight_and_bias
from ..core.schedule import (
    SCHEDULE_256,
    SCHEDULE_512,
    scale_levels,
    schedule_from_counts,
    schedule_from_level_buffer,
    token_count,
    validate_schedule,
)

WHAT = "VAR generator"


@dataclass(frozen=True)
class VARConfig(SavedConfig):
    """Architecture of a VAR transformer. Official models: :meth:`official`. ``class_names`` (optional, one per
    class) travels with self-trained models; official checkpoints carry none."""

    depth: int
    embed_dim: int
    num_heads: int
    num_classes: int = 1000
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = SCHEDULE_256
    mlp_ratio: float = 4.0
    shared_aln: bool = False
    norm_eps: float = 1e-6
    class_names: tuple[str, ...] | None = None

    name: ClassVar[str] = "VAR"  # the model's name in error messages

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        if (
            min(self.depth, self.embed_dim, self.num_heads, self.num_classes, self.vocab_size, self.cvae) < 1
            or self.mlp_ratio <= 0
        ):
            raise NextScaleError(f"{self.name} config has a non-positive size: {self}")
        if self.embed_dim % self.num_heads:
            raise NextScaleError(
                f"{self.name} config: width {self.embed_dim} is not divisible by {self.num_heads} heads"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise NextScaleError(
                f"{self.name} config lists {len(self.class_names)} class names for {self.num_classes} classes"
            )
        validate_schedule(self.patch_nums)

    @classmethod
    def official(cls, depth: int) -> VARConfig:
        """Upstream ``build_vae_var(depth=d)``: ``d`` heads of 64 channels; d36 has ``shared_aln`` and the 512-px
        schedule."""
        return cls(
            depth=depth,
            embed_dim=64 * depth,
            num_heads=depth,
            shared_aln=depth == 36,
            patch_nums=SCHEDULE_512 if depth == 36 else SCHEDULE_256,
        )

    @property
    def num_tokens(self) -> int:
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

    @property
    def token_levels(self) -> tuple[int, ...]:
        """The level of each token of the transformer's sequence: its scale (``lvl_1L``, ``lvl_embed``'s row)."""
        return scale_levels(self.patch_nums)

    def scale_start(self, si: int) -> int:
        """The first token of scale ``si`` (``L`` for ``si = K``)."""
        return token_count(self.patch_nums[:si])



@dataclass
class Conditioning:
    """Everything about a batch of rows that is the same at every scale, computed once per run."""

    cond_BD: torch.Tensor  # class embedding per row
    ada_B16C: list[torch.Tensor]  # each block's AdaLN modulation
    head_B12C: torch.Tensor  # the head's AdaLN modulation, fp32
    lvl_pos_1LC: torch.Tensor  # lvl_embed(scale of each token) + pos_1LC

    def first_rows(self, rows: int) -> Conditioning:
        """The conditioning of the first ``rows`` rows (the conditional ones when guidance stops)."""
        return Conditioning(self.cond_BD[:rows], [a[:rows] for a in self.ada_B16C], self.head_B12C[:rows],
                            self.lvl_pos_1LC)


class VAR(SavedModel, ComputeDtype, nn.Module):
    """VAR transformer with the official key layout; build it with :meth:`from_file` / :meth:`from_state_dict`.

    ``operations``: the op set its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes
    in (default: its weights' dtype; see :class:`~..core.ops.ComputeDtype`).

    Subclasses that keep VAR's key layout and add to it (Distilled Decoding) set the class attributes below, the
    config's ``token_levels``, :meth:`visible` and :meth:`add_modules`."""

    config_type: ClassVar[type[VARConfig]] = VARConfig
    what: ClassVar[str] = WHAT  # the file's name in error messages
    integer_keys = ("lvl_1L",)
    file_kind: ClassVar[str] = "var-generator"  # the family a file must be identified as by :meth:`from_file`
    block_type: ClassVar[type[AdaLNSelfAttn]] = AdaLNSelfAttn
    class_levels: ClassVar[int] = 0  # levels in front of the first scale's (DD's class token has one)

    def __init__(self, config: VARConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        levels = cfg.token_levels
        C, L, K = cfg.embed_dim, len(levels), levels[-1] + 1
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        for name, value in self.rebuilt_buffers(cfg, top_level_only=True).items():
            self.register_buffer(name, value)
        self.word_embed = ops.Linear(cfg.cvae, C)
        self.class_emb = ops.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = ops.Embedding(K, C)
        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(
            self.block_type(C, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, cfg.shared_aln, ops)
            for _ in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops)
        self.head = ops.Linear(C, cfg.vocab_size)
        self.add_modules(ops)
        self.init_weights()
        self.compute_dtype = compute_dtype

    def add_modules(self, operations) -> None:
        """The modules a subclass adds to VAR's, built with ``operations`` before the weights are initialised (none
        in VAR)."""

    # -- properties ---------------------------------------------------------------------------------

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

    @property
    def class_names(self) -> list[str] | None:
        return None if self.config.class_names is None else list(self.config.class_names)

    # -- forward paths ------------------------------------------------------------------------------

    def condition(self, label_B: torch.Tensor) -> Conditioning:
        """The per-run conditioning of rows with classes ``label_B`` (``num_classes`` = null class), on their device."""
        return self.class_conditioning(label_B, self.level_positions(label_B.device))

    def class_conditioning(self, label_B: torch.Tensor, lvl_pos_1LC: torch.Tensor) -> Conditioning:
        """The conditioning of rows with classes ``label_B`` whose tokens take the embeddings ``lvl_pos_1LC``."""
        cond_BD = embed(self.class_emb, label_B, self.compute_dtype)
        if self.config.shared_aln:  # one modulation for all blocks, each adds its own ada_gss
            ada_input = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)
        else:
            ada_input = cond_BD
        return Conditioning(
            cond_BD=cond_BD,
            ada_B16C=[block.modulation(ada_input) for block in self.blocks],
            head_B12C=self.head_nm.modulation(cond_BD),
            lvl_pos_1LC=lvl_pos_1LC,
        )

    def level_positions(self, device: torch.device) -> torch.Tensor:
        """``lvl_embed(scale of each token) + pos_1LC`` ``(1, L, C)`` on ``device``, in the compute dtype."""
        dtype = self.compute_dtype
        return embed(self.lvl_embed, cast(self.lvl_1L, device), dtype) + cast(self.pos_1LC, device, dtype)

    def start_token(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """``(B, 1, C)``: the class embedding plus ``pos_start``."""
        return cond_BD[:, None] + cast(self.pos_start, cond_BD.device, self.compute_dtype)

    def first_token_map(self, cond: Conditioning) -> torch.Tensor:
        """``x_B1C``, the input of scale 0: class embedding + ``pos_start`` + level/position."""
        return self.start_token(cond.cond_BD) + cond.lvl_pos_1LC[:, :1]

    def scale_input(self, si: int, next_BlCv: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``x_BlC``, the input of scale ``si >= 1`` from the tokenizer's next-scale input ``(B, pn_si**2, Cvae)``."""
        begin = self.config.scale_start(si)
        x_BlC = self.word_embed(next_BlCv.to(self.compute_dtype))
        return x_BlC + cond.lvl_pos_1LC[:, begin : begin + next_BlCv.shape[1]]

    def logits(self, x_BLC: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """fp32 ``logits_BLV`` of the last block's output (head AdaLN and head in fp32)."""
        h_BLC = self.head_nm(x_BLC, cond.head_B12C)
        return nn.functional.linear(h_BLC, *weight_and_bias(self.head, h_BLC.device, torch.float32))

    @staticmethod
    def visible(lvl_L: torch.Tensor) -> torch.Tensor:
        """``(l, l)`` bool: which tokens each token attends to in the whole-sequence pass, from their levels
        ``lvl_L``. VAR's rule is block-causal: every token of its own and of earlier levels."""
        return lvl_L[None, :] <= lvl_L[:, None]

    def teacher_mask(self, l: int, device: torch.device) -> torch.Tensor:
        """The additive mask ``(l, l)`` of the first ``l`` tokens (0 / -inf, fp32) on ``device``: the values of
        ``attn_bias_for_masking``, built from the level of each token (``lvl_1L``)."""
        return additive_mask(self.visible(cast(self.lvl_1L, device)[0, :l]))

    def forward_scale(
        self, si: int, x_BlC: torch.Tensor, cond: Conditioning, cache: KVCache, control=None, pruning=None
    ) -> torch.Tensor:
        """fp32 ``logits_BlV`` of scale ``si``, attending through ``cache`` to every earlier scale and to itself.
        ``control.block_input(si, layer, x_BlC)``, when given, may change the hidden state before each block;
        ``pruning`` (a :class:`~..core.accel.TokenPruning`) may run the blocks on some of the tokens only."""
        cache.begin_scale(si)
        for i, block in enumerate(self.blocks):
            if pruning is not None:
                x_BlC, _ = pruning.block_input(si, i, x_BlC)
            if control is not None:
                x_BlC = control.block_input(si, i, x_BlC)
            x_BlC = block(x_BlC, cond.ada_B16C[i], kv=cache[i])
        if pruning is not None:
            x_BlC = pruning.output(si, x_BlC)
        return self.logits(x_BlC, cond)

    def forward_teacher(self, label_B: torch.Tensor, x_BLCv: torch.Tensor) -> torch.Tensor:
        """fp32 ``logits_BLV`` of the whole sequence with the block-causal mask (no KV cache).

        ``x_BLCv (B, L - 1, Cvae)`` is the tokenizer's teacher-forcing input (a prefix ``(B, l - 1, Cvae)``
        gives the first ``l`` tokens' logits). The labels are used as given: unlike upstream there is no label
        dropout here, so the pass is deterministic; training drops labels itself.
        """
        shape_ok = x_BLCv.dim() == 3 and x_BLCv.shape[1] < self.num_tokens and x_BLCv.shape[2] == self.config.cvae
        if not shape_ok or tuple(label_B.shape) != (x_BLCv.shape[0],):
            raise NextScaleError(
                f"teacher forcing needs labels (B,) and inputs (B, l - 1, {self.config.cvae}) "
                f"with l <= {self.num_tokens}, got {tuple(label_B.shape)} and {tuple(x_BLCv.shape)}"
            )
        l = x_BLCv.shape[1] + 1
        cond = self.condition(label_B)
        x_BLC = torch.cat((self.start_token(cond.cond_BD), self.word_embed(x_BLCv.to(self.compute_dtype))), dim=1)
        x_BLC = x_BLC + cond.lvl_pos_1LC[:, :l]
        mask_LL = IntervalMask.block_causal(self.teacher_mask(l, x_BLC.device), self.patch_nums)
        for block, ada_B16C in zip(self.blocks, cond.ada_B16C):
            x_BLC = block(x_BLC, ada_B16C, attn_mask=mask_LL)
        return self.logits(x_BLC, cond)

    forward = forward_teacher

    # -- initialisation -----------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(
        self, std: float | None = None, adaln: float = 0.5, adaln_gamma: float = 1e-5, head: float = 0.02
    ) -> None:
        """Upstream's training initialisation: truncated normals of std ``sqrt(1 / 3C)`` for linears, embeddings
        and positions (biases zero); residual projections divided by ``sqrt(2 depth)``; AdaLN gains scaled by
        ``adaln`` (gammas by ``adaln_gamma``, so every block starts near identity); head weights by ``head``."""
        C = self.config.embed_dim
        init_trunc_normal(self, C, std, (self.pos_start, self.pos_1LC))
        self.head.weight.mul_(head)
        self.head_nm.ada_lin[1].weight.mul_(adaln)
        for block in self.blocks:
            block.attn.scale_mul_1H11.fill_(math.log(4.0))
            block.attn.q_bias.zero_()
            block.attn.v_bias.zero_()
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                nn.init.normal_(block.ada_gss, std=C**-0.5)
                gains_6C = block.ada_gss[0, 0]
            else:
                gains_6C = block.ada_lin[1].weight.view(6, C, C)
            gains_6C[:2].mul_(adaln_gamma)
            gains_6C[2:].mul_(adaln)

    # -- checkpoints --------------------------------------------------------------------------------

    @classmethod
    def rebuilt_buffers(cls, config: VARConfig, top_level_only: bool = False, device=None) -> dict[str, torch.Tensor]:
        """The deterministic buffers of a model with ``config``: ``lvl_1L`` (int64 level per token),
        ``attn_bias_for_masking`` (the mask of :meth:`visible`, 0 / -inf) and, unless ``top_level_only``, every
        ``zero_k_bias``."""
        lvl_L = torch.tensor(config.token_levels, dtype=torch.long, device=device)
        out = {"lvl_1L": lvl_L[None], "attn_bias_for_masking": additive_mask(cls.visible(lvl_L))[None, None]}
        if not top_level_only:
            for i in range(config.depth):
                out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(config.embed_dim, device=device)
        return out

    @staticmethod
    def config_fields(state_dict: Mapping[str, torch.Tensor], path: str) -> dict:
        """The config fields that only a subclass's keys tell (VAR: ``shared_aln``)."""
        return {"shared_aln": "shared_ada_lin.1.weight" in state_dict}

    @classmethod
    def infer_config(cls, state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> VARConfig:
        """The config implied by the keys and shapes of ``state_dict``. The schedule comes from
        ``lvl_1L`` when present (and readable), else from ``(L, K)`` among the known schedules."""

        is_tokenizer = "quantize.embedding.weight" in state_dict
        hint = " It looks like a VAR tokenizer; load it as the tokenizer." if is_tokenizer else ""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, cls.what, f": it is not a {cls.what}.{hint}")

        rows, C = shape("class_emb.weight", 2)
        depth = block_depth(state_dict, path, cls.what)
        num_heads = shape("blocks.0.attn.scale_mul_1H11", 4)[1]
        hidden = shape("blocks.0.ffn.fc1.weight", 2)[0]
        K, L = shape("lvl_embed.weight", 2)[0], shape("pos_1LC", 3)[1]
        extra = cls.config_fields(state_dict, path)
        lvl, lead = state_dict.get("lvl_1L"), cls.class_levels
        try:
            if lvl is not None and not lvl.is_meta:
                patch_nums = schedule_from_level_buffer(lvl.reshape(-1).tolist(), K, L, "'pos_1LC'", lead)
            else:
                patch_nums = schedule_from_counts(L - lead, K - lead)
            return cls.config_type(
                depth=depth,
                embed_dim=C,
                num_heads=num_heads,
                num_classes=rows - 1,
                vocab_size=shape("head.weight", 2)[0],
                cvae=shape("word_embed.weight", 2)[1],
                patch_nums=patch_nums,
                mlp_ratio=hidden / C,
                **extra,
            )
        except NextScaleError as e:
            raise NextScaleError(f"{cls.what} file '{path}': {e}") from None

    @classmethod
    def loadable(cls, state_dict: Mapping[str, torch.Tensor], config: VARConfig, path: str):
        """``state_dict`` once its blocks match the depth of ``config``."""
        depth = block_depth(state_dict, path, cls.what)
        if depth != config.depth:
            raise NextScaleError(
                f"{cls.what} file '{path}' holds a depth-{depth} transformer ({depth} blocks), but its "
                f"config expects depth {config.depth}: the file and its config do not belong together"
            )
        return state_dict

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> VAR:
        """Load a ``.safetensors`` or ``.pth`` generator (official or saved by :meth:`save`); ``operations`` and
        ``compute_dtype`` as for :class:`VAR`."""
        state_dict = read_state_dict(path, cls.what)
        expect_kind(state_dict, path, cls.file_kind, cls.what)
        return cls.from_state_dict(
            state_dict, path, cls.config_from_file(path), operations=operations, compute_dtype=compute_dtype
        )

    def extra_repr(self) -> str:
        c = self.config
        return (f"depth={c.depth}, width={c.embed_dim}, heads={c.num_heads}, patch_nums={c.patch_nums}, "
                f"shared_aln={c.shared_aln}")
