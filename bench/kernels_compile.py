"""Compile every Triton kernel config for real GPUs, with no GPU, and print what each needs.

    python bench/kernels_compile.py                         # the full matrix: every kernel, dtype, config, GPU
    python bench/kernels_compile.py --matrix ci             # what tests/test_triton_compile.py compiles
    python bench/kernels_compile.py --archs 86 --kernels interval --dtypes bf16
    python bench/kernels_compile.py --json --shard 0/2      # one JSON object per compile (the test's workers)

For each case of :func:`kernels.triton_compile.cases` (kernel, dtype, head dim, config) and each target
(``sm_80``, ``sm_86``, ``sm_89``, ``sm_90``) it compiles PTX and a cubin with Triton's compiler and bundled
``ptxas`` (:mod:`kernels.triton_compile`) and reports the shared memory per block against the target's limit,
and, from the bundled ``cuobjdump -res-usage``, the registers per thread and the stack frame per thread (register
spills). ``--matrix ci`` is the full matrix on ``sm_86`` and ``sm_90`` (the tightest and the largest shared
memory) and, per kernel, the case with the largest tiles on ``sm_80`` and ``sm_89``. Compiles use a fresh
Triton cache in a temporary folder unless ``TRITON_CACHE_DIR`` is set. Exit status 1 when a compile fails or a
tile has no stage count that fits a target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off"):
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="nextscale-triton-cache-"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from packbootstrap import register_pack  # noqa: E402

register_pack(ROOT)

import triton  # noqa: E402
from nextscale.kernels.triton_compile import (  # noqa: E402
    DTYPES,
    HEAD_DIMS,
    KERNELS,
    SHARED_MEMORY_LIMITS,
    Case,
    cases,
    compile_case,
)

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def footprint(case: Case) -> int:
    """Bytes of the tiles a block holds with its pipelining stages: what makes one case the largest."""
    elem = DTYPES[case.dtype].itemsize
    width = max(16, triton.next_power_of_2(case.dim))
    rows, cols = case.blocks
    if case.kernel == "nearest_code":
        return (rows * width + width * cols * case.num_stages) * elem
    return (rows * width + 2 * cols * width * case.num_stages) * elem


def largest(candidates: list[Case]) -> list[Case]:
    """Per kernel and dtype, the case with the largest tiles."""
    keys = dict.fromkeys((c.kernel, c.dtype) for c in candidates)
    return [max((c for c in candidates if (c.kernel, c.dtype) == key), key=footprint) for key in keys]


def matrix(name: str, archs, kernels, dtypes) -> list[tuple[Case, int]]:
    """``full``: every case on every target. ``ci`` (33 compiles, under a minute on two cores): on sm_86 (the
    tightest limit; sm_80 and sm_89 share its code generation) every config at head dim 128 (the larger tiles) in
    bf16 and fp32 (fp16 tiles are bf16's); on sm_90 (Hopper's code generation) the largest case per kernel and
    dtype; on sm_80 and sm_89 the largest case per kernel."""
    every = cases(kernels, dtypes)
    if name == "full":
        return [(case, arch) for arch in archs for case in every]
    wide = [c for c in every if c.kernel == "nearest_code" or c.dim == max(HEAD_DIMS)]
    work = []
    for arch in archs:
        if arch == 86:
            work += [(c, arch) for c in wide if c.dtype != "fp16"]
        elif arch == 90:
            work += [(c, arch) for c in largest(wide)]
        else:
            per_kernel = {c.kernel: c for c in sorted(largest(wide), key=footprint)}
            work += [(c, arch) for c in per_kernel.values()]
    return work


def resources(cubin: bytes) -> dict:
    """``REG`` (registers per thread) and ``STACK`` (stack frame per thread: spills) from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK):(\d+)", text)}


def run_one(case: Case, arch: int, with_resources: bool) -> dict:
    record = {"label": case.label, **case.__dict__, "blocks": list(case.blocks), "arch": arch,
              "limit": SHARED_MEMORY_LIMITS[arch]}
    try:
        compiled = compile_case(case, arch)
    except Exception as e:  # reported, not raised: one failure must not hide the others
        return {**record, "error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
    record.update(shared=compiled.shared, fits=compiled.fits, seconds=round(compiled.seconds, 2))
    if with_resources:
        record.update(resources(compiled.cubin))
    return record


def tiles_without_a_fit(records: list[dict]) -> list[str]:
    """Tiles (a case less its stage count) none of whose stage counts fits a target: pruning would have nothing."""
    fitting: dict[tuple, bool] = {}
    for r in records:
        if "error" not in r:
            key = (r["kernel"], r["dtype"], r["dim"], tuple(r["blocks"]), r["num_warps"], r["arch"])
            fitting[key] = fitting.get(key, False) or r["fits"]
    return [f"{k[0]} {k[1]} d{k[2]} {k[3][0]}x{k[3][1]} w{k[4]} on sm_{k[5]}" for k, ok in fitting.items() if not ok]


def print_table(records: list[dict]) -> None:
    print("| kernel | dtype | head dim | tile | warps | stages | target | shared KiB (limit) | registers | "
          "stack B (spills) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        tile = f"{r['blocks'][0]}x{r['blocks'][1]}"
        config = f"{tile} | {r['num_warps']} | {r['num_stages']}"
        head = f"| {r['kernel']} | {r['dtype']} | {r['dim']} | {config} | sm_{r['arch']} "
        if "error" in r:
            print(head + f"| FAILED: {r['error'].splitlines()[0]} | | | |")
            continue
        shared = f"{r['shared'] / 1024:.1f} ({r['limit'] // 1024})" + ("" if r["fits"] else " too large")
        print(head + f"| {shared} | {r.get('REG', '')} | {r.get('STACK', '')} | {r['seconds']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", choices=("full", "ci"), default="full")
    parser.add_argument("--archs", default=",".join(map(str, SHARED_MEMORY_LIMITS)))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th case from the i-th")
    parser.add_argument("--json", action="store_true", help="one JSON object per compile instead of the table")
    parser.add_argument("--no-resources", action="store_true", help="skip cuobjdump (registers, spills)")
    args = parser.parse_args()
    archs = [int(a) for a in args.archs.split(",")]
    unknown = set(archs) - set(SHARED_MEMORY_LIMITS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {sorted(SHARED_MEMORY_LIMITS)}")
    index, count = (int(x) for x in args.shard.split("/"))
    work = matrix(args.matrix, archs, args.kernels.split(","), args.dtypes.split(","))[index::count]
    records = []
    for case, arch in work:
        record = run_one(case, arch, not args.no_resources)
        records.append(record)
        if args.json:
            print(json.dumps(record), flush=True)
    if not args.json:
        print(f"Triton {triton.__version__}; {len(records)} compiles\n")
        print_table(records)
    failed = [r["label"] + f" sm_{r['arch']}" for r in records if "error" in r]
    no_fit = tiles_without_a_fit(records)
    for line in failed + no_fit:
        print(("compile failed: " if line in failed else "no stage count fits: ") + line, file=sys.stderr)
    return 1 if failed or no_fit else 0


if __name__ == "__main__":
    sys.exit(main())
