"""The embedded model's recipe: one command retrains ``nextscale-embedded`` from scratch and writes its card.

    python -m training.embedded                  # everything into runs/embedded/
    python -m training.embedded --install        # ... then copy the four files into weights/

The steps are those that produced the shipped files (:data:`RECIPE`):

1. ``tokenizer``: the multi-scale VQ-VAE (training/train_tokenizer.py);
2. ``generator``: the VAR transformer on that tokenizer's codes (training/train_generator.py), one cosine schedule;
3. ``evaluate``: the measurements of training/evaluate.py, written into the card ``nextscale_embedded.json``;
4. ``control``: the edge-control adapter on the frozen generator (training/train_control.py).

Every step resumes from its run folder (``runs/embedded/<step>/last.pt``) and is skipped once its output exists, so
an interrupted run continues where it stopped. Batches are a pure function of (seed, step), so a rerun reproduces
the metrics within the noise of floating-point reductions. ``--only STEP`` runs one step (its inputs must exist).
An existing output is first checked against what its step builds (:func:`foreign_fields`): one left by an earlier
recipe, a generator of another depth say, stops the run with the file and the differing fields named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import common

# (step, trainer module, its options); the run folder, the inputs and --out are added by :func:`commands`.
RECIPE: list[tuple[str, str, list[str]]] = [
    ("tokenizer", "training.train_tokenizer",
     ["--ch-mult", "1,1,2,4", "--patch-nums", "1,2,3,4,5,6,8", "--steps", "6000", "--lr", "6e-4",
      "--precision", "bf16", "--export-dtype", "float16"]),
    ("generator", "training.train_generator",
     ["--depth", "8", "--shared-aln", "--embed-dim", "256", "--num-heads", "4", "--train-count", "120000",
      "--steps", "23000", "--precision", "bf16", "--export-dtype", "float16"]),
    # at the sampler's default cfg 4 (the official VAR demo's) and again at cfg 2, where this model's samples match
    # its data best (bench/RESULTS.md, cfg 1.5 to 5), as VAR reports its FID at cfg 1.5 and samples its demo at 4
    ("evaluate", "training.evaluate", ["--per-class", "50", "--repeats", "4", "--threads", "1", "--also-cfg", "2"]),
    ("control", "training.train_control",
     ["--control", "edges", "--kind", "add", "--layers", "0,1,2,3,4,5,6,7", "--steps", "1500", "--precision", "bf16"]),
]
STEPS = tuple(name for name, _, _ in RECIPE)
# the output of each step (a key of :func:`outputs`); a step is skipped once it exists
TARGET = {"tokenizer": "tokenizer", "generator": "generator", "evaluate": "card", "control": "control"}

# the names under weights/ (nodes/model_files.py and nodes/control.py look for these)
SHIPPED = {"tokenizer": "nextscale_tokenizer.safetensors", "generator": "nextscale_generator.safetensors",
           "control": "nextscale_control_edges.safetensors", "card": "nextscale_embedded.json"}


def outputs(run_dir: str) -> dict[str, str]:
    return {"tokenizer": os.path.join(run_dir, "tokenizer.safetensors"),
            "generator": os.path.join(run_dir, "generator.safetensors"),
            "control": os.path.join(run_dir, "control_edges.safetensors"),
            "eval": os.path.join(run_dir, "eval.json"),
            "card": os.path.join(run_dir, "nextscale_embedded.json"),
            "samples": os.path.join(run_dir, "samples.png")}


def commands(run_dir: str) -> list[tuple[str, str, list[str]]]:
    """``(step, module, argv)`` of every step in order, wired to each other's outputs under ``run_dir``."""
    out = outputs(run_dir)
    tok, gen = ["--tokenizer", out["tokenizer"]], ["--generator", out["generator"]]
    inputs = {"tokenizer": [], "generator": tok, "evaluate": tok + gen, "control": gen + tok}
    results = {name: ["--run-dir", os.path.join(run_dir, name), "--out", out[TARGET[name]]]
               for name in ("tokenizer", "generator", "control")}
    results["evaluate"] = ["--out", out["eval"], "--grid", out["samples"]]
    return [(name, module, inputs[name] + opts + results[name]) for name, module, opts in RECIPE]


def shell_lines(run_dir: str) -> list[str]:
    """The recipe as shell commands (from the repository root), for the card and the README."""
    rel = os.path.relpath(run_dir, common.repo_root())
    return [f"python -m {module} " + " ".join(argv) for _, module, argv in commands(rel)]


