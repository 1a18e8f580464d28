"""Infinity's transformer (upstream ``Infinity``): text-conditioned, bitwise next-scale prediction.

Conventions (upstream ``infinity/models/infinity.py``; docs/infinity.md):
- Text comes in as flan-T5 features ``(B, T, Ct)`` with a key mask ``(B, T)`` (True = a real token, EOS included).
  Padding a batch to one length replaces upstream's varlen packing: the masked keys get ``-inf``. ``text_norm``
  (RMSNorm) then feeds (a) ``text_proj_for_sos``, an attentive pooling (one learned query per head), whose output
  ``cond_BD`` is the start token *and* the AdaLN condition, and (b) ``text_proj_for_ca`` (Linear, GELU-tanh, Linear),
  the source of every block's cross-attention keys and values.
- Guidance rows: ``[cond; uncond]``. The unconditional rows use the learned ``cfg_uncond[:T]`` in place of the
  prompt's features (same mask), or a negative prompt's features.
- Block (``CrossAttnBlock``, shared AdaLN: ``ada_gss (1, 1, 6, C)`` plus the one ``shared_ada_lin(cond_BD)``)::

      x += SA(LN(x)(1 + scale1) + shift1) * gamma1     # cos-attention of VAR, then 2D RoPE on q and k
      x += CA(LN_affine(x), text)                       # softmax scale 1/sqrt(c), no gate
      x += FFN(LN(x)(1 + scale2) + shift2) * gamma2

- ``lvl_embed`` (15 rows) is added to each scale's tokens before block 0 only; there is no absolute position
  embedding, positions come from RoPE (:mod:`.infinity_schedule`).
- The head is AdaLN then ``Linear(C, 2 d)``: two fp32 logits per bit (bit 0, bit 1) of each token's ``d`` bits.
- Keys: ``block_chunks.{c}.module.{j}.`` for block ``c * (depth / chunks) + j`` (the released files,
  ``block_chunks = 8``) or ``blocks.{i}.`` with one chunk. The ``zero_k_bias`` buffers are deterministic: optional
  in a file, rebuilt on load. Upstream's dropped buffers (``attn_bias_for_masking``, ``lvl_1L``, ...) are ignored.
  Unlike upstream (``strict=False``, ``cfg_uncond`` stretched), loading is strict.
- Layers come from the op set ``operations`` (:mod:`..core.ops`); everything computes on the device of the text
  features and inputs the caller passes, in :attr:`Infinity.compute_dtype` (logits in fp32). ``text_norm`` is an fp32
  RMSNorm no op set has: it casts its own weight. The RoPE table is computed once per schedule on the CPU from the
  schedule alone (as upstream) and moved to the compute device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import IntervalMask
from ..core.blocks import FFN, AdaLNBeforeHead, AdaLNBlock, SelfAttention, init_trunc_normal, stream_dtype
from ..core.checkpoint import (
    SavedModel,
    check_state_dict,
    check_tensors,
    key_shape,
    load_on_meta,
    read_weights,
)
from ..core.errors import NextScaleError
from ..core.family import expect_kind
from ..core.kv_cache import KVCache
from ..core.ops import ComputeDtype, TorchOps, cast, embed, weight_and_bias
from .schedule import InfinitySchedule, rope_angles

WHAT = "Infinity transformer"
IGNORED_BUFFERS = ("attn_bias_for_masking", "lvl_1L", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


@dataclass(frozen=True)
class InfinityConfig:
    """Architecture of an Infinity transformer; the released ones: :meth:`official`.

    ``token_dim``: the bits per transformer token (the tokenizer's ``d``, times 4 when 2x2 latent cells are
    patchified into one token as for the 8B). ``pool_heads``: heads of the attentive pooling.
    """

    depth: int
    embed_dim: int
    num_heads: int
    hidden_dim: int
    token_dim: int = 32
    text_dim: int = 2048
    text_maxlen: int = 512
    block_chunks: int = 8
    pool_heads: int = 16
    num_levels: int = 15
    norm_eps: float = 1e-6

    def __post_init__(self):
        problems = []
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            problems.append(f"width {self.embed_dim} over {self.num_heads} heads must give a head size divisible by 4")
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            problems.append(f"depth {self.depth} is not a multiple of block_chunks {self.block_chunks}")
        if self.pool_heads < 1 or self.embed_dim % self.pool_heads:
            problems.append(f"width {self.embed_dim} is not divisible by the {self.pool_heads} pooling heads")
        if min(self.depth, self.hidden_dim, self.token_dim, self.text_dim, self.text_maxlen, self.num_levels) < 1:
            problems.append("every size must be positive")
        if problems:
            raise NextScaleError("invalid Infinity config: " + "; ".join(problems))

    @classmethod
    def official(cls, name: str) -> InfinityConfig:
        """``"2b"`` (``infinity_2b_reg.pth``) or ``"8b"`` (``infinity_8b_weights``, f8 tokenizer patchified)."""
        if name == "2b":
            return cls(depth=32, embed_dim=2048, num_heads=16, hidden_dim=8192, token_dim=32)
        if name == "8b":
            return cls(depth=40, embed_dim=3584, num_heads=28, hidden_dim=14336, token_dim=56)
        raise NextScaleError(f"unknown official Infinity size '{name}': use '2b' or '8b'")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> InfinityConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NextScaleError(f"unknown Infinity config entries: {', '.join(unknown)}")
        return cls(**dict(d))


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` in fp32 (key ``weight``), the weight cast to ``x``'s device on every call."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        weight, _ = weight_and_bias(self, x.device, torch.float32)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * weight).to(x.dtype)


class CrossAttention(ComputeDtype, nn.Module):
    """Queries attend to text. Keys ``mat_q`` (a ``Linear(C, C)``; for pooling a learned ``(1, H, c)`` query),
    ``mat_kv.weight (2C, Ckv)`` (no bias key; the key bias is the ``zero_k_bias`` buffer), ``v_bias``, ``proj``."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, pool: bool = False, operations=TorchOps):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = operations.Linear(embed_dim, embed_dim)
        self.mat_kv = operations.Linear(kv_dim, 2 * embed_dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = operations.Linear(embed_dim, embed_dim)

    def text_kv(self, text_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_BHTc, v_BHTc)`` of the text: the same at every scale, so the sampler computes them once."""
        B, T, _ = text_BTC.shape
        device, dtype = text_BTC.device, self.compute_dtype
        weight, _ = weight_and_bias(self.mat_kv, device, dtype)  # functional: the bias is 0, v_bias
        bias_2C = torch.cat([cast(b, device, dtype) for b in (self.zero_k_bias, self.v_bias)])
        kv_BT2Hc = F.linear(text_BTC.to(dtype), weight, bias_2C)
        k_BHTc, v_BHTc = kv_BT2Hc.view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k_BHTc, v_BHTc

    def forward(
        self, x_BLC: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor], key_mask_B11T: torch.Tensor
    ) -> torch.Tensor:
        k_BHTc, v_BHTc = kv
        B = k_BHTc.shape[0]
        if x_BLC is None:  # attentive pooling: the learned query, one token per row
            q_BHLc = cast(self.mat_q, k_BHTc.device, k_BHTc.dtype)[:, :, None].expand(B, -1, -1, -1)
        else:
            q_BHLc = self.mat_q(x_BLC).view(B, x_BLC.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHTc, v_BHTc, attn_mask=key_mask_B11T.to(q_BHLc.dtype))
        return self.proj(out_BHLc.transpose(1, 2).flatten(2))


class AttentivePool(nn.Module):
    """``text_proj_for_sos``: pools the normalised text into ``cond_BD`` (key prefix ``ca.``)."""

    def __init__(self, text_dim: int, embed_dim: int, num_heads: int, operations=TorchOps):
        super().__init__()
        self.ca = CrossAttention(embed_dim, text_dim, num_heads, pool=True, operations=operations)

    def forward(self, text_BTC: torch.Tensor, key_mask_B11T: torch.Tensor) -> torch.Tensor:
        return self.ca(None, self.ca.text_kv(text_BTC), key_mask_B11T)[:, 0]


class CrossAttnBlock(AdaLNBlock):
    """One Infinity block: keys ``sa.*`` (VAR's cos-attention), ``ca.*``, ``ca_norm.*`` (LayerNorm with affine),
    ``ffn.*``, ``ada_gss (1, 1, 6, C)``."""

    def __init__(self, embed_dim: int, num_heads: int, hidden_dim: int, norm_eps: float, operations=TorchOps):
        super().__init__()
        self.embed_dim, self.norm_eps = embed_dim, norm_eps
        self.sa = SelfAttention(embed_dim, num_heads, operations)
        self.ca = CrossAttention(embed_dim, embed_dim, num_heads, operations=operations)
        self.ffn = FFN(embed_dim, hidden_dim, operations)
        self.ca_norm = operations.LayerNorm(embed_dim, eps=norm_eps)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, embed_dim))

    def forward(
        self,
        x_BLC: torch.Tensor,
        ada_B16C: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        key_mask_B11T: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        kv=None,
    ) -> torch.Tensor:
        """``x_BLC`` after the block, in the stream dtype (mixed precision as VAR's, see :class:`AdaLNBlock`)."""
        stream = stream_dtype(self.compute_dtype)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.to(stream).unbind(2)
        x_BLC = self._residual(x_BLC.to(stream), lambda h: self.sa(h, attn_mask, kv, rope), scale1, shift1, gamma1)
        norm = self.ca_norm  # affine LayerNorm, computed in the stream dtype like the others
        weight, bias = weight_and_bias(norm, x_BLC.device, stream)
        h_BLC = F.layer_norm(x_BLC, norm.normalized_shape, weight, bias, norm.eps)
        x_BLC = x_BLC + self.ca(h_BLC.to(self.compute_dtype), text_kv, key_mask_B11T).to(stream)
        return self._residual(x_BLC, self.ffn, scale2, shift2, gamma2)


class BlockChunk(nn.Module):
    """Upstream's ``MultipleLayers``: a group of blocks under the key prefix ``module.{j}``."""

    def __init__(self, blocks: list[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


@dataclass
class TextContext:
    """Everything about the rows of a run that is the same at every scale, computed once by
    :meth:`Infinity.condition`."""

    cond_BD: torch.Tensor  # pooled text, the start token and the AdaLN condition (R, C)
    ada_B16C: list[torch.Tensor]  # each block's modulation
    head_B12C: torch.Tensor  # the head's modulation, fp32
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]  # each block's cross-attention keys and values
    key_mask_B11T: torch.Tensor  # additive: -inf on padded text positions

    def first_rows(self, rows: int) -> TextContext:
        """The context of the first ``rows`` rows (the prompts when guidance stops)."""
        return TextContext(
            cond_BD=self.cond_BD[:rows],
            ada_B16C=[a[:rows] for a in self.ada_B16C],
            head_B12C=self.head_B12C[:rows],
            text_kv=[(k[:rows], v[:rows]) for k, v in self.text_kv],
            key_mask_B11T=self.key_mask_B11T[:rows],
        )


def key_mask(mask_BT: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The additive ``(B, 1, 1, T)`` attention mask of a boolean key mask."""
    out = torch.zeros(mask_BT.shape, dtype=dtype, device=mask_BT.device).masked_fill_(~mask_BT, float("-inf"))
    return out[:, None, None]


def block_causal(counts: list[int], device=None) -> IntervalMask:
    """Additive ``(L, L)`` mask: a token sees every token of its own and earlier scales, with each query's key
    interval (:class:`~...kernels.attention.IntervalMask`: the attention backends skip the masked keys)."""
    counts_S = torch.tensor(counts, device=device)
    scale_L = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_S)
    visible = scale_L[:, None] >= scale_L[None, :]
    mask_LL = torch.zeros(visible.shape, device=device).masked_fill_(~visible, float("-inf"))
    end_L = torch.repeat_interleave(counts_S.cumsum(0), counts_S).int()
    return IntervalMask(mask_LL, torch.zeros_like(end_L), end_L)


class Infinity(SavedModel, ComputeDtype, nn.Module):
    """Infinity transformer with the official key layout; build it with :meth:`from_file` / :meth:`from_state_dict`.

    ``operations``: the op set its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes
    in (default: its weights' dtype; see :class:`~..core.ops.ComputeDtype`)."""

    config_type: ClassVar[type[InfinityConfig]] = InfinityConfig
    what: ClassVar[str] = WHAT

    def __init__(self, config: InfinityConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        C, Ct = cfg.embed_dim, cfg.text_dim
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct))
        self.text_norm = RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = AttentivePool(Ct, C, cfg.pool_heads, ops)
        self.text_proj_for_ca = nn.Sequential(ops.Linear(Ct, C), nn.GELU(approximate="tanh"), ops.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = ops.Embedding(cfg.num_levels, C)
        self.word_embed = ops.Linear(cfg.token_dim, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 6 * C))
        blocks = [CrossAttnBlock(C, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, ops) for _ in range(cfg.depth)]
        if cfg.block_chunks > 1:
            n = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList(BlockChunk(blocks[c * n : (c + 1) * n]) for c in range(cfg.block_chunks))
        else:
            self.blocks = nn.ModuleList(blocks)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, ops)
        self.head = ops.Linear(C, 2 * cfg.token_dim)
        self._rope_cache: tuple[InfinitySchedule, torch.device, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.init_weights()
        self.compute_dtype = compute_dtype

    # -- properties ---------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def block_list(self) -> list[CrossAttnBlock]:
        if self.config.block_chunks > 1:
            return [b for chunk in self.block_chunks for b in chunk.module]
        return list(self.blocks)

    # -- conditioning -------------------------------------------------------------------------------

    def condition(
        self,
        text_BTC: torch.Tensor,
        mask_BT: torch.Tensor,
        guided: bool = True,
        negative: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> TextContext:
        """The per-run context of ``B`` prompts (``2B`` rows with guidance: the prompts, then their unconditional
        rows made of ``cfg_uncond`` or of ``negative = (text_BTC, mask_BT)``), on the text's device."""
        B, T, Ct = text_BTC.shape
        maxlen = self.config.text_maxlen
        if Ct != self.config.text_dim or tuple(mask_BT.shape) != (B, T):
            raise NextScaleError(
                f"text features must be (B, T, {self.config.text_dim}) with a (B, T) mask, got "
                f"{tuple(text_BTC.shape)} and {tuple(mask_BT.shape)}"
            )
        lengths = mask_BT.sum(1)
        if int(lengths.min()) < 1:
            raise NextScaleError("every prompt needs at least one token (T5 appends an end token even to '')")
        device, dtype = text_BTC.device, self.compute_dtype
        text_BTC, mask_BT = text_BTC.to(dtype), mask_BT.bool()
        if guided:
            if negative is None:
                if int(lengths.max()) > maxlen:
                    raise NextScaleError(
                        f"a prompt has {int(lengths.max())} tokens but this model's unconditional embedding covers "
                        f"{maxlen}: shorten the prompt or give a negative prompt"
                    )
                T_used = min(T, maxlen)
                uncond_BTC = torch.zeros_like(text_BTC)
                uncond_BTC[:, :T_used] = cast(self.cfg_uncond, device, dtype)[:T_used]
                uncond_BTC = uncond_BTC * mask_BT[..., None]
                neg_BTC, neg_mask_BT = uncond_BTC, mask_BT
            else:
                neg_BTC, neg_mask_BT = negative[0].to(text_BTC), negative[1].bool().to(mask_BT.device)
                if neg_BTC.shape[0] == 1 and B > 1:
                    neg_BTC, neg_mask_BT = neg_BTC.expand(B, -1, -1), neg_mask_BT.expand(B, -1)
                T = max(T, neg_BTC.shape[1])
                text_BTC, mask_BT = _pad_to(text_BTC, mask_BT, T)
                neg_BTC, neg_mask_BT = _pad_to(neg_BTC, neg_mask_BT, T)
            text_BTC, mask_BT = torch.cat((text_BTC, neg_BTC)), torch.cat((mask_BT, neg_mask_BT))
        key_mask_B11T = key_mask(mask_BT)
        normed_BTC = self.text_norm(text_BTC)
        cond_BD = self.text_proj_for_sos(normed_BTC, key_mask_B11T)
        source_BTC = self.text_proj_for_ca(normed_BTC)
        shared_B16C = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.config.embed_dim)
        blocks = self.block_list()
        return TextContext(
            cond_BD=cond_BD,
            ada_B16C=[cast(b.ada_gss, device, dtype) + shared_B16C for b in blocks],
            head_B12C=self.head_nm.modulation(cond_BD),
            text_kv=[b.ca.text_kv(source_BTC) for b in blocks],
            key_mask_B11T=key_mask_B11T,
        )

    # -- forward paths ------------------------------------------------------------------------------

    def rope(self, schedule: InfinitySchedule, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of every token's RoPE angles ``(L, c / 2)`` for ``schedule`` (cached per schedule)."""
        cached = self._rope_cache
        if cached is None or cached[0] != schedule or cached[1] != torch.device(device):
            angles_Lh = rope_angles(schedule, self.config.head_dim).to(device)
            cached = self._rope_cache = (schedule, torch.device(device), (angles_Lh.cos(), angles_Lh.sin()))
        return cached[2]

    def level(self, si: int, device: torch.device) -> torch.Tensor:
        """``(C,)``: the embedding of scale ``si`` on ``device``, in the compute dtype."""
        return weight_and_bias(self.lvl_embed, device, self.compute_dtype)[0][si]

    def first_token_map(self, ctx: TextContext) -> torch.Tensor:
        """``x_R1C``, the input of scale 0: the pooled text plus ``pos_start`` and level 0."""
        device, dtype = ctx.cond_BD.device, self.compute_dtype
        return ctx.cond_BD[:, None] + cast(self.pos_start, device, dtype) + self.level(0, device)

    def scale_input(self, si: int, next_BlCv: torch.Tensor) -> torch.Tensor:
        """``x_BlC``, the input of scale ``si >= 1`` from the summed codes resampled to its grid ``(B, h*w, d)``."""
        return self.word_embed(next_BlCv.to(self.compute_dtype)) + self.level(si, next_BlCv.device)

    def logits(self, x_BLC: torch.Tensor, ctx: TextContext) -> torch.Tensor:
        """fp32 ``(R, l, 2 d)``: two logits per bit."""
        h_BLC = self.head_nm(x_BLC, ctx.head_B12C)
        return F.linear(h_BLC, *weight_and_bias(self.head, h_BLC.device, torch.float32))

    def forward_scale(
        self,
        si: int,
        x_BlC: torch.Tensor,
        ctx: TextContext,
        cache: KVCache,
        schedule: InfinitySchedule,
        control=None,
        pruning=None,
    ) -> torch.Tensor:
        """fp32 logits of scale ``si`` of ``schedule``, attending through ``cache`` to every earlier scale.
        ``pruning`` (a :class:`~..core.accel.TokenPruning`) may run the blocks on some of the tokens only."""
        start = schedule.starts()[si]
        cos_Lh, sin_Lh = self.rope(schedule, x_BlC.device)
        rope = (cos_Lh[start : start + x_BlC.shape[1]], sin_Lh[start : start + x_BlC.shape[1]])
        cache.begin_scale(si)
        for i, block in enumerate(self.block_list()):
            if pruning is not None:
                x_BlC, rope = pruning.block_input(si, i, x_BlC, rope)
            if control is not None:
                x_BlC = control.block_input(si, i, x_BlC)
            x_BlC = block(x_BlC, ctx.ada_B16C[i], ctx.text_kv[i], ctx.key_mask_B11T, rope, kv=cache[i])
        if pruning is not None:
            x_BlC = pruning.output(si, x_BlC)
        return self.logits(x_BlC, ctx)

    def forward_teacher(
        self, ctx: TextContext, x_BLCv: torch.Tensor, schedule: InfinitySchedule
    ) -> torch.Tensor:
        """fp32 logits of the whole sequence at once with the block-causal mask (no KV cache): training and
        the reference for the cached path. ``x_BLCv (R, L - 1, d)`` are the inputs of scales 1.. (the summed
        codes resampled to each grid), for every row of ``ctx``."""
        counts = schedule.token_counts
        L = sum(counts)
        if x_BLCv.dim() != 3 or x_BLCv.shape[1] != L - counts[0] or x_BLCv.shape[0] != ctx.cond_BD.shape[0]:
            raise NextScaleError(
                f"teacher forcing needs inputs ({ctx.cond_BD.shape[0]}, {L - counts[0]}, {self.config.token_dim}), "
                f"got {tuple(x_BLCv.shape)}"
            )
        device, dtype = x_BLCv.device, self.compute_dtype
        level_L = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
        x_BLC = torch.cat(
            (ctx.cond_BD[:, None] + cast(self.pos_start, device, dtype), self.word_embed(x_BLCv.to(dtype))), 1
        )
        x_BLC = x_BLC + embed(self.lvl_embed, level_L, dtype)
        rope = self.rope(schedule, x_BLC.device)
        mask_LL = block_causal(counts, device=x_BLC.device)
        for i, block in enumerate(self.block_list()):
            x_BLC = block(x_BLC, ctx.ada_B16C[i], ctx.text_kv[i], ctx.key_mask_B11T, rope, attn_mask=mask_LL)
        return self.logits(x_BLC, ctx)

    # -- initialisation -----------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, std: float | None = None, adaln_gamma: float = 1e-5, head: float = 0.02) -> None:
        """Truncated normals of std ``sqrt(1 / 3C)`` for linears, embeddings and learned tokens (biases zero),
        upstream's ``cfg_uncond`` init (std 1.2, divided by ``sqrt(Ct)``), gammas scaled by ``adaln_gamma`` so every
        block starts near identity, the head by ``head``. Random-weight models for tests; checkpoints replace it."""
        cfg = self.config
        init_trunc_normal(self, cfg.embed_dim, std, (self.pos_start, self.text_proj_for_sos.ca.mat_q))
        nn.init.trunc_normal_(self.cfg_uncond, std=1.2).div_(cfg.text_dim**0.5)
        for block in self.block_list():
            nn.init.normal_(block.ada_gss, std=cfg.embed_dim**-0.5)
            block.ada_gss[:, :, :2].mul_(adaln_gamma)
        self.head.weight.mul_(head)

    # -- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def block_prefix(config: InfinityConfig, i: int) -> str:
        if config.block_chunks > 1:
            n = config.depth // config.block_chunks
            return f"block_chunks.{i // n}.module.{i % n}."
        return f"blocks.{i}."

    @classmethod
    def rebuilt_buffers(cls, config: InfinityConfig, device=None) -> dict[str, torch.Tensor]:
        """The deterministic buffers: every ``zero_k_bias``."""
        zeros = torch.zeros(config.embed_dim, device=device)
        out = {"text_proj_for_sos.ca.zero_k_bias": zeros}
        for i in range(config.depth):
            prefix = cls.block_prefix(config, i)
            out[prefix + "sa.zero_k_bias"] = zeros
            out[prefix + "ca.zero_k_bias"] = zeros
        return out

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> InfinityConfig:
        """The config implied by the keys and shapes of ``state_dict``."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, ": it is not an Infinity transformer")

        chunked = sorted(
            {(int(m[1]), int(m[2])) for k in state_dict if (m := re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.", k))}
        )
        flat = sorted({int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
        if chunked and flat:
            raise NextScaleError(f"{WHAT} file '{path}' mixes 'block_chunks.*' and 'blocks.*' keys")
        if chunked:
            chunks = sorted({c for c, _ in chunked})
            per = sorted({j for _, j in chunked})
            if (
                chunks != list(range(len(chunks)))
                or per != list(range(len(per)))
                or len(chunked) != len(chunks) * len(per)
            ):
                raise NextScaleError(
                    f"{WHAT} file '{path}': its blocks are not a full grid block_chunks.0..C-1.module.0..N-1"
                )
            depth, block_chunks, first = len(chunks) * len(per), len(chunks), "block_chunks.0.module.0."
        elif flat:
            if flat != list(range(len(flat))):
                raise NextScaleError(
                    f"{WHAT} file '{path}' has blocks {flat[:8]}...; expected blocks.0 ... blocks.<depth-1>"
                )
            depth, block_chunks, first = len(flat), 1, "blocks.0."
        else:
            raise NextScaleError(f"{WHAT} file '{path}' has no transformer blocks ('block_chunks.*' or 'blocks.*')")
        C = shape("pos_start", 3)[2]
        token_dim = shape("word_embed.weight", 2)[1]
        outputs = shape("head.weight", 2)[0]
        if outputs != 2 * token_dim:
            raise NextScaleError(
                f"{WHAT} file '{path}': the head predicts {outputs} values for {token_dim}-bit tokens; NextScale "
                f"supports Infinity's bitwise head (2 logits per bit, {2 * token_dim} outputs)"
            )
        maxlen, text_dim = shape("cfg_uncond", 2)
        try:
            return InfinityConfig(
                depth=depth,
                embed_dim=C,
                num_heads=shape(first + "sa.scale_mul_1H11", 4)[1],
                hidden_dim=shape(first + "ffn.fc1.weight", 2)[0],
                token_dim=token_dim,
                text_dim=text_dim,
                text_maxlen=maxlen,
                block_chunks=block_chunks,
                pool_heads=shape("text_proj_for_sos.ca.mat_q", 3)[1],
                num_levels=shape("lvl_embed.weight", 2)[0],
            )
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        config: InfinityConfig | None = None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> Infinity:
        """A frozen fp32 model in eval mode holding ``state_dict``, strictly checked, built with ``operations`` to
        compute in ``compute_dtype`` (see :class:`Infinity`; meta-device build, tensors taken over: loading never
        holds two copies)."""
        state_dict = {k: v for k, v in state_dict.items() if k not in IGNORED_BUFFERS}
        check_tensors(state_dict, path, WHAT)
        cfg = config or cls.infer_config(state_dict, path)
        anchor = state_dict.get("pos_start")
        rebuilt = cls.rebuilt_buffers(cfg, device=None if anchor is None else anchor.device)
        check_state_dict(state_dict, cls.expected_shapes(cfg), path, WHAT, optional=rebuilt)
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), {**state_dict, **rebuilt})

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> Infinity:
        """Load ``infinity_2b_reg.pth``-style files (``.pth`` read with ``weights_only=True``), safetensors, or a
        folder of shards (``infinity_8b_weights/``); ``operations`` and ``compute_dtype`` as for :class:`Infinity`."""
        state_dict = read_weights(path, WHAT)
        expect_kind(state_dict, path, "infinity-generator", WHAT)
        return cls.from_state_dict(
            state_dict, path, cls.config_from_file(path), operations=operations, compute_dtype=compute_dtype
        )

    def extra_repr(self) -> str:
        c = self.config
        return f"depth={c.depth}, width={c.embed_dim}, heads={c.num_heads}, bits={c.token_dim}, chunks={c.block_chunks}"


def _pad_to(text_BTC: torch.Tensor, mask_BT: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = T - text_BTC.shape[1]
    if pad == 0:
        return text_BTC, mask_BT
    return F.pad(text_BTC, (0, 0, 0, pad)), F.pad(mask_BT, (0, pad), value=False)


def parameter_count(config: InfinityConfig) -> int:
    """Parameters of a model with ``config`` (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Infinity(config).parameters())
