"""Distilled Decoding against VAR at the same depth: time to tokens of one and two DD steps and of VAR's ten-scale
loop, on random weights of the official sizes.

    python bench/bench_dd.py --depth 16 --batch 1 --runs 3 [--threads 1] [--device cpu] [--dtype float32]

Per run, the three are timed back to back (VAR, DD one step, DD two steps), so that a load change on a shared
machine hits all three alike; reported are each one's median over ``--runs`` (after one warm-up of each) and the
ratios of the medians. VAR samples with its default options (guidance on: 2B rows through a KV cache, ten scales);
DD runs B rows through the whole sequence once per step (no guidance: it was distilled in). Both end with the
latent ``f_hat``; the tokenizer's decode, the same for both, is not timed. Not a test: numbers go to
bench/RESULTS.md with the device, command and date.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from packbootstrap import register_pack

register_pack()

from bench_sampler import sync  # noqa: E402
from nextscale.models.dd.model import DDConfig, DistilledVAR  # noqa: E402
from nextscale.models.dd.sampler import DDOptions, official_split, sample_dd  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.sampler import sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with torch.device(device):
        tok = MultiScaleVQVAE(TokenizerConfig()).eval()
        var = VAR(VARConfig.official(args.depth)).to(dtype).eval()
        dd = DistilledVAR(DDConfig.official(args.depth)).to(dtype).eval()
    labels = torch.arange(args.batch, device=device) % 1000
    split = official_split(args.depth)
    runs = {
        "VAR (10 scales, cfg)": lambda: sample(var, tok, labels, seed=0),
        "DD 1 step": lambda: sample_dd(dd, tok, labels, seed=0, options=DDOptions(steps=(0,), split=split)),
        "DD 2 steps": lambda: sample_dd(dd, tok, labels, seed=0, options=DDOptions(steps=(0, split), split=split)),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for r in range(args.runs + 1):
            for name, run in runs.items():
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    cpu = platform.processor() or platform.machine()
    print(f"# depth {args.depth}, batch {args.batch}, {args.dtype}, {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {cpu}; medians of {args.runs} interleaved runs")
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians["VAR (10 scales, cfg)"]
    for name, m in medians.items():
        spread = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:22s} {m:8.2f} s  (runs {spread})  VAR / this = {base / m:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
