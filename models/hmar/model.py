"""The HMAR transformer (upstream ``HMAR`` in ``models/hmar.py`` of NVlabs/HMAR): VAR's transformer split into
shared base blocks and two branches, one predicting the next scale and one refining masked tokens within a scale.

Conventions (upstream; key layout in docs/hmar.md):
- VAR's embeddings, blocks and heads (:mod:`..core.blocks`), VAR's schedule ``patch_nums`` and VQ-VAE. The ``depth``
  blocks of a VAR are ``base_blocks`` (the first ``depth - branch_depth``) and ``ns_blocks`` (the last
  ``branch_depth``); ``mask_blocks`` is a second set of ``branch_depth`` blocks with the base blocks' input. The
  released models have ``branch_depth`` 8.
- Markovian: a scale's tokens attend only to each other (upstream's ``attn_bias_for_masking`` is block diagonal).
  Its input carries the previous scales as VAR's does, ``word_embed`` of the area-downsampled ``f_hat``, so a scale
  needs nothing of the earlier scales' keys and values: there is no KV cache.
- The next-scale pass: ``base_blocks``, ``ns_blocks``, ``ns_head_nm``/``ns_head``. A refinement pass at scale ``si``:
  input ``word_embed(down(f_hat)) + word_embed(down(Phi(up(h))))`` with the masked tokens' second term replaced by
  ``mask_embed``, plus ``word_embed_bias`` and the level/position embedding; then ``base_blocks``, ``mask_blocks``,
  ``mask_head_nm``/``mask_head``. ``word_embed`` has no bias key: its bias is ``word_embed_bias``.
- ``lvl_1L`` and ``attn_bias_for_masking`` are deterministic buffers, optional in a file and rebuilt on load.
- Layers come from the op set ``operations`` (:mod:`..core.ops`); computation on the inputs' device in
  :attr:`HMAR.compute_dtype`, logits in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import AdaLNBeforeHead, AdaLNSelfAttn, init_trunc_normal
from ..core.checkpoint import SavedModel, block_depth, key_shape
from ..core.errors import NextScaleError
from ..core.ops import ComputeDtype, TorchOps, cast, embed, weight_and_bias
from ..core.schedule import schedule_from_counts, schedule_from_level_buffer, token_count
from ..var.model import VAR, VARConfig

WHAT = "HMAR generator"
BRANCHES = ("base_blocks", "ns_blocks", "mask_blocks")


@dataclass(frozen=True)
class HMARConfig(VARConfig):
    """VAR's architecture (``depth`` = base blocks + ``branch_depth``) and the branch depth: how many of the last
    blocks the next-scale and the mask branches each have."""

    branch_depth: int = 8

    def __post_init__(self):
        super().__post_init__()
        if self.shared_aln:
            raise NextScaleError("HMAR config: no HMAR model has a shared AdaLN (shared_aln)")
        if not 1 <= self.branch_depth <= self.depth:
            raise NextScaleError(f"HMAR config: branch depth {self.branch_depth} must be in 1..{self.depth}")

    @classmethod
    def official(cls, depth: int) -> HMARConfig:
        """Upstream ``build_vae_hmar(depth=d)`` (d16, d20, d24, d30 released): ``d`` heads of 64 channels, 8 blocks
        per branch, VAR's 256 px schedule."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth)

    @property
    def base_depth(self) -> int:
        return self.depth - self.branch_depth


@dataclass
class HMARConditioning:
    """Everything about a batch of rows that is the same at every scale and pass, computed once per run."""

    cond_BD: torch.Tensor  # class embedding per row
    ada_B16C: dict[str, list[torch.Tensor]]  # each branch's blocks' AdaLN modulation
    ns_head_B12C: torch.Tensor
    mask_head_B12C: torch.Tensor
    lvl_pos_1LC: torch.Tensor  # lvl_embed(scale of each token) + pos_1LC


