"""The text side of the embedded text-to-image model: a small T5 encoder trained with the generator.

The encoder is a T5 v1.1 / flan-t5 encoder in the Hugging Face ``T5EncoderModel`` key layout, so that ComfyUI's own
``comfy.text_encoders.t5.T5`` runs the exported file (NextScale Text Encode (T5) reads the shapes from the weights):

- ``shared.weight (vocab, d_model)``; per block ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight``,
  ``layer.0.layer_norm.weight``, ``layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight`` (gated tanh-GELU),
  ``layer.1.layer_norm.weight``; ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight (32, heads)``
  shared by every block; ``encoder.final_layer_norm.weight``. No biases.
- RMS layer norms (eps 1e-6), attention without the ``1/sqrt(d)`` scaling, bidirectional relative-position buckets
  (32 buckets, maximum distance 128), pre-norm residual blocks, the last hidden state after the final norm.
- The vocabulary is ComfyUI's ``t5_tokenizer`` (the T5 SentencePiece model, 32,100 pieces, the matrix padded to
  32,128 rows as in flan-t5 files). A prompt is tokenised whole and ends with the end token 1, as ComfyUI's T5
  tokenizer does for a prompt without weights; batches here pad with 0 and mask the padding out, which gives the
  same features as ComfyUI's unpadded single prompts.

The vocabulary rows dominate the size (32,128 x d_model), so the encoder is narrow and stored in fp16.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training import common

VOCAB_ROWS = 32128
END, PAD = 1, 0
BUCKETS, MAX_DISTANCE = 32, 128
TOKENIZER_SUBDIR = os.path.join("comfy", "text_encoders", "t5_tokenizer")


@dataclass(frozen=True)
class T5Config:
    """The shape fields NextScale Text Encode (T5) reads from the weights (``dense_act_fn`` gated tanh-GELU)."""

    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_kv: int = 32
    d_ff: int = 256
    vocab_size: int = VOCAB_ROWS

    def to_dict(self) -> dict:
        return {**asdict(self), "is_gated_act": True, "dense_act_fn": "gelu_pytorch_tanh"}

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        return cls(**{k: d[k] for k in ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size")})


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype))


class SelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(BUCKETS, cfg.num_heads)

    def forward(self, x_BTC: torch.Tensor, bias_1HTT: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTC.shape
        q, k, v = (m(x_BTC).view(B, T, self.num_heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_1HTT.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(cfg, relative_bias)
        self.layer_norm = RMSNorm(cfg.d_model)


class GatedFFN(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class FFNLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = GatedFFN(cfg)
        self.layer_norm = RMSNorm(cfg.d_model)


class Block(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, relative_bias), FFNLayer(cfg)])

    def forward(self, x: torch.Tensor, bias_1HTT: torch.Tensor) -> torch.Tensor:
        attn, ffn = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias_1HTT)
        return x + ffn.DenseReluDense(ffn.layer_norm(x))


class Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model)


def relative_buckets(T: int, device=None) -> torch.Tensor:
    """int64 ``(T, T)``: T5's bidirectional bucket of ``key - query`` (16 buckets a side, 8 exact, log up to 128)."""
    pos = torch.arange(T, device=device)
    rel = pos[None, :] - pos[:, None]
    half = BUCKETS // 2
    out = (rel > 0).long() * half
    n = rel.abs()
    exact = half // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(MAX_DISTANCE / exact)
                     * (half - exact)).long()
    return out + torch.where(n < exact, n, large.clamp(max=half - 1))


class T5Encoder(nn.Module):
    """The trainable encoder; ``state_dict()`` keys are the Hugging Face ``T5EncoderModel``'s."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Mesh-TensorFlow's T5 initialisation (the unscaled attention relies on it)."""
        cfg = self.config
        nn.init.normal_(self.shared.weight, std=1.0)
        for block in self.encoder.block:
            attn = block.layer[0].SelfAttention
            nn.init.normal_(attn.q.weight, std=(cfg.d_model * cfg.d_kv) ** -0.5)
            for m in (attn.k, attn.v):
                nn.init.normal_(m.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(attn.o.weight, std=(cfg.num_heads * cfg.d_kv) ** -0.5)
            if hasattr(attn, "relative_attention_bias"):
                nn.init.normal_(attn.relative_attention_bias.weight, std=cfg.d_model ** -0.5)
            ffn = block.layer[1].DenseReluDense
            for m in (ffn.wi_0, ffn.wi_1):
                nn.init.normal_(m.weight, std=cfg.d_model ** -0.5)
            nn.init.normal_(ffn.wo.weight, std=cfg.d_ff ** -0.5)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """The last hidden state after the final norm, ``(B, T, d_model)``; padded positions are masked as keys."""
        T = ids_BT.shape[1]
        rel = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        bias_1HTT = rel(relative_buckets(T, ids_BT.device)).permute(2, 0, 1)[None]
        bias_BHTT = bias_1HTT.masked_fill(~mask_BT.bool()[:, None, None, :], float("-inf"))
        x = self.shared(ids_BT)
        for block in self.encoder.block:
            x = block(x, bias_BHTT)
        return self.encoder.final_layer_norm(x)

    def export(self, path: str) -> int:
        """fp16 safetensors of the encoder (with its shape config); returns the size in bytes."""
        return common.export_safetensors(path, self.state_dict(), self.config.to_dict(), dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# tokenizer


def default_tokenizer_path() -> str:
    """ComfyUI's ``t5_tokenizer/tokenizer.json``: under ``$NEXTSCALE_COMFYUI_DIR``, else the test bed's ComfyUI."""
    comfy = os.environ.get("NEXTSCALE_COMFYUI_DIR") or os.path.join(common.repo_root(), ".testbed", "comfyui")
    return os.path.join(comfy, TOKENIZER_SUBDIR, "tokenizer.json")


class PromptTokenizer:
    """ComfyUI's T5 tokenisation of a prompt without weights: the SentencePiece ids of the whole text, then 1."""

    def __init__(self, path: str | None = None):
        from tokenizers import Tokenizer

        path = path or default_tokenizer_path()
        if not os.path.isfile(path):
            raise SystemExit(f"{path} not found: pass --t5-tokenizer <ComfyUI>/{TOKENIZER_SUBDIR}/tokenizer.json "
                             f"or set NEXTSCALE_COMFYUI_DIR to a ComfyUI folder")
        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [*ids, END]

    def batch(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, T) padded with 0, mask (B, T))``, each cut to ``max_len`` with the end token kept last."""
        rows = []
        for text in texts:
            ids = self.ids(text)
            rows.append(ids if len(ids) <= max_len else [*ids[: max_len - 1], END])
        T = max(len(r) for r in rows)
        out = torch.full((len(rows), T), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.bool)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return out, mask
