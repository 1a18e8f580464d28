"""The Switti transformer (upstream ``Switti``, ``models/switti.py`` and ``models/basic_switti.py``): text-to-image
next-scale prediction on VAR's multi-scale VQ-VAE tokens.

Conventions (docs/switti.md):
- Text comes in as Switti's conditioning (:class:`SwittiText`): the last hidden states of CLIP ViT-L/14 and
  ViT-bigG/14 concatenated ``(B, 77, 768 + 1280)``, bigG's pooled output ``(B, 1280)`` (the final-layer-normed
  state of its end token, without the text projection) and an additive key bias ``(B, 77)``: 0 up to and including
  the end token, -inf over the padding.
- ``cond_BD = text_pooler(pooled)`` is the start token (plus ``pos_start``) and drives the head's AdaLN. The blocks'
  AdaLN takes ``cond_BD + crop_cond_scales * crop_cond``, where ``crop_cond = crop_proj(fourier(512, 512, 0, 0))``
  (upstream always samples with the 512 px, uncropped crop condition).
- Block (``AdaLNSelfCrossAttn``)::

      x += RMS2(SA(RMS1(x)(1 + scale1) + shift1)) * gamma1    # q, k LayerNorm over C, 2D RoPE, scale 1/sqrt(c)
      x += RMS2'(CA(RMS1'(x), RMS_y(text)))                     # masked by the text bias; no gate
      x += RMS2''(SwiGLU(RMS1''(x)(1 + scale2) + shift2)) * gamma2

- Self-attention: Switti sees only the tokens of its own scale (no KV cache); Switti-AR (``causal``) sees every
  earlier scale too, through a KV cache (policies apply). Each token adds ``lvl_embed(its scale)``; positions come
  from 2D RoPE whose angles span each scale's grid ``0 .. rope_size`` (:func:`rope_angles`).
- Module names reproduce the official keys. ``lvl_1L`` and ``attn_bias_for_masking`` are deterministic buffers:
  optional in a file (shape-checked when present), rebuilt on load; the mask tells Switti (block-diagonal) from
  Switti-AR (block-causal) when no config says which.
- Layers come from the op set ``operations`` (:mod:`..core.ops`); everything computes on the device of the text
  the caller passes, in :attr:`Switti.compute_dtype` (residual stream and norms in :func:`~..core.blocks.stream_dtype`,
  logits in fp32).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import additive_mask, attention
from ..core.blocks import stream_dtype
from ..core.checkpoint import (
    SavedConfig,
    SavedModel,
    block_depth,
    check_state_dict,
    check_tensors,
    key_shape,
    load_on_meta,
    read_state_dict,
)
from ..core.errors import NextScaleError
from ..core.family import expect_kind
from ..core.kv_cache import KVCache, LayerKV
from ..core.ops import ComputeDtype, TorchOps, cast, embed, weight_and_bias
from ..core.rope import apply_rope
from ..core.schedule import (
    KNOWN_SCHEDULES,
    SCHEDULE_512,
    scale_levels,
    schedule_from_counts,
    schedule_from_level_buffer,
    token_count,
    validate_schedule,
)
from ..infinity.model import RMSNorm

WHAT = "Switti transformer"
CLIP_L_DIM, CLIP_G_DIM = 768, 1280
TEXT_TOKENS = 77
CROP_SIZE = 512  # upstream samples with the crop condition of an uncropped 512 x 512 training image
_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
# The fields of upstream's hub config (config.json beside model.safetensors) and ours they set.
_HUB_FIELDS = {"rope_theta": "rope_theta", "rope_size": "rope_size", "use_ar": "causal", "use_crop_cond": "crop_cond"}


@dataclass(frozen=True)
class SwittiConfig(SavedConfig):
    """Architecture of a Switti transformer. Upstream's released models have ``num_heads = depth`` heads of 64
    channels, a SwiGLU FFN of ``int(8 C / 3)`` channels, RoPE (theta 10000, size 128) and the crop condition;
    ``causal`` is Switti-AR. ``patch_nums``: 512 px (Switti, Switti-AR) or 1024 px (the -1024 models)."""

    depth: int
    embed_dim: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = 4096
    cvae: int = 32
    patch_nums: tuple[int, ...] = SCHEDULE_512
    causal: bool = False
    crop_cond: bool = True
    rope_theta: float = 10000.0
    rope_size: float = 128.0
    norm_eps: float = 1e-6

    name: ClassVar[str] = "Switti"  # the model's name in error messages

    def __post_init__(self):
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
        if min(self.depth, self.embed_dim, self.num_heads, self.ffn_dim, self.vocab_size, self.cvae) < 1:
            raise NextScaleError(f"Switti config has a non-positive size: {self}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise NextScaleError(
                f"Switti config: width {self.embed_dim} over {self.num_heads} heads must give a head size divisible "
                f"by 4 (2D RoPE)"
            )
        if self.crop_cond and self.embed_dim % 8:
            raise NextScaleError(f"Switti config: the crop condition takes widths divisible by 8, not {self.embed_dim}")
        validate_schedule(self.patch_nums)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_tokens(self) -> int:
        return token_count(self.patch_nums)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def visible(self, lvl_L: torch.Tensor) -> torch.Tensor:
        """``(l, l)`` bool: which tokens each token attends to, from their scales ``lvl_L``: its own scale (Switti)
        or its own and every earlier one (Switti-AR)."""
        return lvl_L[None, :] <= lvl_L[:, None] if self.causal else lvl_L[None, :] == lvl_L[:, None]


@dataclass
class SwittiText:
    """Switti's text conditioning of ``B`` rows: ``context_BTC (B, T, 2048)``, ``pooled_BC (B, 1280)`` and the
    additive key bias ``bias_BT (B, T)`` (0 for a real token, -inf for padding)."""

    context_BTC: torch.Tensor
    pooled_BC: torch.Tensor
    bias_BT: torch.Tensor

    def __post_init__(self):
        B, T, C = self.context_BTC.shape
        if C != CLIP_L_DIM + CLIP_G_DIM or tuple(self.pooled_BC.shape) != (B, CLIP_G_DIM):
            raise NextScaleError(
                f"Switti text must be CLIP-L + bigG states (B, T, {CLIP_L_DIM + CLIP_G_DIM}) with a bigG pooled "
                f"output (B, {CLIP_G_DIM}); got {tuple(self.context_BTC.shape)} and {tuple(self.pooled_BC.shape)}: "
                f"encode it with NextScale Switti Text Encode from DualCLIPLoader (type sdxl)"
            )
        if tuple(self.bias_BT.shape) != (B, T):
            raise NextScaleError(f"Switti text bias is {tuple(self.bias_BT.shape)}, expected ({B}, {T})")

    @classmethod
    def cat(cls, parts: Sequence[SwittiText]) -> SwittiText:
        """The rows of ``parts`` in order, padded with masked zeros to the longest text."""
        T = max(p.context_BTC.shape[1] for p in parts)
        contexts, biases = [], []
        for p in parts:
            pad = T - p.context_BTC.shape[1]
            contexts.append(F.pad(p.context_BTC, (0, 0, 0, pad)))
            biases.append(F.pad(p.bias_BT, (0, pad), value=float("-inf")))
        return cls(torch.cat(contexts), torch.cat([p.pooled_BC for p in parts]), torch.cat(biases))

    def expand(self, batch: int) -> SwittiText:
        """``batch`` rows: the text itself, or its one row repeated."""
        rows = self.context_BTC.shape[0]
        if rows == batch:
            return self
        if rows != 1:
            raise NextScaleError(f"the text holds {rows} prompts; use one prompt, or batch_size = {rows}")
        return SwittiText(
            self.context_BTC.expand(batch, -1, -1), self.pooled_BC.expand(batch, -1), self.bias_BT.expand(batch, -1)
        )


def rope_angles(patch_nums: Sequence[int], head_dim: int, theta: float, size: float) -> torch.Tensor:
    """fp32 ``(L, c / 2)`` RoPE angles of every token, scale by scale (upstream ``compute_axial_cis``): the first
    ``c / 4`` pairs rotate with the token's column, the last ``c / 4`` with its row, at frequencies
    ``theta ** (-4 i / c)`` times ``size / (pn - 1)`` (``size`` for ``pn = 1``), so every grid spans ``0 .. size``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    per_scale = []
    for pn in patch_nums:
        freq = inv_freq * (size / max(pn - 1, 1))
        t = torch.arange(pn * pn, dtype=torch.float32)
        col, row = t % pn, torch.div(t, pn, rounding_mode="floor")
        per_scale.append(torch.cat([torch.outer(col, freq), torch.outer(row, freq)], dim=-1))
    return torch.cat(per_scale)


