"""Before/after of the scale loop's optimisations, on random weights of an official VAR size, in one process.

    python bench/bench_optimisations.py --depth 16 --batch 1 --runs 3

The scale loop runs on fixed random next-scale inputs (no sampling), so every variant does the same work and only
the optimisation differs. Each row is the median time of ``--runs`` loops after a warm-up:

- ``as shipped``: what ``sample()`` runs (fp32 weights): CFG rows batched, AdaLN modulation once per run,
  preallocated KV cache;
- ``CFG as two passes``: the conditional and the null rows as two batches of B, each with its own cache;
- ``AdaLN every scale``: the modulation of every block and of the head recomputed at each scale;
- ``KV by torch.cat``: keys and values grown by concatenation at every scale instead of written in place;
- ``attention as matmul + softmax``: the plain-torch attention (``NEXTSCALE_ATTENTION_BACKEND=torch``) instead of
  PyTorch's fused SDPA (Triton on CUDA);
- ``bf16 weights``: the loaders' ``dtype = bfloat16`` (fp32 residual stream, LayerNorms and CPU attention);
- ``bf16, pure``: bf16 weights with the residual stream in bf16 too (what a plain ``.to(bfloat16)`` of upstream's
  modules would run), for the mixed-precision choice.

A second table times the tokenizer decode of one batch (official tokenizer shapes) in fp32 and bf16, with the
decoder's input contiguous (before) and channels-last (what ``fhat_to_img`` does on CPU).

Not a test: numbers go to bench/RESULTS.md with the device, command and date.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

from bench_sampler import randomise_, sync  # noqa: E402
from nextscale.kernels.attention import ENV_BACKEND, attention  # noqa: E402
from nextscale.models import blocks  # noqa: E402
from nextscale.models.core.kv_cache import KVCache  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402


class ConcatKV:
    """A layer cache that grows by ``torch.cat`` (the "before" of the preallocated :class:`DenseLayerKV`)."""

    def __init__(self):
        self.k = self.v = None

    def attend(self, q_BHlc, k_BHlc, v_BHlc, attn_mask=None):
        self.k = k_BHlc if self.k is None else torch.cat((self.k, k_BHlc), dim=2)
        self.v = v_BHlc if self.v is None else torch.cat((self.v, v_BHlc), dim=2)
        return attention(q_BHlc, self.k, self.v, attn_mask)


class ConcatCache:
    def __init__(self, depth: int):
        self.layers = [ConcatKV() for _ in range(depth)]

    def __getitem__(self, i):
        return self.layers[i]

    def begin_scale(self, si: int) -> None:
        pass

    def free(self) -> None:
        self.layers = []


def pure_block_forward(self, x_BLC, ada_B16C, attn_mask=None, kv=None):
    """A block with its residual stream in the weights' dtype (the "pure bf16" variant)."""
    dtype = self.ffn.fc1.weight.dtype
    gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_B16C.to(dtype).unbind(2)
    x_BLC = x_BLC.to(dtype)
    ln = lambda t: F.layer_norm(t, (self.embed_dim,), eps=self.norm_eps)  # noqa: E731
    x_BLC = x_BLC + self.attn(ln(x_BLC) * (scale1 + 1) + shift1, attn_mask, kv).to(dtype) * gamma1
    return x_BLC + self.ffn(ln(x_BLC) * (scale2 + 1) + shift2) * gamma2