def card_metrics(res: dict) -> dict:
    """The flat metrics of the card from :func:`training.evaluate.evaluate`'s nested result."""
    tok, gen = res["tokenizer"], res["generator"]
    def r(v, n=3):
        return round(float(v), n)

    def draws(d: dict) -> dict:  # a set of draws of training.evaluate (its ``repeats`` or one of ``at_cfg``)
        return {"frechet_ratio_mean_of_draws": r(d["frechet_ratio_mean"], 2),
                "frechet_ratio_draws": [r(v, 2) for v in d["frechet_ratio"]],
                "class_accuracy_draws": [r(v) for v in d["class_accuracy"]]}

    return {
        "tokenizer_psnr_db": r(tok["psnr"], 2),
        "tokenizer_psnr_of_mean_mse_db": r(tok["psnr_of_mean_mse"], 2),
        "classifier_accuracy_on_round_trips": r(tok["classifier_accuracy_on_round_trips"]),
        "frechet_round_trips_vs_real": r(tok["frechet_round_trips_vs_real"]),
        "frechet_floor_round_trips": r(tok["frechet_floor_real_vs_real"]),
        "class_accuracy": r(gen["class_accuracy"]),
        "per_class_accuracy": [r(v, 2) for v in gen["per_class_accuracy"]],
        "frechet_distance": r(gen["frechet_distance"]),
        "frechet_floor_real_vs_real": r(gen["frechet_floor_real_vs_real"]),
        "frechet_ratio": r(gen["frechet_ratio"], 2),
        "frechet_share_per_class": [r(v, 2) for v in gen.get("frechet_share_per_class", [])],
        **(draws(gen["repeats"]) if "repeats" in gen else {}),
        **({"at_other_cfg": [{"cfg": a["cfg"], **draws(a)} for a in gen["at_cfg"]]} if "at_cfg" in gen else {}),
        "diversity_ratio_mean": r(gen["diversity_ratio_mean"], 2),
        "diversity_ratio_min": r(min(g / max(x, 1e-9) for g, x in zip(gen["diversity_generated"],
                                                                       gen["diversity_real"])), 2),
        "sampling_4_images_s_1_thread": r(res["timing_4_images"]["median_s"]),
        "evaluated_images": gen["num_generated"],
        "measured_on": f"{_machine()}, {time.strftime('%Y-%m-%d')}",
    }


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU, no GPU"


def _write_card(run_dir: str) -> None:
    from training import evaluate as ev

    o = outputs(run_dir)
    with open(o["eval"], encoding="utf-8") as f:
        res = json.load(f)
    ev.write_card(o["card"], o["tokenizer"], o["generator"], card_metrics(res),
                  ev.SamplingOptions(**res["generator"]["options"]),
                  ["python -m training.embedded  # runs the lines below in order, resumable", *shell_lines(run_dir)])


def foreign_fields(name: str, path: str, argv: list[str]) -> list[str]:
    """How the config stored in ``path``, an existing output of step ``name``, differs from what the step builds
    from ``argv`` (its architecture options only); empty when they agree or the step writes no model."""
    import importlib

    if name not in ("tokenizer", "generator", "control"):
        return []
    module = {n: m for n, m, _ in RECIPE}[name]
    args = importlib.import_module(module).build_parser().parse_args(argv)
    if name == "tokenizer":
        from training.train_tokenizer import config_from_args

        want = config_from_args(args).to_dict()
    elif name == "generator":
        want = {k: getattr(args, k) for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "shared_aln")}
    else:
        from training.train_control import _ints  # how train_control reads --layers

        want = {"control_type": args.control, "kind": args.kind}
        if args.layers:
            want["layers"] = _ints(args.layers)
    want = json.loads(json.dumps(want))  # tuples as the stored JSON has them
    common.import_pack()
    from nextscale.models.core.checkpoint import CONFIG_METADATA_KEY, read_safetensors_metadata

    have = json.loads(read_safetensors_metadata(path).get(CONFIG_METADATA_KEY, "{}"))
    return [f"{k} {have.get(k)!r}, the recipe's {v!r}" for k, v in want.items() if have.get(k) != v]


def run(run_dir: str, only: str | None = None) -> dict[str, str]:
    """Runs the recipe's missing steps into ``run_dir`` (``only``: that step alone); returns :func:`outputs`."""
    import importlib

    import torch

    if only is not None and only not in STEPS:
        raise SystemExit(f"--only {only!r}: choose one of {list(STEPS)}")
    out = outputs(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    threads = torch.get_num_threads()  # evaluate times sampling on one thread; the trainers use them all
    for name, module, argv in commands(run_dir):
        if only is not None and name != only:
            continue
        target = out[TARGET[name]]
        if os.path.isfile(target) and only is None:
            differs = foreign_fields(name, target, argv)
            if differs:
                raise SystemExit(f"{target} exists but is not what this recipe's {name} step builds "
                                 f"({'; '.join(differs)}): it comes from an earlier recipe. Move the run folder "
                                 f"away or pass another --run-dir")
            print(f"[embedded] {name}: {target} exists, skipped", flush=True)
            continue
        torch.set_num_threads(threads)
        print(f"[embedded] python -m {module} {' '.join(argv)}", flush=True)
        importlib.import_module(module).main(argv)
        if name == "evaluate":
            _write_card(run_dir)
    return out


def install(run_dir: str, weights_dir: str | None = None) -> list[str]:
    """Copies the recipe's outputs over the shipped files in ``weights/``; returns the paths written."""
    return common.install(outputs(run_dir), SHIPPED, "python -m training.embedded", weights_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Retrain the embedded model (nextscale-embedded) from scratch")
    ap.add_argument("--run-dir", default=os.path.join(common.repo_root(), "runs", "embedded"))
    ap.add_argument("--only", default=None, help=f"run this step only: one of {', '.join(STEPS)}")
    ap.add_argument("--install", action="store_true", help="copy the results into weights/ at the end")
    ap.add_argument("--print", action="store_true", help="print the recipe's commands and exit")
    args = ap.parse_args(argv)
    if args.print:
        print("\n".join(shell_lines(args.run_dir)))
        return
    run(args.run_dir, args.only)
    if args.install:
        for path in install(args.run_dir):
            print(f"[embedded] installed {path}")


if __name__ == "__main__":
    main()
