"""VAR's transformer blocks; module and parameter names reproduce the official state-dict keys.

Conventions (upstream ``models/basic_var.py``, ``AdaLNSelfAttn``):
- Activations are ``x_BLC`` (batch, tokens, width ``C``); attention works on ``(B, H, L, c)`` with ``c = C / H``.
- AdaLN: a block's modulation ``ada_B16C`` ``(B, 1, 6, C)`` holds, in this order, ``gamma1, gamma2, scale1,
  scale2, shift1, shift2``; ``x += attn(LN(x)(1 + scale1) + shift1) * gamma1`` then the same with the FFN and
  the ``2`` terms. ``LN`` has no affine parameters. The modulation depends only on the class, so the sampler
  computes it once per run (:meth:`AdaLNSelfAttn.modulation`) and passes it to every scale.
- Cos-attention: ``q`` and ``k`` are L2-normalised per head, ``q`` is multiplied by
  ``exp(min(scale_mul_1H11, ln 100))``, the softmax scale is 1 and ``k`` has no bias (``zero_k_bias``).
- Layers come from an op set (:mod:`.ops`); the parameters the blocks hold themselves (``scale_mul_1H11``,
  ``q_bias``, ``v_bias``, ``zero_k_bias``, ``ada_gss``) are cast to the activations' device where they are used.
  Matmuls run in the block's compute dtype (:class:`~.ops.ComputeDtype`), whatever dtype the weights are stored in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...kernels.attention import attention
from .kv_cache import LayerKV
from .ops import ComputeDtype, TorchOps, cast, weight_and_bias
from .rope import apply_rope

MAX_LOG_SCALE = math.log(100.0)  # cap of the learned per-head log scale


def stream_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the residual stream, norms and q/k normalisation for matmuls in ``compute_dtype``: fp32 for half
    precision (mixed precision, as under upstream's autocast), else the compute dtype itself (fp32, fp64)."""
    return torch.promote_types(compute_dtype, torch.float32)


@torch.no_grad()
def init_trunc_normal(module: nn.Module, width: int, std: float | None = None, extra=()) -> None:
    """VAR's initialisation scale: truncated normals of std ``std`` (default ``sqrt(1 / 3 width)``) for the weight
    of every ``nn.Linear`` and ``nn.Embedding`` in ``module`` (their biases zero), then for the tensors ``extra``."""
    std = std if std is not None else (1 / (3 * width)) ** 0.5
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    for p in extra:
        nn.init.trunc_normal_(p, std=std)


