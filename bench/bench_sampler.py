"""Time the sampler end to end and by phase on random weights of official VAR sizes.

    python bench/bench_sampler.py --depth 16 --batch 1 --runs 3
    python bench/bench_sampler.py --depth 16 30 --batch 1 16 --device cuda --dtype bfloat16

For each (depth, batch): one warm-up run, then the median of ``--runs`` runs of ``sample()`` and of the tokenizer
decode. Reported: the per-scale split of the sampling time; the transformer's share of it (the rest is guidance,
top-k/top-p, draws and next-scale inputs); peak memory with the weights (process RSS on CPU, allocator peak on
GPU); and the floor of the scale loop, the larger of FLOPs per image with CFG over the measured matrix-multiply
rate and bytes per image (weights once per scale, KV reads) over the measured copy bandwidth. "loop / floor" is how
far the scale loop is from it. Random weights at O(1) scale keep the logits far from uniform.
Not a test: numbers go to bench/RESULTS.md with the device, command and date.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

from nextscale.models.core.hooks import SamplerHooks  # noqa: E402
from nextscale.models.core.schedule import cumulative_tokens  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions, sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402


def randomise_(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights at O(1) scale: unit-variance fan-in init, AdaLN gains 0.3, head gain 3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            gain = 0.3 if "ada" in name else 3.0 if name.startswith("head.") else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * gain / fan_in**0.5)


def flops_per_image(cfg: VARConfig, guided: bool = True) -> float:
    """Multiply-adds x 2 of one image's scale loop: linear layers, attention against the cache, the head."""
    C, V = cfg.embed_dim, cfg.vocab_size
    total = 0.0
    for pn, ctx in zip(cfg.patch_nums, cumulative_tokens(cfg.patch_nums)):
        tokens = pn * pn
        per_layer = 2 * tokens * (3 * C * C + C * C + 2 * 4 * C * C) + 2 * 2 * tokens * ctx * C
        total += cfg.depth * per_layer + 2 * tokens * C * V
    return total * (2 if guided else 1)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matrix product."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 3 if device.type == "cpu" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_rate(device: torch.device) -> float:
    """Measured bytes/s of a large tensor copy (read + write), the memory-bandwidth roof."""
    n = (256 if device.type == "cpu" else 1024) * 2**20 // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    reps = 5 if device.type == "cpu" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t0)


def bytes_per_image(var: VAR, batch: int, guided: bool = True) -> float:
    """Bytes a batch must move per image at least: every weight once per scale (the scale loop streams the whole
    model K times) and the KV cache read once per scale (fp32 on CPU, where attention runs in fp32, else the
    model's dtype)."""
    param = next(var.parameters())
    cfg, item = var.config, param.element_size()
    weights = sum(p.numel() for p in var.parameters()) * item * len(cfg.patch_nums)
    rows = 2 * batch if guided else batch
    kv_item = 4 if param.device.type == "cpu" else item
    kv = sum(2 * cfg.depth * ctx * cfg.embed_dim * kv_item * rows for ctx in cumulative_tokens(cfg.patch_nums))
    return (weights + kv) / batch


