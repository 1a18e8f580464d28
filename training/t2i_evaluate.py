"""Measure the embedded text-to-image model and write its card.

- Tokenizer: held-out reconstruction PSNR at 64 px (image -> bits -> image), every held-out image.
- Measuring stick: the CNN of training/classifier.py trained on the real renders of the ``--categories`` most common
  categories (training split, light corruption), its accuracy on their held-out renders reported as the ceiling.
- Category accuracy: one image generated from the caption of every held-out drawing of those categories; the share
  the classifier assigns to the drawing's category (chance: 1 / categories).
- Frechet ratio: the Frechet distance, in the classifier's feature space, between the generated images and the
  held-out renders, divided by the real-vs-real floor (training renders of the same categories, as many per category,
  against the same held-out renders), at ``--cfg`` and again at ``--also-cfg``.
- Prompt following: a grid of :data:`NOVEL_PROMPTS`, new combinations of known words (each is checked to be no
  training caption), four seeds each.
- Speed: the median wall time of four images (one batch, decoding included) on one thread.

Example (from the repository root)::

    python -m training.t2i_evaluate --data-dir runs/t2i/data --tokenizer runs/t2i/tokenizer.safetensors \\
        --generator runs/t2i/generator.safetensors --text-encoder runs/t2i/text_encoder.safetensors \\
        --run-dir runs/t2i/evaluate --out runs/t2i/eval.json --grid runs/t2i/prompts.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from training import classifier as clf
from training import common, data, t2i_data, t2i_text
from training.train_bsq import SCHEDULE, evaluate_bsq
from training.train_t2i import TextToImage, generate

common.import_pack()
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity  # noqa: E402

NOVEL_PROMPTS = (
    "red star", "blue star", "blue apple", "yellow car", "black cat", "orange flower",
    "smiling sun", "blue fish", "red heart, emoji", "green tree", "purple butterfly", "white house",
)
BARS = {"tokenizer_psnr_db": 24.0, "category_accuracy_over_chance": 3.0, "shipped_mb": 30.0,
        "four_images_s_one_thread": 5.0}


class Labelled:
    """Images of a set of categories as the classifier module expects them (``tensors()``, ``class_names``)."""

    def __init__(self, images_uint8: np.ndarray, labels: np.ndarray, class_names: list[str]):
        self.images, self.labels, self.class_names = images_uint8, labels, class_names

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return data.to_tensor(self.images), torch.from_numpy(self.labels).long()


STICK_FILE = "measuring_stick.safetensors"


def category_sets(ds: t2i_data.T2IData, count: int) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """``(categories, {split: image indices of those categories}, label of every image (-1 outside them))``."""
    names = ds.top_categories(count)
    of_source = np.array([names.index(s.category) if s.category in names else -1 for s in ds.sources])
    labels = of_source[ds.source]
    return names, {split: np.array([i for i in ds.split_indices(split) if labels[i] >= 0], dtype=np.int64)
                   for split in t2i_data.SPLITS}, labels


def measuring_stick(ds: t2i_data.T2IData, args, log: common.RunLog):
    """The classifier trained on the training renders of the ``--categories`` most common categories
    (``--classifier-steps``, ``--seed``), its accuracy on their held-out renders, and :func:`category_sets`'s
    ``(categories, sets, labels)``.

    The trained classifier is kept in the run folder (``measuring_stick.safetensors``, fp32) with what it was trained
    on; a later measurement in the same folder on the same data and settings reuses it instead of training it again
    (an evaluation that stopped, or one run while the generator was still training)."""
    names, sets, labels = category_sets(ds, args.categories)
    if not len(sets["heldout"]):
        raise SystemExit(f"no held-out drawing falls in the {len(names)} most common categories: raise --categories")
    trained_on = {"class_names": names, "steps": args.classifier_steps, "seed": args.seed, "data": ds.meta}
    path = os.path.join(args.run_dir, STICK_FILE)
    if os.path.exists(path):
        stick, cfg = clf.load_classifier(path)
        if {k: cfg.get(k) for k in trained_on} == json.loads(json.dumps(trained_on)):
            log.log("classifier_reused", path=path, heldout_accuracy=cfg["heldout_accuracy"])
            return stick, cfg["heldout_accuracy"], (names, sets, labels)
        log.log("classifier_stale", path=path)
    train_set = Labelled(ds.images[sets["train"]], labels[sets["train"]], names)
    held_set = Labelled(ds.images[sets["heldout"]], labels[sets["heldout"]], names)
    stick, accuracy = clf.train_classifier(train_set, held_set, args.classifier_steps, seed=args.seed, log=log,
                                           progress=not args.no_progress)
    os.makedirs(args.run_dir, exist_ok=True)
    common.export_safetensors(path, stick.state_dict(), {**stick.config(), **trained_on, "heldout_accuracy": accuracy})
    return stick, accuracy, (names, sets, labels)


def add_measure_args(ap: argparse.ArgumentParser, run_name: str) -> None:
    """The options every measurement of an embedded model shares: the measuring stick's, the seed, the run folder
    (``runs/<run_name>``), the results file, threads and progress."""
    ap.add_argument("--categories", type=int, default=24, help="the classifier's categories (the most common)")
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", default=os.path.join(common.repo_root(), "runs", run_name))
    ap.add_argument("--out", default=None, help="write the results here (JSON)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")


def matched_real(labels: np.ndarray, pool: np.ndarray, want: np.ndarray, seed: int) -> np.ndarray:
    """Indices from ``pool`` with as many images per category as ``want`` has (fewer where the pool runs out)."""
    rng = np.random.default_rng(seed)
    out = []
    for c, n in zip(*np.unique(labels[want], return_counts=True), strict=True):
        members = pool[labels[pool] == c]
        out.extend(rng.choice(members, size=min(n, len(members)), replace=False).tolist())
    return np.array(sorted(out), dtype=np.int64)


def load_model(generator_path: str, text_path: str) -> TextToImage:
    """The trained pair from their exported files (fp32, eval mode)."""
    gen = Infinity.from_file(generator_path)
    sd, cfg = common.read_safetensors(text_path)
    model = TextToImage(t2i_text.T5Config.from_dict(cfg), gen.config)
    model.text.load_state_dict({k: v.float() for k, v in sd.items()})
    model.generator.load_state_dict({k: v.float() for k, v in gen.state_dict().items()})
    return model.eval()


@torch.no_grad()
def time_four(model: TextToImage, tokenizer: BSQTokenizer, ptok, cfg: float, repeats: int = 3) -> dict:
    """Wall time of four images on one thread (the caller's thread setting is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            generate(model, tokenizer, list(NOVEL_PROMPTS[:4]), ptok, seed=r, cfg=cfg)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"median_s": statistics.median(times), "runs_s": times}


def evaluate(args) -> dict:
    log = common.RunLog(args.run_dir)
    ds = t2i_data.load_from_args(args)
    tokenizer = BSQTokenizer.from_file(args.tokenizer)
    held = ds.split_indices("heldout")
    result: dict = {"tokenizer": evaluate_bsq(tokenizer, ds.images[held], list(SCHEDULE.scales))}
    result["tokenizer"]["images"] = len(held)
    log.log("tokenizer", **result["tokenizer"])

    stick, real_acc, (names, sets, labels) = measuring_stick(ds, args, log)
    result["classifier"] = {"categories": names, "heldout_accuracy": real_acc, "train_images": len(sets["train"]),
                            "heldout_images": len(sets["heldout"])}
    log.log("classifier", heldout_accuracy=real_acc, categories=len(names))
    if args.generator is None:
        return result

    model = load_model(args.generator, args.text_encoder)
    ptok = t2i_text.PromptTokenizer(args.t5_tokenizer)
    prompts = ds.captions(sets["heldout"])
    gen_labels = torch.from_numpy(labels[sets["heldout"]]).long()
    real_a = data.to_tensor(ds.images[sets["heldout"]])
    real_b = data.to_tensor(ds.images[matched_real(labels, sets["train"], sets["heldout"], args.seed)])
    result["generator"] = {"prompts": len(prompts), "chance": 1 / len(names), "at_cfg": []}
    for cfg in (args.cfg, *args.also_cfg):
        images = generate(model, tokenizer, prompts, ptok, seed=args.seed, cfg=cfg, tau=args.tau)
        m = clf.compare(stick, images, gen_labels, real_a, gen_labels, real_b, len(names))
        row = {"cfg": cfg, "category_accuracy": m["class_accuracy"], "frechet_distance": m["frechet_distance"],
               "frechet_floor_real_vs_real": m["frechet_floor_real_vs_real"], "frechet_ratio": m["frechet_ratio"],
               "diversity_ratio_mean": m["diversity_ratio_mean"]}
        result["generator"]["at_cfg"].append(row)
        log.log("generator", **row)

    training_captions = {s.caption for s in ds.sources if s.split == "train"}
    seen = [p for p in NOVEL_PROMPTS if p in training_captions]
    if seen:
        raise SystemExit(f"NOVEL_PROMPTS {seen} are training captions verbatim: choose new combinations")
    grid = generate(model, tokenizer, [p for p in NOVEL_PROMPTS for _ in range(4)], ptok, seed=args.seed,
                    cfg=args.cfg, tau=args.tau)
    if args.grid:
        data.save_grid(data.to_uint8(grid), args.grid, cols=8)
    result["prompt_grid"] = {"prompts": list(NOVEL_PROMPTS), "seeds_per_prompt": 4, "path": args.grid}
    result["timing_4_images"] = time_four(model, tokenizer, ptok, args.cfg)
    result["sampling"] = {"cfg": args.cfg, "tau": args.tau, "schedule": [list(s) for s in SCHEDULE.scales]}
    return result


def card_metrics(result: dict, files: dict[str, str]) -> dict:
    """The card's flat metrics and which bars they meet."""
    gen = result["generator"]
    first = gen["at_cfg"][0]
    shipped_mb = sum(os.path.getsize(p) for p in files.values()) / 2**20
    metrics = {
        "tokenizer_psnr_db": round(result["tokenizer"]["psnr"], 2),
        "classifier_categories": len(result["classifier"]["categories"]),
        "classifier_accuracy_on_real_heldout": round(result["classifier"]["heldout_accuracy"], 3),
        "category_accuracy": round(first["category_accuracy"], 3),
        "category_accuracy_over_chance": round(first["category_accuracy"] / gen["chance"], 2),
        "frechet_ratio": [{"cfg": r["cfg"], "ratio": round(r["frechet_ratio"], 2),
                           "category_accuracy": round(r["category_accuracy"], 3)} for r in gen["at_cfg"]],
        "shipped_mb": round(shipped_mb, 2),
        "four_images_s_one_thread": round(result["timing_4_images"]["median_s"], 2),
    }
    metrics["bars_met"] = {
        "tokenizer_psnr_db": metrics["tokenizer_psnr_db"] >= BARS["tokenizer_psnr_db"],
        "category_accuracy_over_chance": (metrics["category_accuracy_over_chance"]
                                          >= BARS["category_accuracy_over_chance"]
                                          and metrics["classifier_categories"] >= 20),
        "shipped_mb": shipped_mb <= BARS["shipped_mb"],
        "four_images_s_one_thread": metrics["four_images_s_one_thread"] < BARS["four_images_s_one_thread"],
    }
    return metrics


def write_card(path: str, result: dict, files: dict[str, str], commands: list[str], data_meta: dict) -> dict:
    """The model card (JSON): files and sizes, configs, schedule and sampling defaults, data, commands, metrics."""
    gen = Infinity.config_from_file(files["generator"])
    _, t5_cfg = common.read_safetensors(files["text_encoder"])
    card = {
        "name": "nextscale-embedded-t2i",
        "family": "infinity",
        "resolution": 64,
        "files": {k: os.path.basename(p) for k, p in files.items()},
        "sizes_bytes": {k: os.path.getsize(p) for k, p in files.items()},
        "tokenizer_config": BSQTokenizer.config_from_file(files["tokenizer"]).to_dict(),
        "generator_config": gen.to_dict(),
        "text_encoder_config": t5_cfg,
        "default_sampling": result["sampling"],
        "data": {"packages": list(t2i_data.PACKAGES), **data_meta,
                 "licences": "Open Clip Art Library: public domain; Noto Color Emoji: SIL Open Font License 1.1"},
        "training_commands": commands,
        "metrics": card_metrics(result, files),
        "bars": BARS,
    }
    common.write_json(path, card)
    return card


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Measure the embedded text-to-image model")
    t2i_data.add_data_args(ap)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--generator", default=None, help="without it: the tokenizer and the classifier only")
    ap.add_argument("--text-encoder", default=None)
    ap.add_argument("--t5-tokenizer", default=None, help="ComfyUI's t5_tokenizer/tokenizer.json (default: found)")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--also-cfg", type=float, nargs="*", default=[1.5])
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--grid", default=None, help="write the prompt-following grid here (PNG)")
    add_measure_args(ap, "t2i_evaluate")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.generator and not args.text_encoder:
        raise SystemExit("--generator needs --text-encoder (the T5 encoder trained with it)")
    common.set_threads(args.threads)
    result = evaluate(args)
    if args.out:
        common.write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "classifier"}, indent=1))


if __name__ == "__main__":
    main()
