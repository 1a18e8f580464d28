"""Collaborative decoding (CoDe) against the plain sampler: time and peak memory, random weights of official sizes.

    python bench/bench_code.py                       # d30 drafter + d16 refiner, N = 6 7 8 9, batch 1, CPU
    python bench/bench_code.py --draft 6 8 --batch 16 --runs 3 --device cuda --dtype bfloat16

Both generators are built once (meta device, then O(1)-scale random weights) with the official
tokenizer's quantizer (vocabulary 4096, 32 channels, 256-px schedule). For each configuration: ``--warmup``
untimed runs (default 1), then the median of ``--runs`` runs of sampling (transformer, guidance, top-k/top-p,
next-scale inputs; no decode).
Peak memory: on CPU the largest RSS seen by a 2 ms sampler thread during the runs minus the RSS before them
(activations and KV caches; the weights are listed apart), on GPU the allocator peak minus the memory before.
Not a test: numbers go to bench/RESULTS.md with the device, command and date.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from packbootstrap import register_pack

register_pack()

from bench_sampler import randomise_  # noqa: E402
from nextscale.models.var.collaborative import sample_collaborative  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions, sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def build(depth: int, device: torch.device, dtype: torch.dtype, seed: int) -> VAR:
    """An official-size generator with random weights, without upstream's slow truncated-normal init."""
    cfg = VARConfig.official(depth)
    with torch.device("meta"):
        var = VAR(cfg)
    var = var.to_empty(device="cpu")
    with torch.no_grad():
        for name, t in VAR.rebuilt_buffers(cfg).items():
            var.get_buffer(name).copy_(t)
    randomise_(var, seed)
    return var.to(device=device, dtype=dtype).eval().requires_grad_(False)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Largest RSS seen while the block runs (polled every 2 ms)."""

    def __enter__(self):
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def measure(fn, runs: int, device: torch.device, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, peak extra memory MiB) of ``fn()`` after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as mem:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    extra = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else (mem.peak - mem.start)
    return statistics.median(times), extra / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", type=int, default=30)
    ap.add_argument("--refiner", type=int, default=16)
    ap.add_argument("--draft", type=int, nargs="+", default=[6, 7, 8, 9])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs first (0 on a slow CPU)")
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    t0 = time.perf_counter()
    drafter = build(args.drafter, device, dtype, seed=0)
    refiner = build(args.refiner, device, dtype, seed=1)
    vae = MultiScaleVQVAE(TokenizerConfig(patch_nums=drafter.patch_nums)).to(device).eval().requires_grad_(False)
    weights = {d: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20 for d, m in
               ((args.drafter, drafter), (args.refiner, refiner))}
    print(f"# built d{args.drafter} + d{args.refiner} in {time.perf_counter() - t0:.0f} s; weights MiB: {weights}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.device} {args.dtype}, batch {args.batch}, cfg {args.cfg}, "
          f"runs {args.runs}")

    labels = torch.arange(args.batch, device=device) % 1000
    opts = SamplingOptions(cfg=args.cfg, top_k=600, top_p=0.95, temperature=[1.1] * 7 + [1.0] * 3)
    plain = lambda var: lambda: sample(var, vae, labels, seed=0, options=opts)  # noqa: E731
    rows = [("plain", f"d{args.drafter}", *measure(plain(drafter), args.runs, device, args.warmup))]
    for N in args.draft:
        fn = lambda N=N: sample_collaborative(drafter, refiner, vae, labels, draft_scales=N, seed=0, options=opts)  # noqa: E731
        rows.append((f"CoDe N={N}", f"d{args.drafter}+d{args.refiner}", *measure(fn, args.runs, device, args.warmup)))
    rows.append(("plain", f"d{args.refiner}", *measure(plain(refiner), args.runs, device, args.warmup)))

    base_t, base_m = rows[0][2], rows[0][3]
    print("| sampler | models | seconds / batch | speed-up | peak extra memory MiB | vs plain |")
    print("|---|---|---|---|---|---|")
    for name, models, secs, mem in rows:
        print(f"| {name} | {models} | {secs:.2f} | {base_t / secs:.2f}x | {mem:.0f} | {mem / base_m:.2f}x |")


if __name__ == "__main__":
    main()
