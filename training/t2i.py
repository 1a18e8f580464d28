"""The embedded text-to-image model's recipe: one command renders the data, trains the tokenizer, trains the T5
encoder and the generator together, measures them and writes the card.

    python -m training.t2i                           # everything into runs/t2i/
    python -m training.t2i --run-dir /path/to/run    # elsewhere (a run of hours: keep it out of a temporary tree)
    python -m training.t2i --only generator          # one step (its inputs must exist)
    python -m training.t2i --print                   # the commands, one per step
    python -m training.t2i --install                 # everything, then copy the three files and the card to weights/

The steps (:data:`RECIPE`), each resumable from its run folder and skipped once its output exists:

1. ``data``: the rendered set (training/t2i_data.py) into ``<run>/data/``; needs the Debian packages
   ``openclipart-png`` and ``fonts-noto-color-emoji`` (``bash scripts/setup.sh --t2i-data``);
2. ``tokenizer``: the BSQ tokenizer (training/train_bsq.py) -> ``<run>/tokenizer.safetensors``;
3. ``generator``: T5 encoder + Infinity transformer (training/train_t2i.py) -> ``<run>/generator.safetensors`` and
   ``<run>/text_encoder.safetensors``;
4. ``evaluate``: training/t2i_evaluate.py -> ``<run>/eval.json``, ``<run>/prompts.png`` and the card
   ``<run>/nextscale_t2i.json``.

An existing output that another recipe built (other architecture fields in its stored config) stops the run with
the file and the fields named. The trainers run on every thread unless ``--threads`` says otherwise; the evaluation
times sampling on one thread whatever the setting.
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

# (step, module, its options); the run folder, the data folder, the inputs and the outputs are added by commands().
RECIPE: list[tuple[str, str, list[str]]] = [
    ("data", "training.t2i_data", []),
    ("tokenizer", "training.train_bsq", ["--steps", "9000"]),
    ("generator", "training.train_t2i", ["--steps", "8000"]),
    ("evaluate", "training.t2i_evaluate", ["--cfg", "3", "--also-cfg", "1.5"]),
]
STEPS = tuple(name for name, _, _ in RECIPE)
# the architecture fields of each model step's stored config, and the options they come from
ARCHITECTURE = {
    "tokenizer": ("codebook_dim", "base_ch", "ch_mult", "num_res_blocks"),
    "generator": ("depth", "embed_dim", "num_heads", "hidden_dim", "token_dim", "text_dim", "text_maxlen"),
}


# the recipe's outputs under the names the loaders look for in weights/ (nodes/model_files.py)
SHIPPED = {"tokenizer": "nextscale_t2i_tokenizer.safetensors", "generator": "nextscale_t2i_generator.safetensors",
           "text_encoder": "nextscale_t2i_text_encoder.safetensors", "card": "nextscale_t2i.json"}


def outputs(run_dir: str) -> dict[str, str]:
    return {"data": os.path.join(run_dir, "data"),
            "tokenizer": os.path.join(run_dir, "tokenizer.safetensors"),
            "generator": os.path.join(run_dir, "generator.safetensors"),
            "text_encoder": os.path.join(run_dir, "text_encoder.safetensors"),
            "eval": os.path.join(run_dir, "eval.json"),
            "grid": os.path.join(run_dir, "prompts.png"),
            "card": os.path.join(run_dir, "nextscale_t2i.json")}


def commands(run_dir: str, threads: int = 0) -> list[tuple[str, str, list[str]]]:
    """``(step, module, argv)`` of every step in order, wired to each other's outputs under ``run_dir``."""
    out = outputs(run_dir)
    data = ["--data-dir", out["data"]]
    thread = ["--threads", str(threads)] if threads else []
    wiring = {
        "data": data,
        "tokenizer": [*data, "--run-dir", os.path.join(run_dir, "tokenizer"), "--out", out["tokenizer"], *thread],
        "generator": [*data, "--tokenizer", out["tokenizer"], "--run-dir", os.path.join(run_dir, "generator"),
                      "--out", out["generator"], "--text-encoder-out", out["text_encoder"], *thread],
        "evaluate": [*data, "--tokenizer", out["tokenizer"], "--generator", out["generator"], "--text-encoder",
                     out["text_encoder"], "--run-dir", os.path.join(run_dir, "evaluate"), "--out", out["eval"],
                     "--grid", out["grid"], *thread],
    }
    return [(name, module, wiring[name] + opts) for name, module, opts in RECIPE]


def done(name: str, run_dir: str, argv: list[str]) -> bool:
    """Whether step ``name``'s output exists (the data step: its cache file for these options)."""
    out = outputs(run_dir)
    if name == "data":
        from training import t2i_data

        args = _parse("data", argv)
        return os.path.isfile(t2i_data.cache_path(args.data_dir, args.data_seed, args.variants, 1,
                                                  t2i_data.RESOLUTION))
    target = {"tokenizer": out["tokenizer"], "generator": out["generator"], "evaluate": out["card"]}[name]
    return os.path.isfile(target)