def _ln(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class SelfAttention(ComputeDtype, nn.Module):
    """Keys ``to_qkv.*`` ``(3C, C)`` with bias, ``proj.*``. ``q`` and ``k`` are LayerNormed over all ``C`` channels
    (no affine) before the heads split, then rotated; softmax scale ``1 / sqrt(c)``."""

    def __init__(self, embed_dim: int, num_heads: int, operations=TorchOps):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.to_qkv = operations.Linear(embed_dim, 3 * embed_dim)
        self.proj = operations.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: LayerKV | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        dtype = self.compute_dtype
        stream = stream_dtype(dtype)
        attn_dtype = stream if x_BLC.device.type == "cpu" else dtype
        q_BLC, k_BLC, v_BLC = self.to_qkv(x_BLC.to(dtype)).view(B, L, 3, C).unbind(2)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)

        q_BHLc = apply_rope(heads(_ln(q_BLC.to(stream))), *rope) * self.head_dim**-0.5
        k_BHLc = apply_rope(heads(_ln(k_BLC.to(stream))), *rope)
        q_BHLc, k_BHLc, v_BHLc = q_BHLc.to(attn_dtype), k_BHLc.to(attn_dtype), heads(v_BLC).to(attn_dtype)
        if kv is None:
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, attn_mask)
        else:
            out_BHLc = kv.attend(q_BHLc, k_BHLc, v_BHLc, attn_mask)
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C).to(dtype))