class HMAR(SavedModel, ComputeDtype, nn.Module):
    """HMAR transformer with the official key layout; build it with :meth:`from_state_dict`.

    ``operations``: the op set its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes
    in (default: its weights' dtype; see :class:`~..core.ops.ComputeDtype`)."""

    config_type: ClassVar[type[HMARConfig]] = HMARConfig
    what: ClassVar[str] = WHAT
    integer_keys = ("lvl_1L",)

    def __init__(self, config: HMARConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        C = cfg.embed_dim
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.num_tokens, C))
        for name, value in self.top_level_buffers(cfg).items():
            self.register_buffer(name, value)
        self.class_emb = ops.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = ops.Embedding(cfg.num_scales, C)
        counts = {"base_blocks": cfg.base_depth, "ns_blocks": cfg.branch_depth, "mask_blocks": cfg.branch_depth}
        for name, count in counts.items():
            blocks = (AdaLNSelfAttn(C, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, False, ops) for _ in range(count))
            setattr(self, name, nn.ModuleList(blocks))
        self.ns_head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops)
        self.ns_head = ops.Linear(C, cfg.vocab_size)
        self.mask_head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops)
        self.mask_head = ops.Linear(C, cfg.vocab_size)
        self.word_embed = ops.Linear(cfg.cvae, C, bias=False)
        self.word_embed_bias = nn.Parameter(torch.zeros(C))
        self.mask_embed = ops.Embedding(1, C)
        self.init_weights()
        self.compute_dtype = compute_dtype

    # VAR's properties, read from the config; ``depth`` counts the blocks on either path (base plus one branch).
    depth = VAR.depth
    num_classes = VAR.num_classes
    patch_nums = VAR.patch_nums

    # -- forward passes -----------------------------------------------------------------------------

    def condition(self, label_R: torch.Tensor) -> HMARConditioning:
        """The per-run conditioning of rows with classes ``label_R`` (``num_classes`` = null class), on their device."""
        dtype, device = self.compute_dtype, label_R.device
        cond_BD = embed(self.class_emb, label_R, dtype)
        lvl_pos_1LC = embed(self.lvl_embed, cast(self.lvl_1L, device), dtype) + cast(self.pos_1LC, device, dtype)
        return HMARConditioning(
            cond_BD=cond_BD,
            ada_B16C={name: [block.modulation(cond_BD) for block in getattr(self, name)] for name in BRANCHES},
            ns_head_B12C=self.ns_head_nm.modulation(cond_BD),
            mask_head_B12C=self.mask_head_nm.modulation(cond_BD),
            lvl_pos_1LC=lvl_pos_1LC,
        )

    # VAR's input of scale 0 (class embedding + ``pos_start`` + level/position), from the same parameters.
    start_token = VAR.start_token
    first_token_map = VAR.first_token_map

    def _embed_codes(self, x_BlCv: torch.Tensor) -> torch.Tensor:
        return self.word_embed(x_BlCv.to(self.compute_dtype))

    def _level_position(self, si: int, cond: HMARConditioning) -> torch.Tensor:
        begin = token_count(self.patch_nums[:si])
        return cond.lvl_pos_1LC[:, begin : begin + self.patch_nums[si] ** 2]

    def scale_input(self, si: int, next_BlCv: torch.Tensor, cond: HMARConditioning) -> torch.Tensor:
        """``x_BlC``, the next-scale input of scale ``si >= 1`` from the tokenizer's ``(B, pn_si**2, Cvae)``."""
        bias_C = cast(self.word_embed_bias, next_BlCv.device, self.compute_dtype)
        return self._embed_codes(next_BlCv) + bias_C + self._level_position(si, cond)

    def refine_input(
        self, si: int, fhat_BlCv: torch.Tensor, h_BlCv: torch.Tensor, masked_Bl: torch.Tensor, cond: HMARConditioning
    ) -> torch.Tensor:
        """``x_BlC``, a refinement pass's input at scale ``si``: the coarser scales' ``f_hat`` and this scale's code
        map ``h`` (both through the tokenizer, ``(B, pn**2, Cvae)``), the tokens ``masked_Bl`` (bool) showing
        ``mask_embed`` instead of their code."""
        dtype, device = self.compute_dtype, h_BlCv.device
        mask_C = embed(self.mask_embed, torch.zeros((), dtype=torch.long, device=device), dtype)
        codes_BlC = torch.where(masked_Bl[..., None], mask_C, self._embed_codes(h_BlCv))
        bias_C = cast(self.word_embed_bias, device, dtype)
        return self._embed_codes(fhat_BlCv) + codes_BlC + bias_C + self._level_position(si, cond)

    def _run(self, x_RlC: torch.Tensor, cond: HMARConditioning, branch: str) -> torch.Tensor:
        """The base blocks then ``branch``'s, the scale's tokens attending to each other only (no mask, no cache)."""
        for name in ("base_blocks", branch):
            for block, ada_B16C in zip(getattr(self, name), cond.ada_B16C[name]):
                x_RlC = block(x_RlC, ada_B16C)
        return x_RlC

    def _head(self, x_RlC: torch.Tensor, norm: AdaLNBeforeHead, head: nn.Module, ada_B12C: torch.Tensor):
        h_RlC = norm(x_RlC, ada_B12C)
        return F.linear(h_RlC, *weight_and_bias(head, h_RlC.device, torch.float32))

    def next_scale_logits(self, x_RlC: torch.Tensor, cond: HMARConditioning) -> torch.Tensor:
        """fp32 ``logits_RlV`` of a scale's next-scale pass (base and next-scale blocks, next-scale head)."""
        return self._head(self._run(x_RlC, cond, "ns_blocks"), self.ns_head_nm, self.ns_head, cond.ns_head_B12C)

    def refine_logits(self, x_RlC: torch.Tensor, cond: HMARConditioning) -> torch.Tensor:
        """fp32 ``logits_RlV`` of a refinement pass (base and mask blocks, mask head)."""
        return self._head(self._run(x_RlC, cond, "mask_blocks"), self.mask_head_nm, self.mask_head,
                          cond.mask_head_B12C)

    # -- initialisation -----------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random weights of VAR's initialisation scale (truncated normals of std ``sqrt(1 / 3C)``, biases zero,
        residual projections divided by ``sqrt(2 depth)``): the tests and the parity bench use them."""
        init_trunc_normal(self, self.config.embed_dim, std, (self.pos_start, self.pos_1LC))
        for name in BRANCHES:
            for block in getattr(self, name):
                block.attn.scale_mul_1H11.fill_(math.log(4.0))
                block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))

    # -- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def top_level_buffers(config: HMARConfig, device=None) -> dict[str, torch.Tensor]:
        """The deterministic top-level buffers: ``lvl_1L`` (scale per token) and ``attn_bias_for_masking`` (0 within
        a scale, -inf across scales)."""
        lvl_L = torch.tensor(
            [si for si, pn in enumerate(config.patch_nums) for _ in range(pn * pn)], dtype=torch.long, device=device
        )
        same_LL = lvl_L[None, :] == lvl_L[:, None]
        bias_LL = torch.zeros(same_LL.shape, device=device).masked_fill_(~same_LL, float("-inf"))
        return {"lvl_1L": lvl_L[None], "attn_bias_for_masking": bias_LL[None, None]}

    @classmethod
    def rebuilt_buffers(cls, config: HMARConfig, device=None) -> dict[str, torch.Tensor]:
        """Every deterministic buffer, optional in a file: the top-level ones and each block's ``zero_k_bias``."""
        out = cls.top_level_buffers(config, device)
        for name, count in zip(BRANCHES, (config.base_depth, config.branch_depth, config.branch_depth)):
            for i in range(count):
                out[f"{name}.{i}.attn.zero_k_bias"] = torch.zeros(config.embed_dim, device=device)
        return out

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> HMARConfig:
        """The config implied by the keys and shapes: the base and branch depths from the block indices, the
        schedule from ``lvl_1L`` when present (and readable), else from ``(L, K)`` among the known schedules."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, ": it is not an HMAR transformer")

        rows, C = shape("class_emb.weight", 2)
        counts = {name: block_depth(state_dict, path, WHAT, prefix=name, required=False) for name in BRANCHES}
        if not counts["ns_blocks"] or counts["ns_blocks"] != counts["mask_blocks"]:
            raise NextScaleError(
                f"{WHAT} file '{path}' has {counts['ns_blocks']} ns_blocks and {counts['mask_blocks']} mask_blocks; "
                f"an HMAR transformer has as many of each (8 in the released files)"
            )
        if "shared_ada_lin.1.weight" in state_dict:
            raise NextScaleError(f"{WHAT} file '{path}' has a shared AdaLN (shared_ada_lin): no HMAR model has one")
        first = "base_blocks" if counts["base_blocks"] else "ns_blocks"
        K, L = shape("lvl_embed.weight", 2)[0], shape("pos_1LC", 3)[1]
        lvl = state_dict.get("lvl_1L")
        try:
            if lvl is not None and not lvl.is_meta:
                patch_nums = schedule_from_level_buffer(lvl.reshape(-1).tolist(), K, L, "'pos_1LC'")
            else:
                patch_nums = schedule_from_counts(L, K)
            return HMARConfig(
                depth=counts["base_blocks"] + counts["ns_blocks"],
                branch_depth=counts["ns_blocks"],
                embed_dim=C,
                num_heads=shape(f"{first}.0.attn.scale_mul_1H11", 4)[1],
                num_classes=rows - 1,
                vocab_size=shape("ns_head.weight", 2)[0],
                cvae=shape("word_embed.weight", 2)[1],
                patch_nums=patch_nums,
                mlp_ratio=shape(f"{first}.0.ffn.fc1.weight", 2)[0] / C,
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    def extra_repr(self) -> str:
        c = self.config
        return (f"depth={c.depth} ({c.base_depth} base + {c.branch_depth} per branch), width={c.embed_dim}, "
                f"heads={c.num_heads}, patch_nums={c.patch_nums}")