def scale_loop(var: VAR, labels_B, inputs, *, two_pass=False, adaln_each_scale=False, concat_kv=False) -> None:
    """The transformer part of sampling: every scale's forward on the given next-scale inputs."""
    null = torch.full_like(labels_B, var.num_classes)
    groups = [labels_B, null] if two_pass else [torch.cat((labels_B, null))]
    states = []
    for rows in groups:
        cache = ConcatCache(var.depth) if concat_kv else KVCache(var.depth, var.num_tokens)
        states.append((rows, var.condition(rows), cache))
    try:
        for si in range(len(var.patch_nums)):
            for rows, cond, cache in states:
                if adaln_each_scale and si > 0:
                    cond = var.condition(rows)
                R = rows.shape[0]
                x_RlC = var.first_token_map(cond) if si == 0 else var.scale_input(si, inputs[si][:R], cond)
                var.forward_scale(si, x_RlC, cond, cache)
    finally:
        for _, _, cache in states:
            cache.free()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = VARConfig.official(args.depth)
    with torch.device("meta"):
        var = VAR(cfg)
    var = var.to_empty(device="cpu")
    var.load_state_dict(VAR.rebuilt_buffers(cfg), strict=False)
    randomise_(var, 0)
    var = var.to(device).eval().requires_grad_(False)
    var_bf16 = copy.deepcopy(var).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    inputs = [None] + [torch.randn(2 * B, pn * pn, cfg.cvae, generator=g).to(device) for pn in cfg.patch_nums[1:]]
    labels = torch.arange(B, device=device) % cfg.num_classes

    variants = {
        "as shipped (fp32)": lambda: scale_loop(var, labels, inputs),
        "CFG as two passes": lambda: scale_loop(var, labels, inputs, two_pass=True),
        "AdaLN every scale": lambda: scale_loop(var, labels, inputs, adaln_each_scale=True),
        "KV by torch.cat": lambda: scale_loop(var, labels, inputs, concat_kv=True),
        "attention as matmul + softmax": lambda: with_backend("torch", scale_loop, var, labels, inputs),
        "bf16 weights (mixed precision)": lambda: scale_loop(var_bf16, labels, inputs),
        "bf16, pure (bf16 residual stream)": lambda: pure(var_bf16, labels, inputs),
    }
    print(f"# VAR-d{args.depth} scale loop (transformer only), batch {B}, cfg rows, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.runs} after a warm-up")
    print_table(time_interleaved(variants, args.runs, device), "as shipped (fp32)")
    decode_table(cfg, B, args.runs, device)


def time_interleaved(variants: dict, runs: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each variant over ``runs`` rounds after a warm-up round; the variants take turns within
    a round, so that drifts of the machine hit all of them."""
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for run in range(runs + 1):
            for name, fn in variants.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if run:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(medians: dict[str, float], base: str) -> None:
    print(f"| variant | s / batch | time / {base} |")
    print("|---|---|---|")
    for name, t in medians.items():
        print(f"| {name} | {t:.3f} | {t / medians[base]:.2f} |")


def decode_table(cfg: VARConfig, batch: int, runs: int, device: torch.device) -> None:
    with torch.device("meta"):
        vae = MultiScaleVQVAE(TokenizerConfig(patch_nums=cfg.patch_nums))
    vae = vae.to_empty(device="cpu")
    randomise_(vae, 1)
    side = cfg.patch_nums[-1]
    f_hat = torch.randn(batch, cfg.cvae, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    variants = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(vae).to(device=device, dtype=dtype).eval()
        name = str(dtype).removeprefix("torch.")
        f = f_hat.to(dtype)
        variants[f"{name}, contiguous"] = lambda m=model, f=f: m.decoder(m.post_quant_conv(f))
        variants[f"{name}, channels-last input"] = lambda m=model, f=f: m.decoder(
            m.post_quant_conv(f.contiguous(memory_format=torch.channels_last)))
    print(f"\n# tokenizer decode ({cfg.patch_nums[-1] * 16} px), batch {batch}, {device}, median of {runs}")
    print_table(time_interleaved(variants, runs, device), "float32, contiguous")


def with_backend(name: str, fn, *args) -> None:
    before = os.environ.get(ENV_BACKEND)
    os.environ[ENV_BACKEND] = name
    try:
        fn(*args)
    finally:
        if before is None:
            del os.environ[ENV_BACKEND]
        else:
            os.environ[ENV_BACKEND] = before


def pure(var, labels, inputs) -> None:
    mixed = blocks.AdaLNSelfAttn.forward
    blocks.AdaLNSelfAttn.forward = pure_block_forward
    try:
        scale_loop(var, labels, inputs)
    finally:
        blocks.AdaLNSelfAttn.forward = mixed


if __name__ == "__main__":
    main()
