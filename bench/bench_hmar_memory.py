"""HMAR's keys and values against VAR's full KV cache, and the weights of both, for the released depths (computed from
the configs on the ``meta`` device; nothing is downloaded or allocated).

    python bench/bench_hmar_memory.py [--batch 1] [--dtype bfloat16]

Per depth: VAR's full cache (every layer keeps every token of the 256 px schedule, 680, for the run), HMAR's most
keys and values at once (one layer's, for the largest scale's 256 tokens; :func:`markovian_kv_bytes`), both for the
batch with its guidance rows; and the weights of VAR-d and HMAR-d (whose mask branch adds 8 blocks).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

from nextscale.models.core.family import KVGeometry  # noqa: E402
from nextscale.models.core.memory import size, weight_bytes  # noqa: E402
from nextscale.models.hmar.family import markovian_kv_bytes  # noqa: E402
from nextscale.models.hmar.model import HMAR, HMARConfig  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402

RELEASED = (16, 20, 24, 30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = 2 * args.batch
    print(f"# batch {args.batch} with CFG ({rows} rows), {args.dtype}")
    print("| depth | VAR full KV cache | HMAR keys and values | ratio | VAR weights | HMAR weights |")
    print("|---|---|---|---|---|---|")
    for depth in RELEASED:
        hmar_cfg = HMARConfig.official(depth)
        geometry = KVGeometry(depth, hmar_cfg.num_heads, hmar_cfg.head_dim, hmar_cfg.patch_nums)
        full, markovian = geometry.cache_bytes(rows, dtype.itemsize), markovian_kv_bytes(geometry, rows, dtype.itemsize)
        with torch.device("meta"):
            var_weights = weight_bytes(VAR(VARConfig.official(depth)), dtype)
            hmar_weights = weight_bytes(HMAR(hmar_cfg), dtype)
        print(f"| d{depth} | {size(full)} | {size(markovian)} | {full / markovian:.0f}x | {size(var_weights)} | "
              f"{size(hmar_weights)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