class SelfAttention(ComputeDtype, nn.Module):
    """Keys ``scale_mul_1H11 (1, H, 1, 1)``, ``q_bias``/``v_bias (C)``, buffer ``zero_k_bias (C)``,
    ``mat_qkv.weight (3C, C)`` (no bias key), ``proj.weight/.bias``."""

    def __init__(self, embed_dim: int, num_heads: int, operations=TorchOps):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.mat_qkv = operations.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.proj = operations.Linear(embed_dim, embed_dim)

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
        device, dtype = x_BLC.device, self.compute_dtype
        weight, _ = weight_and_bias(self.mat_qkv, device, dtype)  # functional: the bias is q_bias, 0, v_bias
        bias_3C = torch.cat([cast(b, device, dtype) for b in (self.q_bias, self.zero_k_bias, self.v_bias)])
        qkv_3BHLc = (
            F.linear(x_BLC.to(dtype), weight, bias_3C)
            .view(B, L, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        q_BHLc, k_BHLc, v_BHLc = qkv_3BHLc.unbind(0)
        # The normalisation in the stream dtype (q is scaled up to 100x after it). The attention in it too on CPU,
        # where half precision gains nothing and costs accuracy, else in the compute dtype (half-precision kernels).
        stream = stream_dtype(dtype)
        attn_dtype = stream if device.type == "cpu" else dtype
        log_scale_1H11 = cast(self.scale_mul_1H11, device, stream).clamp_max(MAX_LOG_SCALE)
        q_BHLc = F.normalize(q_BHLc.to(stream), dim=-1).mul(log_scale_1H11.exp())
        k_BHLc = F.normalize(k_BHLc.to(stream), dim=-1)
        if rope is not None:
            q_BHLc, k_BHLc = apply_rope(q_BHLc, *rope), apply_rope(k_BHLc, *rope)
        q_BHLc, k_BHLc, v_BHLc = q_BHLc.to(attn_dtype), k_BHLc.to(attn_dtype), v_BHLc.to(attn_dtype)
        if kv is None:
            out_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, attn_mask)
        else:
            out_BHLc = kv.attend(q_BHLc, k_BHLc, v_BHLc, attn_mask)
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C).to(dtype))


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``; keys ``fc1.*``, ``fc2.*``."""

    def __init__(self, embed_dim: int, hidden_dim: int, operations=TorchOps):
        super().__init__()
        self.fc1 = operations.Linear(embed_dim, hidden_dim)
        self.fc2 = operations.Linear(hidden_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class AdaLNBlock(ComputeDtype, nn.Module):
    """What VAR's and Infinity's blocks share: branches fed ``LN(x)(1 + scale) + shift`` (``LN`` without affine
    parameters) and added back as ``branch * gamma``, in mixed precision whatever the compute dtype. The residual
    stream, the LayerNorms and the modulation stay in :func:`stream_dtype` (fp32 for bf16/fp16 compute, as under
    upstream's autocast); the branches' matmuls run in the compute dtype (bf16 uses a CPU's AMX/AVX512-BF16 units).
    Subclasses own ``ffn``."""

    embed_dim: int
    norm_eps: float
    ffn: FFN

    def _ln(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x_BLC, (self.embed_dim,), eps=self.norm_eps)

    def _residual(self, x_BLC, branch, scale_B1C, shift_B1C, gamma_B1C) -> torch.Tensor:
        """``x + branch(LN(x)(1 + scale) + shift) * gamma``, the branch's input cast to the compute dtype."""
        h_BLC = self._ln(x_BLC) * (scale_B1C + 1) + shift_B1C
        return x_BLC + branch(h_BLC.to(self.compute_dtype)).to(x_BLC.dtype) * gamma_B1C


class AdaLNSelfAttn(AdaLNBlock):
    """One VAR block. Its own ``ada_lin = SiLU -> Linear(C, 6C)`` (keys ``ada_lin.1.*``), or with
    ``shared_aln`` (VAR-d36) a parameter ``ada_gss (1, 1, 6, C)`` added to the model's shared modulation."""

    def __init__(
        self, embed_dim: int, num_heads: int, hidden_dim: int, norm_eps: float, shared_aln: bool, operations=TorchOps
    ):
        super().__init__()
        self.embed_dim, self.norm_eps, self.shared_aln = embed_dim, norm_eps, shared_aln
        self.attn = SelfAttention(embed_dim, num_heads, operations)
        self.ffn = FFN(embed_dim, hidden_dim, operations)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), operations.Linear(embed_dim, 6 * embed_dim))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """``ada_B16C`` from the class embedding ``cond_BD`` or, with ``shared_aln``, from the shared
        modulation ``(B, 1, 6, C)`` (either in the compute dtype)."""
        if self.shared_aln:
            return cast(self.ada_gss, cond.device, self.compute_dtype) + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.embed_dim)

    def forward(
        self,
        x_BLC: torch.Tensor,
        ada_B16C: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv: LayerKV | None = None,
    ) -> torch.Tensor:
        """``x_BLC`` after the block, in the stream dtype (fp32 for bf16 compute; see :class:`AdaLNBlock`)."""
        stream = stream_dtype(self.compute_dtype)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.to(stream).unbind(2)  # each (B, 1, C)
        x_BLC = self._residual(x_BLC.to(stream), lambda h: self.attn(h, attn_mask, kv), scale1, shift1, gamma1)
        return self._residual(x_BLC, self.ffn, scale2, shift2, gamma2)


class AdaLNBeforeHead(nn.Module):
    """The head's AdaLN: ``SiLU -> Linear(C, 2C)`` on the class embedding gives ``(scale, shift)``; output
    ``LN(x)(1 + scale) + shift``. Computed in fp32 whatever the compute dtype (key ``ada_lin.1.*``)."""

    def __init__(self, embed_dim: int, norm_eps: float, operations=TorchOps):
        super().__init__()
        self.embed_dim, self.norm_eps = embed_dim, norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), operations.Linear(embed_dim, 2 * embed_dim))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """fp32 ``(B, 1, 2, C)``: scale then shift."""
        weight, bias = weight_and_bias(self.ada_lin[1], cond_BD.device, torch.float32)
        return F.linear(F.silu(cond_BD.float()), weight, bias).view(-1, 1, 2, self.embed_dim)

    def forward(self, x_BLC: torch.Tensor, ada_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = ada_B12C.unbind(2)
        return F.layer_norm(x_BLC.float(), (self.embed_dim,), eps=self.norm_eps) * (scale + 1) + shift
