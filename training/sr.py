"""The embedded super-resolution model's recipe: one command trains the small NSARM on the text-to-image set's
tokenizer and images, measures it against bicubic and writes the card.

    python -m training.sr --run-dir runs/sr                  # needs runs/t2i (data, tokenizer.safetensors)
    python -m training.sr --run-dir runs/sr --t2i-dir /path/to/t2i --threads 1
    python -m training.sr --print                            # the commands, one per step

The steps (:data:`RECIPE`), each resumable from its run folder and skipped once its output exists:

1. ``model``: training/train_sr.py -> ``<run>/nextscale_sr.safetensors`` (checkpoints in ``<run>/model/``);
2. ``evaluate``: training/sr_evaluate.py -> ``<run>/eval.json`` and the card ``<run>/nextscale_sr.json``.

The inputs are the text-to-image recipe's (training/t2i.py): its rendered set ``<t2i>/data`` and its tokenizer
``<t2i>/tokenizer.safetensors``, read only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import common

# (step, module, its options); the folders, inputs and outputs are added by commands().
RECIPE: list[tuple[str, str, list[str]]] = [
    ("model", "training.train_sr", ["--steps", "8000"]),
    ("evaluate", "training.sr_evaluate", []),
]
STEPS = tuple(name for name, _, _ in RECIPE)


def outputs(run_dir: str) -> dict[str, str]:
    return {"model": os.path.join(run_dir, "nextscale_sr.safetensors"),
            "eval": os.path.join(run_dir, "eval.json"),
            "card": os.path.join(run_dir, "nextscale_sr.json")}


def inputs(t2i_dir: str) -> dict[str, str]:
    return {"data": os.path.join(t2i_dir, "data"), "tokenizer": os.path.join(t2i_dir, "tokenizer.safetensors")}


def commands(run_dir: str, t2i_dir: str, threads: int = 0, extra: dict[str, list[str]] | None = None
             ) -> list[tuple[str, str, list[str]]]:
    """``(step, module, argv)`` of every step in order, wired to the inputs and each other's outputs; ``extra``
    appends options per step."""
    out, src = outputs(run_dir), inputs(t2i_dir)
    shared = ["--data-dir", src["data"], "--tokenizer", src["tokenizer"]]
    if threads:
        shared += ["--threads", str(threads)]
    wiring = {
        "model": [*shared, "--run-dir", os.path.join(run_dir, "model"), "--out", out["model"]],
        "evaluate": [*shared, "--model", out["model"], "--run-dir", os.path.join(run_dir, "evaluate"),
                     "--out", out["eval"]],
    }
    extra = extra or {}
    return [(name, module, wiring[name] + opts + extra.get(name, [])) for name, module, opts in RECIPE]


def shell_lines(run_dir: str, t2i_dir: str) -> list[str]:
    """The recipe as shell commands (from the repository root), for the card and the docs."""
    root = common.repo_root()
    return [f"python -m {module} " + " ".join(argv)
            for _, module, argv in commands(os.path.relpath(run_dir, root), os.path.relpath(t2i_dir, root))]


def run(run_dir: str, t2i_dir: str, threads: int = 0, extra: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Runs the recipe's missing steps into ``run_dir``; returns :func:`outputs`."""
    missing = [p for p in inputs(t2i_dir).values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} missing: run the text-to-image recipe first "
                         f"(python -m training.t2i --run-dir {t2i_dir} --only data / --only tokenizer)")
    os.makedirs(run_dir, exist_ok=True)
    out = outputs(run_dir)
    for name, module, argv in commands(run_dir, t2i_dir, threads, extra):
        target = out["model"] if name == "model" else out["card"]
        if os.path.isfile(target):
            print(f"[sr] {name}: done, skipped", flush=True)
            continue
        print(f"[sr] python -m {module} {' '.join(argv)}", flush=True)
        importlib.import_module(module).main(argv)
        if name == "evaluate":
            from training import sr_evaluate

            with open(out["eval"], encoding="utf-8") as f:
                result = json.load(f)
            files = {"model": out["model"], "tokenizer": inputs(t2i_dir)["tokenizer"]}
            sr_evaluate.write_card(out["card"], result, files,
                                   ["python -m training.sr  # runs the lines below in order, resumable",
                                    *shell_lines(run_dir, t2i_dir)])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train and measure the embedded super-resolution model")
    ap.add_argument("--run-dir", default=os.path.join(common.repo_root(), "runs", "sr"))
    ap.add_argument("--t2i-dir", default=os.path.join(common.repo_root(), "runs", "t2i"),
                    help="the text-to-image run folder: its data/ and tokenizer.safetensors are the inputs")
    ap.add_argument("--threads", type=int, default=0, help="threads of every step (0: torch's default)")
    ap.add_argument("--print", action="store_true", help="print the recipe's commands and exit")
    args = ap.parse_args(argv)
    if args.print:
        print("\n".join(shell_lines(args.run_dir, args.t2i_dir)))
        return
    run(args.run_dir, args.t2i_dir, args.threads)


if __name__ == "__main__":
    main()
