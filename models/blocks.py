"""VAR's transformer blocks; module and parameter names reproduce the official state-dict keys.

Conventions (reference: var.md 2.3-2.6):
- Activations are ``x_BLC`` (batch, tokens, width ``C``); attention works on ``(B, H, L, c)`` with ``c = C / H``.
- AdaLN: a block's modulation ``ada_B16C`` ``(B, 1, 6, C)`` holds, in this order, ``gamma1, gamma2, scale1,
  scale2, shift1, shift2``; ``x += attn(LN(x)(1 + scale1) + shift1) * gamma1`` then the same with the FFN and
  the ``2`` terms. ``LN`` has no affine parameters. The modulation depends only on the class, so the sampler
  computes it once per run (:meth:`AdaLNSelfAttn.modulation`) and passes it to every scale.
- Cos-attention: ``q`` and ``k`` are L2-normalised per head, ``q`` is multiplied by
  ``exp(min(scale_mul_1H11, ln 100))``, the softmax scale is 1 and ``k`` has no bias (``zero_k_bias``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import attention
from .infinity_schedule import apply_rope
from .kv_cache import LayerKV

MAX_LOG_SCALE = math.log(100.0)  # cap of the learned per-head log scale


class SelfAttention(nn.Module):
    """Keys ``scale_mul_1H11 (1, H, 1, 1)``, ``q_bias``/``v_bias (C)``, buffer ``zero_k_bias (C)``,
    ``mat_qkv.weight (3C, C)`` (no bias key), ``proj.weight/.bias``."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self,
        x_BLC: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attend ``x``'s tokens to themselves (``kv=None``, optionally masked) or, with a cache, to every
        cached token plus themselves (the new keys and values are appended to ``kv`` first). ``rope``, the
        ``(cos, sin)`` of each token's angles ``(L, c / 2)`` (Infinity), rotates ``q`` and ``k`` after the
        normalisation; cached keys are stored rotated."""
        B, L, C = x_BLC.shape
        weight = self.mat_qkv.weight
        bias_3C = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_3BHLc = (
            F.linear(x_BLC.to(weight.dtype), weight, bias_3C)
            .view(B, L, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        q_BHLc, k_BHLc, v_BHLc = qkv_3BHLc.unbind(0)
        # The normalisation in fp32 (q is scaled up to 100x after it). The attention in fp32 on CPU, where half
        # precision gains nothing there and costs accuracy, else in the weights' dtype (the half-precision kernels).
        attn_dtype = torch.float32 if x_BLC.device.type == "cpu" else weight.dtype
        q_BHLc = F.normalize(q_BHLc.float(), dim=-1).mul(self.scale_mul_1H11.float().clamp_max(MAX_LOG_SCALE).exp())
        k_BHLc = F.normalize(k_BHLc.float(), dim=-1)
        if rope is not None:
            q_BHLc, k_BHLc = apply_rope(q_BHLc, *rope), apply_rope(k_BHLc, *rope)
        q_BHLc, k_BHLc, v_BHLc = q_BHLc.to(attn_dtype), k_BHLc.to(attn_dtype), v_BHLc.to(attn_dtype)
        if kv is None:
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, attn_mask)
        else:
            k_BHSc, v_BHSc = kv.extend(k_BHLc, v_BHLc)
            out_BHLc = attention(q_BHLc, k_BHSc, v_BHSc, kv.key_mask(attn_mask))  # hides padded slots, if any
            kv.after_attention(q_BHLc)
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C).to(weight.dtype))


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``; keys ``fc1.*``, ``fc2.*``."""

    def __init__(self, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """One VAR block. Its own ``ada_lin = SiLU -> Linear(C, 6C)`` (keys ``ada_lin.1.*``), or with
    ``shared_aln`` (VAR-d36) a parameter ``ada_gss (1, 1, 6, C)`` added to the model's shared modulation."""

    def __init__(self, embed_dim: int, num_heads: int, hidden_dim: int, norm_eps: float, shared_aln: bool):
        super().__init__()
        self.embed_dim, self.norm_eps, self.shared_aln = embed_dim, norm_eps, shared_aln
        self.attn = SelfAttention(embed_dim, num_heads)
        self.ffn = FFN(embed_dim, hidden_dim)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """``ada_B16C`` from the class embedding ``cond_BD`` or, with ``shared_aln``, from the shared
        modulation ``(B, 1, 6, C)``."""
        if self.shared_aln:
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.embed_dim)

    def _ln(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_BLC, (self.embed_dim,), eps=self.norm_eps)

    def forward(
        self,
        x_BLC: torch.Tensor,
        ada_B16C: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """fp32 ``x_BLC`` after the block. Mixed precision whatever the weights' dtype: the residual stream, the
        LayerNorms and the modulation stay in fp32 (as under upstream's autocast); the matmuls run in the weights'
        dtype (bf16 weights use a CPU's AMX/AVX512-BF16 units)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.float().unbind(2)  # each (B, 1, C)
        dtype = self.ffn.fc1.weight.dtype
        x_BLC = x_BLC.float()
        h_BLC = self._ln(x_BLC) * (scale1 + 1) + shift1
        x_BLC = x_BLC + self.attn(h_BLC.to(dtype), attn_mask, kv).float() * gamma1
        h_BLC = self._ln(x_BLC) * (scale2 + 1) + shift2
        return x_BLC + self.ffn(h_BLC.to(dtype)).float() * gamma2


class AdaLNBeforeHead(nn.Module):
    """The head's AdaLN: ``SiLU -> Linear(C, 2C)`` on the class embedding gives ``(scale, shift)``; output
    ``LN(x)(1 + scale) + shift``. Computed in fp32 whatever the weights' dtype (key ``ada_lin.1.*``)."""

    def __init__(self, embed_dim: int, norm_eps: float):
        super().__init__()
        self.embed_dim, self.norm_eps = embed_dim, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * embed_dim))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """fp32 ``(B, 1, 2, C)``: scale then shift."""
        lin = self.ada_lin[1]
        return F.linear(F.silu(cond_BD.float()), lin.weight.float(), lin.bias.float()).view(-1, 1, 2, self.embed_dim)

    def forward(self, x_BLC: torch.Tensor, ada_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = ada_B12C.unbind(2)
        return F.layer_norm(x_BLC.float(), (self.embed_dim,), eps=self.norm_eps) * (scale + 1) + shift
