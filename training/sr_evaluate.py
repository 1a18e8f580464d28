"""Measure the embedded super-resolution model against bicubic upscaling and write its card.

On ``--count`` held-out images (the text-to-image set's held-out drawings, every one by default), each degraded
once (training/sr_data.py, variant ``HELDOUT_VARIANT``) to a 32 px input:

- PSNR against the 64 px original of: the model's upscale (empty prompt, cfg 1, ``--tau``), the same after the
  node's default colour fix (adain + wavelet against the input, as NextScale Upscale applies it), bicubic upscaling
  of the input, and the tokenizer's own reconstruction of the original (the ceiling of any model on it).
- Feature distance: the measuring-stick classifier (training/classifier.py, trained on the real renders of the
  ``--categories`` most common categories as training/t2i_evaluate.py does) embeds every upscale and its original;
  the mean L2 distance between the two features per image, and the Frechet distance between the upscales' and the
  originals' features, for the model, the colour-fixed model and bicubic.

The card (:func:`write_card`, written by ``python -m training.sr``) names the files, the configs, the sampling
settings, the figures and whether they meet :data:`BARS`: the colour-fixed model beats bicubic by at least
``psnr_gain_db`` and its feature distance is at most ``feature_distance_ratio`` of bicubic's.

Example (from the repository root)::

    python -m training.sr_evaluate --data-dir runs/t2i/data --tokenizer runs/t2i/tokenizer.safetensors \\
        --model runs/sr/nextscale_sr.safetensors --run-dir runs/sr/evaluate --out runs/sr/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from training import classifier as clf
from training import common, data, sr_data, t2i_data
from training.t2i_evaluate import add_measure_args, measuring_stick
from training.train_bsq import SCHEDULE, evaluate_bsq
from training.train_sr import upscale
from training.train_tokenizer import psnr

common.import_pack()
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.nsarm.model import NSARM  # noqa: E402
from nextscale.models.nsarm.tiles import color_fix  # noqa: E402

BARS = {"psnr_gain_db": 1.0, "feature_distance_ratio": 0.8}
METHODS = ("model", "model_color_fix", "bicubic")


@torch.no_grad()
def feature_distances(stick: clf.ShapeClassifier, images: torch.Tensor, originals: torch.Tensor) -> dict:
    """Mean per-image L2 distance and Frechet distance between the features of ``images`` and ``originals``."""
    a, b = stick.embed(images), stick.embed(originals)
    return {"mean_l2": float((a - b).norm(dim=1).mean()), "frechet": clf.frechet_distance(a, b)}


def evaluate(args) -> dict:
    log = common.RunLog(args.run_dir)
    ds = t2i_data.load_from_args(args)
    tokenizer = BSQTokenizer.from_file(args.tokenizer)
    model = NSARM.from_file(args.model).float().eval()
    held = ds.split_indices("heldout")
    if args.count:
        held = common.spread(held, args.count)
    lr = data.to_tensor(sr_data.degrade_batch(ds.images, held, args.seed, sr_data.HELDOUT_VARIANT))
    hr = data.to_tensor(ds.images[held])
    images = {"model": upscale(model, tokenizer, lr, seed=args.seed, tau=args.tau)}
    images["model_color_fix"] = color_fix(images["model"], lr, "adain + wavelet")
    images["bicubic"] = sr_data.bicubic(lr)
    result: dict = {"images": len(held), "psnr": {k: float(psnr(v, hr).mean()) for k, v in images.items()}}
    result["psnr"]["tokenizer_ceiling"] = evaluate_bsq(tokenizer, ds.images[held], list(SCHEDULE.scales))["psnr"]
    log.log("psnr", **result["psnr"])

    stick, real_acc, (names, _, _) = measuring_stick(ds, args, log)
    stick.eval()
    result["classifier"] = {"categories": len(names), "heldout_accuracy": real_acc}
    result["feature_distance"] = {k: feature_distances(stick, v, hr) for k, v in images.items()}
    log.log("feature_distance", **{f"{k}_{m}": v for k, d in result["feature_distance"].items() for m, v in d.items()})
    result["data"] = ds.meta
    result["sampling"] = {"cfg": 1.0, "tau": args.tau, "prompt": "empty", "seed": args.seed,
                          "schedule": [list(s) for s in SCHEDULE.scales]}
    data.save_grid(data.to_uint8(torch.cat([nearest(lr[:8]), images["bicubic"][:8], images["model"][:8], hr[:8]])),
                   os.path.join(args.run_dir, "heldout.png"), cols=8)
    return result


def nearest(lr_B3hw: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x, to show the inputs at the outputs' size."""
    return lr_B3hw.repeat_interleave(sr_data.SCALE, -1).repeat_interleave(sr_data.SCALE, -2)


def card_metrics(result: dict) -> dict:
    """The card's flat figures and which bars they meet (the model with the node's default colour fix)."""
    p, f = result["psnr"], result["feature_distance"]
    best = max(("model", "model_color_fix"), key=lambda k: p[k])
    metrics = {
        "heldout_images": result["images"],
        **{f"psnr_{k}_db": round(v, 2) for k, v in p.items()},
        **{f"feature_l2_{k}": round(f[k]["mean_l2"], 4) for k in METHODS},
        **{f"feature_frechet_{k}": round(f[k]["frechet"], 4) for k in METHODS},
        "psnr_gain_over_bicubic_db": round(p["model_color_fix"] - p["bicubic"], 2),
        "feature_distance_ratio_to_bicubic": round(f["model_color_fix"]["mean_l2"] / f["bicubic"]["mean_l2"], 3),
        "best_psnr_setting": best,
    }
    metrics["bars_met"] = {
        "psnr_gain_db": metrics["psnr_gain_over_bicubic_db"] >= BARS["psnr_gain_db"],
        "feature_distance_ratio": metrics["feature_distance_ratio_to_bicubic"] <= BARS["feature_distance_ratio"],
    }
    return metrics


def write_card(path: str, result: dict, files: dict[str, str], commands: list[str]) -> dict:
    """The model card (JSON): files and sizes, configs, sampling settings, degradation, data, commands, metrics."""
    card = {
        "name": "nextscale-embedded-sr",
        "family": "nsarm",
        "input_px": 32,
        "output_px": 64,
        "files": {k: os.path.basename(p) for k, p in files.items()},
        "sizes_bytes": {k: os.path.getsize(p) for k, p in files.items()},
        "tokenizer_config": BSQTokenizer.config_from_file(files["tokenizer"]).to_dict(),
        "model_config": NSARM.config_from_file(files["model"]).to_dict(),
        "default_sampling": result["sampling"],
        "degradation": sr_data.Degradation().__dict__,
        "data": {"packages": list(t2i_data.PACKAGES), **result["data"]},
        "training_commands": commands,
        "metrics": card_metrics(result),
        "bars": BARS,
    }
    common.write_json(path, card)
    return card


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Measure the embedded super-resolution model against bicubic")
    t2i_data.add_data_args(ap)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--model", required=True, help="training/train_sr.py's export")
    ap.add_argument("--count", type=int, default=0, help="held-out images (0: all)")
    ap.add_argument("--tau", type=float, default=0.5)
    add_measure_args(ap, "sr_evaluate")
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    common.set_threads(args.threads)
    result = evaluate(args)
    if args.out:
        common.write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