class CrossAttention(ComputeDtype, nn.Module):
    """Keys ``to_q.*`` ``(C, C)``, ``to_kv.*`` ``(2C, 2048)``, ``proj.*``, all with biases. ``q`` and ``k``
    LayerNormed over ``C`` (no affine); softmax scale ``1 / sqrt(c)``."""

    def __init__(self, embed_dim: int, context_dim: int, num_heads: int, operations=TorchOps):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.to_q = operations.Linear(embed_dim, embed_dim)
        self.to_kv = operations.Linear(context_dim, 2 * embed_dim)
        self.proj = operations.Linear(embed_dim, embed_dim)

    def keys_values(self, y_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` ``(B, H, T, c)`` of the normalised text, in the stream dtype (computed once per run)."""
        B, T, _ = y_BTC.shape
        k_BTC, v_BTC = self.to_kv(y_BTC.to(self.compute_dtype)).view(B, T, 2, -1).unbind(2)
        stream = stream_dtype(self.compute_dtype)
        k_BTC = _ln(k_BTC.to(stream))
        split = (B, T, self.num_heads, self.head_dim)
        return k_BTC.reshape(split).transpose(1, 2), v_BTC.to(stream).reshape(split).transpose(1, 2)

    def forward(self, x_BLC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias_B11T: torch.Tensor):
        B, L, C = x_BLC.shape
        dtype = self.compute_dtype
        stream = stream_dtype(dtype)
        attn_dtype = stream if x_BLC.device.type == "cpu" else dtype
        q_BLC = _ln(self.to_q(x_BLC.to(dtype)).to(stream)) * self.head_dim**-0.5
        q_BHLc = q_BLC.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k_BHTc, v_BHTc = (t.to(attn_dtype) for t in kv)
        out_BHLc = attention(q_BHLc.to(attn_dtype), k_BHTc, v_BHTc, bias_B11T.to(attn_dtype))
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C).to(dtype))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, embed_dim: int, hidden_dim: int, operations=TorchOps):
        super().__init__()
        self.up_proj = operations.Linear(embed_dim, hidden_dim, bias=False)
        self.down_proj = operations.Linear(hidden_dim, embed_dim, bias=False)
        self.gate_proj = operations.Linear(embed_dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwittiBlock(ComputeDtype, nn.Module):
    """One ``AdaLNSelfCrossAttn`` block (module docstring); ``ada_lin = SiLU -> Linear(C, 6C)`` gives ``gamma1,
    gamma2, scale1, scale2, shift1, shift2``; ``crop_cond_scales (1, C)`` gates the crop condition."""

    def __init__(self, cfg: SwittiConfig, context_dim: int, operations=TorchOps):
        super().__init__()
        C, eps = cfg.embed_dim, cfg.norm_eps
        self.embed_dim = C
        self.attn = SelfAttention(C, cfg.num_heads, operations)
        self.cross_attn = CrossAttention(C, context_dim, cfg.num_heads, operations)
        self.ffn = SwiGLU(C, cfg.ffn_dim, operations)
        for name in ("self_attention_norm1", "self_attention_norm2", "cross_attention_norm1", "cross_attention_norm2",
                     "ffn_norm1", "ffn_norm2"):
            setattr(self, name, RMSNorm(C, eps))
        self.attention_y_norm = RMSNorm(context_dim, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), operations.Linear(C, 6 * C))
        if cfg.crop_cond:
            self.crop_cond_scales = nn.Parameter(torch.zeros(1, C))

    def modulation(self, cond_BD: torch.Tensor, crop_BD: torch.Tensor | None) -> torch.Tensor:
        """``ada_B16C`` in the stream dtype from the text condition and the crop condition."""
        if crop_BD is not None:
            cond_BD = cond_BD + cast(self.crop_cond_scales, cond_BD.device, cond_BD.dtype) * crop_BD
        ada = self.ada_lin(cond_BD.to(self.compute_dtype)).view(-1, 1, 6, self.embed_dim)
        return ada.to(stream_dtype(self.compute_dtype))

    def forward(self, x_BLC, ada_B16C, text_kv, bias_B11T, rope, kv: LayerKV | None = None, attn_mask=None):
        dtype = self.compute_dtype
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.unbind(2)
        h = self.self_attention_norm1(x_BLC) * (scale1 + 1) + shift1
        x_BLC = x_BLC + self.self_attention_norm2(self.attn(h, rope, kv, attn_mask).to(x_BLC.dtype)) * gamma1
        h = self.cross_attention_norm1(x_BLC)
        x_BLC = x_BLC + self.cross_attention_norm2(self.cross_attn(h, text_kv, bias_B11T).to(x_BLC.dtype))
        h = self.ffn_norm1(x_BLC) * (scale2 + 1) + shift2
        return x_BLC + self.ffn_norm2(self.ffn(h.to(dtype)).to(x_BLC.dtype)) * gamma2


@dataclass
class Conditioning:
    """Everything about a batch of rows that is the same at every scale, computed once per run."""

    cond_BD: torch.Tensor  # text_pooler(pooled): the start token's content
    ada_B16C: list[torch.Tensor]  # each block's AdaLN modulation (text and crop condition)
    head_B12C: torch.Tensor  # the head's AdaLN modulation, fp32
    text_kv: list[tuple[torch.Tensor, torch.Tensor]]  # each block's cross-attention keys and values
    bias_B11T: torch.Tensor  # the text's key bias

    def rows(self, n: int) -> Conditioning:
        """The first ``n`` rows (the conditional ones, when guidance stops)."""
        return Conditioning(
            self.cond_BD[:n], [a[:n] for a in self.ada_B16C], self.head_B12C[:n],
            [(k[:n], v[:n]) for k, v in self.text_kv], self.bias_B11T[:n],
        )


class Switti(SavedModel, ComputeDtype, nn.Module):
    """Switti with the official key layout; build it with :meth:`from_file` / :meth:`from_state_dict`.
    ``operations`` and ``compute_dtype`` as for VAR (:mod:`..core.ops`)."""

    config_type: ClassVar[type[SwittiConfig]] = SwittiConfig
    what: ClassVar[str] = WHAT

    def __init__(self, config: SwittiConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        C, context_dim = cfg.embed_dim, CLIP_L_DIM + CLIP_G_DIM
        self.word_embed = ops.Linear(cfg.cvae, C)
        self.text_pooler = ops.Linear(CLIP_G_DIM, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = ops.Embedding(cfg.num_scales, C)
        for name, value in self.rebuilt_buffers(cfg).items():
            self.register_buffer(name, value)
        self.blocks = nn.ModuleList(SwittiBlock(cfg, context_dim, ops) for _ in range(cfg.depth))
        if cfg.crop_cond:
            self.crop_embed = nn.Module()
            self.crop_embed.weight = nn.Parameter(torch.zeros(C // 8))
            self.crop_proj = ops.Linear(C, C)
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), ops.Linear(C, 2 * C))
        self.head = ops.Linear(C, cfg.vocab_size)
        self.compute_dtype = compute_dtype
        self._rope_cache: dict = {}

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.patch_nums

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    # -- conditioning -------------------------------------------------------------------------------

    def crop_condition(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """``crop_proj`` of the Fourier features of ``(512, 512, 0, 0)`` (upstream ``get_crop_condition`` of a 512 px
        image, then ``GaussianFourierProjection``: ``[sin, cos](2 pi x w)`` per value), ``(rows, C)`` in the stream
        dtype; None without the crop condition."""
        if not self.config.crop_cond:
            return None
        stream = stream_dtype(self.compute_dtype)
        values = torch.tensor([CROP_SIZE, CROP_SIZE, 0, 0], device=device, dtype=stream)
        angles = values[:, None] * cast(self.crop_embed.weight, device, stream)[None] * (2 * math.pi)
        fourier_D = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(1, -1)
        crop = self.crop_proj(fourier_D.to(self.compute_dtype)).to(stream)
        return crop.expand(rows, -1)

    def condition(self, text: SwittiText) -> Conditioning:
        """The per-run conditioning of the text's rows, on its device."""
        device, dtype = text.context_BTC.device, self.compute_dtype
        stream = stream_dtype(dtype)
        cond_BD = self.text_pooler(text.pooled_BC.to(dtype)).to(stream)
        crop_BD = self.crop_condition(cond_BD.shape[0], device)
        weight, bias = weight_and_bias(self.head_nm.ada_lin[1], device, torch.float32)
        head = F.linear(F.silu(cond_BD.float()), weight, bias).view(-1, 1, 2, self.config.embed_dim)
        text_kv = [b.cross_attn.keys_values(b.attention_y_norm(text.context_BTC.to(stream))) for b in self.blocks]
        return Conditioning(
            cond_BD=cond_BD,
            ada_B16C=[b.modulation(cond_BD, crop_BD) for b in self.blocks],
            head_B12C=head,
            text_kv=text_kv,
            bias_B11T=text.bias_BT.to(device=device, dtype=stream)[:, None, None],
        )

    def schedule(self, patch_nums: Sequence[int] | None = None) -> tuple[int, ...]:
        """``patch_nums`` checked for this model (it has one level embedding per scale), or its own schedule."""
        if patch_nums is None:
            return self.patch_nums
        patch_nums = tuple(int(p) for p in patch_nums)
        validate_schedule(patch_nums)
        if len(patch_nums) != self.config.num_scales:
            raise NextScaleError(
                f"the schedule {patch_nums} has {len(patch_nums)} scales but this Switti model has "
                f"{self.config.num_scales}: use its own schedule or another of {self.config.num_scales} scales"
            )
        return patch_nums

    def rope(self, patch_nums: tuple[int, ...], begin: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``(end - begin, c / 2)`` of tokens ``begin .. end`` of ``patch_nums`` on ``device``
        (fp32)."""
        key = (patch_nums, str(device))
        if key not in self._rope_cache:
            cfg = self.config
            angles = rope_angles(patch_nums, cfg.head_dim, cfg.rope_theta, cfg.rope_size)
            self._rope_cache = {key: (angles.cos().to(device), angles.sin().to(device))}
        cos, sin = self._rope_cache[key]
        return cos[begin:end], sin[begin:end]

    # -- forward paths ------------------------------------------------------------------------------

    def first_token_map(self, cond: Conditioning) -> torch.Tensor:
        """``x_B1C``, the input of scale 0: ``cond_BD + pos_start + lvl_embed(0)``."""
        device, stream = cond.cond_BD.device, cond.cond_BD.dtype
        level = embed(self.lvl_embed, torch.zeros(1, dtype=torch.long, device=device), stream)
        return cond.cond_BD[:, None] + cast(self.pos_start, device, stream) + level

    def scale_input(self, si: int, next_BlCv: torch.Tensor) -> torch.Tensor:
        """``x_BlC`` of scale ``si >= 1`` from the tokenizer's next-scale input ``(B, pn_si**2, Cvae)``."""
        stream = stream_dtype(self.compute_dtype)
        x_BlC = self.word_embed(next_BlCv.to(self.compute_dtype)).to(stream)
        level = embed(self.lvl_embed, torch.full((1,), si, dtype=torch.long, device=next_BlCv.device), stream)
        return x_BlC + level

    def logits(self, x_BLC: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """fp32 ``logits_BLV`` of the last block's output (head AdaLN and head in fp32)."""
        scale, shift = cond.head_B12C.unbind(2)
        h_BLC = _ln(x_BLC.float(), self.config.norm_eps) * (scale + 1) + shift
        return F.linear(h_BLC, *weight_and_bias(self.head, h_BLC.device, torch.float32))

    def forward_scale(
        self, si: int, x_BlC: torch.Tensor, cond: Conditioning, cache: KVCache | None, patch_nums=None
    ) -> torch.Tensor:
        """fp32 ``logits_BlV`` of scale ``si`` of ``patch_nums`` (default: the model's schedule): Switti attends within
        the scale (``cache`` None), Switti-AR through ``cache`` to every earlier scale and to itself."""
        patch_nums = self.schedule(patch_nums)
        begin = token_count(patch_nums[:si])
        rope = self.rope(patch_nums, begin, begin + x_BlC.shape[1], x_BlC.device)
        if cache is not None:
            cache.begin_scale(si)
        x_BlC = x_BlC.to(stream_dtype(self.compute_dtype))
        for i, block in enumerate(self.blocks):
            layer = None if cache is None else cache[i]
            x_BlC = block(x_BlC, cond.ada_B16C[i], cond.text_kv[i], cond.bias_B11T, rope, layer)
        return self.logits(x_BlC, cond)

    def teacher_mask(self, l: int, device: torch.device) -> torch.Tensor:
        """The additive mask ``(l, l)`` of the first ``l`` tokens: each token sees its own scale (Switti) or its own
        and every earlier scale (Switti-AR)."""
        return additive_mask(self.config.visible(cast(self.lvl_1L, device)[0, :l]))

    def forward_teacher(self, text: SwittiText, x_BLCv: torch.Tensor) -> torch.Tensor:
        """fp32 ``logits_BLV`` of the whole sequence at once (upstream ``Switti.forward``, no KV cache).
        ``x_BLCv (B, l - 1, Cvae)`` is the tokenizer's teacher-forcing input of the first ``l`` tokens."""
        cfg = self.config
        if x_BLCv.dim() != 3 or x_BLCv.shape[1] >= self.num_tokens or x_BLCv.shape[2] != cfg.cvae:
            raise NextScaleError(
                f"teacher forcing needs inputs (B, l - 1, {cfg.cvae}) with l <= {self.num_tokens}, got "
                f"{tuple(x_BLCv.shape)}"
            )
        l, device = x_BLCv.shape[1] + 1, x_BLCv.device
        cond = self.condition(text)
        stream = cond.cond_BD.dtype
        words = self.word_embed(x_BLCv.to(self.compute_dtype)).to(stream)
        levels = embed(self.lvl_embed, cast(self.lvl_1L, device)[:, :l], stream)
        x_BLC = torch.cat([cond.cond_BD[:, None] + cast(self.pos_start, device, stream), words], dim=1) + levels
        rope, mask = self.rope(self.patch_nums, 0, l, device), self.teacher_mask(l, device)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond.ada_B16C[i], cond.text_kv[i], cond.bias_B11T, rope, attn_mask=mask)
        return self.logits(x_BLC, cond)

    forward = forward_teacher

    # -- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def rebuilt_buffers(config: SwittiConfig, device=None) -> dict[str, torch.Tensor]:
        """``lvl_1L`` (int64 scale per token, ``(1, L)``) and ``attn_bias_for_masking`` (``(1, 1, L, L)``, 0 / -inf:
        block-diagonal for Switti, block-causal for Switti-AR)."""
        lvl_L = torch.tensor(scale_levels(config.patch_nums), dtype=torch.long, device=device)
        return {"lvl_1L": lvl_L[None], "attn_bias_for_masking": additive_mask(config.visible(lvl_L))[None, None]}

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>", **known) -> SwittiConfig:
        """The config implied by the keys and shapes of ``state_dict``, with the fields in ``known`` (from a config
        file) taking precedence. Heads: upstream's ``depth`` heads. The schedule: the known one with the stored
        number of scales (``lvl_embed``) and tokens (``attn_bias_for_masking``), or the one ``lvl_1L`` lists.
        Switti-AR: from the stored mask when there is one."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, WHAT, ": it is not a Switti transformer")

        C = shape("word_embed.weight", 2)[0]
        depth = block_depth(state_dict, path, WHAT)
        K = shape("lvl_embed.weight", 2)[0]
        mask = state_dict.get("attn_bias_for_masking")
        lvl = state_dict.get("lvl_1L")
        L = mask.shape[-1] if mask is not None else lvl.shape[-1] if lvl is not None else None
        try:
            if lvl is not None and not lvl.is_meta:
                patch_nums = schedule_from_level_buffer(lvl.reshape(-1).tolist(), K, L, "the mask")
            elif L is not None:
                patch_nums = schedule_from_counts(L, K)
            else:
                fits = [pn for pn in KNOWN_SCHEDULES.values() if len(pn) == K]
                if len(fits) != 1:
                    raise NextScaleError(
                        f"{K} scales and no 'lvl_1L' or 'attn_bias_for_masking' key to tell the schedule"
                    )
                patch_nums = fits[0]
            causal = False
            if mask is not None and not mask.is_meta and mask.dim() == 4 and patch_nums[0] ** 2 < mask.shape[-1]:
                causal = bool(torch.isfinite(mask[0, 0, -1, 0]))  # the last token sees the first: block-causal
            inferred = dict(
                depth=depth,
                embed_dim=C,
                num_heads=depth,
                ffn_dim=shape("blocks.0.ffn.up_proj.weight", 2)[0],
                vocab_size=shape("head.weight", 2)[0],
                cvae=shape("word_embed.weight", 2)[1],
                patch_nums=patch_nums,
                causal=causal,
                crop_cond="crop_proj.weight" in state_dict,
            )
            return SwittiConfig(**{**inferred, **known})
        except NextScaleError as e:
            raise NextScaleError(f"{WHAT} file '{path}': {e}") from None

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        config: SwittiConfig | None = None,
        *,
        known: Mapping | None = None,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> Switti:
        """A frozen fp32 model in eval mode holding ``state_dict``, checked strictly against ``config`` (inferred,
        with the fields ``known`` from a config file, when not given). Built on the meta device and taking the
        tensors over: loading never holds two copies."""
        check_tensors(state_dict, path, WHAT, integer_keys=["lvl_1L"])
        cfg = config or cls.infer_config(state_dict, path, **(known or {}))
        check_state_dict(state_dict, cls.expected_shapes(cfg), path, WHAT, optional=_BUFFERS)
        anchor = state_dict.get("word_embed.weight")
        rebuilt = cls.rebuilt_buffers(cfg, device=None if anchor is None else anchor.device)
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), {**state_dict, **rebuilt})

    @staticmethod
    def hub_fields(path: str) -> dict:
        """The fields upstream's hub config sets (``use_ar``, ``rope_theta``, ``rope_size``, ``use_crop_cond``), read
        from ``config.json`` in a model folder (the Hugging Face download as it is) or ``<file stem>.json`` beside a
        file; {} when there is none."""
        candidate = os.path.join(path, "config.json") if os.path.isdir(path) else os.path.splitext(path)[0] + ".json"
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    hub = json.load(f)
            except (OSError, ValueError) as e:
                raise NextScaleError(f"{WHAT} config '{candidate}' is unreadable ({e}): download it again") from None
            if not isinstance(hub, dict):
                raise NextScaleError(f"{WHAT} config '{candidate}' is not a JSON object: download it again")
            if hub.get("rope") is False or hub.get("use_swiglu_ffn") is False:
                raise NextScaleError(
                    f"{WHAT} config '{candidate}' describes a model without RoPE or SwiGLU, which no released "
                    "Switti has and NextScale does not build"
                )
            return {ours: type(SwittiConfig.__dataclass_fields__[ours].default)(hub[theirs])
                    for theirs, ours in _HUB_FIELDS.items() if theirs in hub}
        return {}

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> Switti:
        """Load a Switti transformer file (or a Hugging Face model folder), with its config where one is stored."""
        state_dict = read_state_dict(path, WHAT)
        expect_kind(state_dict, path, "switti-generator", WHAT)
        return cls.from_state_dict(
            state_dict, path, cls.config_from_file(path), known=cls.hub_fields(path), operations=operations,
            compute_dtype=compute_dtype,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (f"depth={c.depth}, width={c.embed_dim}, heads={c.num_heads}, patch_nums={c.patch_nums}, "
                f"causal={c.causal}")