def _parse(name: str, argv: list[str]) -> argparse.Namespace:
    module = importlib.import_module({n: m for n, m, _ in RECIPE}[name])
    if name == "data":
        from training import t2i_data

        ap = argparse.ArgumentParser()
        t2i_data.add_data_args(ap)
        ap.add_argument("--grid", default=None)
        return ap.parse_args(argv)
    return module.build_parser().parse_args(argv)


def foreign_fields(name: str, run_dir: str, argv: list[str]) -> list[str]:
    """How an existing model output of step ``name`` differs in architecture from what ``argv`` builds."""
    if name not in ARCHITECTURE:
        return []
    common.import_pack()
    from nextscale.models.core.checkpoint import CONFIG_METADATA_KEY, read_safetensors_metadata

    args = _parse(name, argv)
    if name == "tokenizer":
        from training.train_bsq import config_from_args

        want = config_from_args(args).to_dict()
    else:
        from training.train_t2i import configs_from_args

        want = configs_from_args(args, _stored(outputs(run_dir)["tokenizer"])["codebook_dim"])[1].to_dict()
    have = json.loads(read_safetensors_metadata(outputs(run_dir)[name]).get(CONFIG_METADATA_KEY, "{}"))
    want = json.loads(json.dumps(want))
    return [f"{k} {have.get(k)!r}, the recipe's {want[k]!r}" for k in ARCHITECTURE[name] if have.get(k) != want[k]]


def _stored(path: str) -> dict:
    common.import_pack()
    from nextscale.models.core.checkpoint import CONFIG_METADATA_KEY, read_safetensors_metadata

    return json.loads(read_safetensors_metadata(path).get(CONFIG_METADATA_KEY, "{}"))


def shell_lines(run_dir: str) -> list[str]:
    """The recipe as shell commands (from the repository root), for the card and the docs."""
    rel = os.path.relpath(run_dir, common.repo_root())
    return [f"python -m {module} " + " ".join(argv) for _, module, argv in commands(rel)]


def _write_card(run_dir: str) -> None:
    from training import t2i_data
    from training import t2i_evaluate as ev

    out = outputs(run_dir)
    with open(out["eval"], encoding="utf-8") as f:
        result = json.load(f)
    files = {k: out[k] for k in ("tokenizer", "generator", "text_encoder")}
    data_args = _parse("data", commands(run_dir)[0][2])
    meta = t2i_data.T2IData.read(t2i_data.cache_path(data_args.data_dir, data_args.data_seed, data_args.variants, 1,
                                                     t2i_data.RESOLUTION)).meta
    ev.write_card(out["card"], result, files,
                  ["python -m training.t2i  # runs the lines below in order, resumable", *shell_lines(run_dir)], meta)


def run(run_dir: str, only: str | None = None, threads: int = 0) -> dict[str, str]:
    """Runs the recipe's missing steps into ``run_dir`` (``only``: that step alone); returns :func:`outputs`."""
    if only is not None and only not in STEPS:
        raise SystemExit(f"--only {only!r}: choose one of {list(STEPS)}")
    os.makedirs(run_dir, exist_ok=True)
    for name, module, argv in commands(run_dir, threads):
        if only is not None and name != only:
            continue
        if only is None and done(name, run_dir, argv):
            differs = foreign_fields(name, run_dir, argv)
            if differs:
                raise SystemExit(f"{outputs(run_dir)[name]} exists but is not what this recipe's {name} step builds "
                                 f"({'; '.join(differs)}): it comes from another recipe. Move it away or pass "
                                 f"another --run-dir")
            print(f"[t2i] {name}: done, skipped", flush=True)
            continue
        print(f"[t2i] python -m {module} {' '.join(argv)}", flush=True)
        importlib.import_module(module).main(argv)
        if name == "evaluate":
            _write_card(run_dir)
    return outputs(run_dir)


def install(run_dir: str, weights_dir: str | None = None) -> list[str]:
    """Copies the recipe's outputs over the shipped files in ``weights/``; returns the paths written."""
    return common.install(outputs(run_dir), SHIPPED, "python -m training.t2i", weights_dir)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the embedded text-to-image model from scratch")
    ap.add_argument("--run-dir", default=os.path.join(common.repo_root(), "runs", "t2i"))
    ap.add_argument("--only", default=None, help=f"run this step only: one of {', '.join(STEPS)}")
    ap.add_argument("--threads", type=int, default=0, help="threads of every step (0: torch's default)")
    ap.add_argument("--install", action="store_true", help="copy the results into weights/ at the end")
    ap.add_argument("--print", action="store_true", help="print the recipe's commands and exit")
    args = ap.parse_args(argv)
    if args.print:
        print("\n".join(shell_lines(args.run_dir)))
        return
    run(args.run_dir, args.only, args.threads)
    if args.install:
        for path in install(args.run_dir):
            print(f"[t2i] installed {path}")


if __name__ == "__main__":
    main()