class PeakMemory:
    """Peak memory during a block, weights included (``peak_mb``; ``start_mb`` is the figure at its start): the
    allocator's on CUDA, the process RSS sampled every 5 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.start_mb, self.peak_mb = device, 0.0, 0.0

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start_mb = self.top = self.rss_mb()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.is_set():
            self.top = max(self.top, self.rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self.done.set()
        self.thread.join()
        self.peak_mb = max(self.top, self.rss_mb())


def bench(depth: int, batch: int, runs: int, device: torch.device, dtype: torch.dtype, decode: bool,
          tokenizer_dtype: torch.dtype) -> dict:
    cfg = VARConfig.official(depth)
    with torch.device("meta"):
        var, vae = VAR(cfg), MultiScaleVQVAE(TokenizerConfig(patch_nums=cfg.patch_nums))
    var, vae = var.to_empty(device="cpu"), vae.to_empty(device="cpu")
    var.load_state_dict(VAR.rebuilt_buffers(cfg), strict=False)  # level ids, mask, zero k-bias
    randomise_(var, 0)
    randomise_(vae, 1)
    var = var.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = vae.to(device=device, dtype=tokenizer_dtype).eval().requires_grad_(False)
    labels = torch.arange(batch, device=device) % cfg.num_classes
    options = SamplingOptions(cfg=4.0, top_k=900, top_p=0.96)
    sample_s, decode_s, per_scale, transformer_s, peaks = [], [], [], [], []
    forward_scale = var.forward_scale

    def timed_forward_scale(*args, **kwargs):  # the transformer's share; the rest of a scale is sampling
        sync(device)
        t = time.perf_counter()
        out = forward_scale(*args, **kwargs)
        sync(device)
        spent[0] += time.perf_counter() - t
        return out

    var.forward_scale = timed_forward_scale
    for run in range(runs + 1):
        marks: list[float] = []
        spent = [0.0]
        hooks = SamplerHooks(callback=lambda si, K, f_hat, marks=marks: (sync(device),
                                                                       marks.append(time.perf_counter())))
        with PeakMemory(device) as memory:
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens = sample(var, vae, labels, seed=run, options=options, hooks=hooks, device=device)
            sync(device)
            t1 = time.perf_counter()
            if decode:
                with torch.inference_mode():
                    vae.fhat_to_img(vae.indices_to_fhat(tokens.flat(), patch_nums=cfg.patch_nums))
                sync(device)
            t2 = time.perf_counter()
        if run == 0:
            continue  # warm-up
        sample_s.append(t1 - t0)
        decode_s.append(t2 - t1)
        transformer_s.append(spent[0])
        per_scale.append([b - a for a, b in zip([t0, *marks[:-1]], marks)])
        peaks.append(memory.peak_mb)
    med = statistics.median
    return {
        "depth": depth,
        "batch": batch,
        "sample_s": med(sample_s),
        "transformer_s": med(transformer_s),
        "decode_s": med(decode_s),
        "per_image_s": (med(sample_s) + med(decode_s)) / batch,
        "per_scale_s": [med(col) for col in zip(*per_scale)],
        "peak_mb": max(peaks),
        "flops_per_image": flops_per_image(cfg),
        "bytes_per_image": bytes_per_image(var, batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[16])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--tokenizer-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-decode", action="store_true", help="time the scale loop only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rate, bandwidth = matmul_rate(device, dtype), copy_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"device: {device} ({name}), {torch.get_num_threads()} threads, torch {torch.__version__}, generator "
          f"{args.dtype}, tokenizer {args.tokenizer_dtype}")
    print(f"measured matmul rate: {rate / 1e9:.1f} GFLOP/s; copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print("| model | batch | sample s | of which transformer s | decode s | s/image | img/s | floor s/image "
          "(FLOPs / bytes) | loop / floor | peak MB | per-scale s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for depth in args.depth:
        for batch in args.batch:
            r = bench(depth, batch, args.runs, device, dtype, not args.no_decode, getattr(torch, args.tokenizer_dtype))
            compute, traffic = r["flops_per_image"] / rate, r["bytes_per_image"] / bandwidth
            floor = max(compute, traffic)
            scales = " ".join(f"{s:.2f}" for s in r["per_scale_s"])
            print(
                f"| d{depth} | {batch} | {r['sample_s']:.2f} | {r['transformer_s']:.2f} | {r['decode_s']:.2f} | "
                f"{r['per_image_s']:.2f} | {1 / r['per_image_s']:.2f} | {floor:.2f} ({compute:.2f} / {traffic:.2f}) | "
                f"{r['sample_s'] / batch / floor:.2f} | {r['peak_mb']:.0f} | {scales} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
