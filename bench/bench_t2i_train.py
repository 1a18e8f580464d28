"""Step time of the text-to-image generator trainer (training/train_t2i.py), this tree against a baseline tree,
interleaved so that both see the same load.

    OMP_NUM_THREADS=1 python bench/bench_t2i_train.py --baseline /tmp/nextscale-main \\
        --data-dir runs/t2i/data --tokenizer runs/t2i/tokenizer.safetensors --rounds 3 --steps 6

``--baseline``: another checkout of the repository (e.g. ``git archive <commit> | tar -x -C <dir>``). The real
trainer runs with the recipe's sizes on one thread, ``--steps`` steps from a fresh run folder per run, the baseline
then this tree in each round. Both read one token cache (``--tokens``, a ``tokens_*.npz`` the trainer wrote for
this tokenizer and data; by default encoded once beforehand by this tree), so no timed run encodes images. A step's
time is the gap between the log records of consecutive steps (``--log-every 1``); the first step (warm-up) is left
out. Prints every run's step times and the median of each tree. Not a test: numbers go to bench/RESULTS.md with the
CPU, the load and the command.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def trainer(tree: str, run_dir: str, args, steps: int) -> list[float]:
    """Run the trainer of ``tree`` for ``steps`` steps (0: only the token cache) and return its step times."""
    cmd = [sys.executable, "-m", "training.train_t2i", "--data-dir", args.data_dir, "--tokenizer", args.tokenizer,
           "--run-dir", run_dir, "--resume", "none", "--threads", "1", "--no-progress", "--log-every", "1",
           *(["--stop-after", str(steps)] if steps else ["--steps", "0"])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        times = [r["time"] for r in map(json.loads, f) if r["kind"] == "train"]
    return [round(b - a, 2) for a, b in itertools.pairwise(times)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a checkout of the code to compare against")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tokens", default=None, help="the trainer's token cache of this tokenizer and data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    args.data_dir, args.tokenizer = os.path.abspath(args.data_dir), os.path.abspath(args.tokenizer)
    work = tempfile.mkdtemp(prefix="bench_t2i_train_")
    try:
        if args.tokens:
            tokens = [os.path.abspath(args.tokens)]
        else:
            cache_dir = os.path.join(work, "cache")
            trainer(str(ROOT), cache_dir, args, 0)
            tokens = glob.glob(os.path.join(cache_dir, "tokens_*.npz"))
        trees = {"baseline": os.path.abspath(args.baseline), "this tree": str(ROOT)}
        results: dict[str, list[float]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, tree in trees.items():
                run_dir = os.path.join(work, f"{r}_{name.replace(' ', '_')}")
                os.makedirs(run_dir)
                for t in tokens:
                    os.symlink(t, os.path.join(run_dir, os.path.basename(t)))
                step_times = trainer(tree, run_dir, args, args.steps)
                results[name] += step_times
                print(f"round {r + 1} {name}: {', '.join(f'{t:.2f}' for t in step_times)} s", flush=True)
                shutil.rmtree(run_dir)
        medians = {name: statistics.median(times) for name, times in results.items()}
        for name, m in medians.items():
            print(f"{name}: median {m:.2f} s per step over {len(results[name])} steps")
        print(f"speed-up {medians['baseline'] / medians['this tree']:.2f}x; load average {os.getloadavg()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
