"""What a style LoRA of the embedded generator does, measured with the classifier.

The generated set (``--per-class`` images of every class, image ``i`` from seed ``seed + i`` as training/evaluate.py
draws it) is made without the LoRA and with it at each ``--strength``. Each set is compared, in the classifier's
feature space, with held-out real images drawn in the embedded model's own style (``filled``) and in the LoRA's style
(``--style``, the same shapes and poses drawn otherwise; training/data.py): the Frechet distance to each (beside the
real-vs-real floor of each) and the class accuracy. Strength 0 is also checked to give the very images of no LoRA,
bit for bit.

Example (from the repository root)::

    python -m training.evaluate_lora --lora weights/nextscale_lora_outline.safetensors --style outline \\
        --out runs/lora_outline/eval.json --grid docs/images/lora_outline.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.nn.utils import parametrize

from training import classifier as clf
from training import common, data
from training.evaluate import generate

common.import_pack()
from nextscale.models.core.lora import apply_lora, read_lora, remove_lora  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

WEIGHTS = os.path.join(common.repo_root(), "weights")
GRID_PER_CLASS = 2  # images of each class per row of the grid


def evaluate_lora(lora_path: str, style: str, strengths: list[float], generator_path: str, tokenizer_path: str,
                  classifier_path: str, per_class: int = 50, seed: int = 0, data_seed: int = 0,
                  options: SamplingOptions | None = None, grid: str | None = None) -> dict:
    """The measurements of the module docstring, by set: ``none`` and ``strength <s>``."""
    tokenizer = MultiScaleVQVAE.from_file(tokenizer_path)
    var = VAR.from_file(generator_path)
    lora = read_lora(lora_path)
    model, _ = clf.load_classifier(classifier_path)
    options = options or SamplingOptions()
    K, res = var.num_classes, tokenizer.config.image_size
    labels = torch.arange(per_class * K) % K
    n = len(labels)
    real = {}  # per style: features of two disjoint held-out sets of n images
    for s in dict.fromkeys(("filled", style)):
        images, _ = data.render_many(data_seed, "heldout", 0, 2 * n, res, style=s)
        _, feats = clf.predict(model, data.to_tensor(images))
        real[s] = (feats[:n], feats[n:])
    out: dict = {"lora": os.path.basename(lora_path), "style": style, "images_per_set": n,
                 "frechet_floor": {s: clf.frechet_distance(a, b) for s, (a, b) in real.items()}, "sets": {}}

    def measure(images: torch.Tensor) -> dict:
        pred, feats = clf.predict(model, images)
        return {"class_accuracy": clf.accuracy(pred, labels),
                **{f"frechet_to_{s}": clf.frechet_distance(a, feats) for s, (a, _) in real.items()}}

    t0 = time.perf_counter()
    sets = {"none": generate(var, tokenizer, labels, seed, options)}
    for strength in strengths:
        apply_lora(var, lora, strength)
        with parametrize.cached():  # each adapted weight computed once per set, not at every use
            sets[f"strength {strength:g}"] = generate(var, tokenizer, labels, seed, options)
        remove_lora(var)
    out["generation_seconds"] = round(time.perf_counter() - t0, 1)
    out["sets"] = {name: measure(images) for name, images in sets.items()}
    if 0.0 in strengths:
        out["strength_0_bit_identical"] = bool(torch.equal(sets["strength 0"], sets["none"]))
    if grid:
        first = torch.cat([torch.nonzero(labels == c).flatten()[:GRID_PER_CLASS] for c in range(K)])
        rows = torch.cat([images[first] for images in sets.values()])
        data.save_grid(data.to_uint8(rows), grid, cols=len(first))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Measure a style LoRA of the embedded generator with the classifier")
    ap.add_argument("--lora", required=True)
    ap.add_argument("--style", default="outline", choices=data.STYLES, help="the style the LoRA was trained on")
    ap.add_argument("--strength", type=float, action="append", default=[], metavar="S",
                    help="LoRA strength to measure (repeatable; default 0 and 1)")
    ap.add_argument("--generator", default=os.path.join(WEIGHTS, "nextscale_generator.safetensors"))
    ap.add_argument("--tokenizer", default=os.path.join(WEIGHTS, "nextscale_tokenizer.safetensors"))
    ap.add_argument("--classifier", default=os.path.join(WEIGHTS, "classifier.safetensors"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=4.0, help="default: the sampler node's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--grid", default=None, help="write a PNG here: one row per set, the same seeds in each column")
    ap.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    res = evaluate_lora(args.lora, args.style, args.strength or [0.0, 1.0], args.generator, args.tokenizer,
                        args.classifier, args.per_class, args.seed, options=SamplingOptions(cfg=args.cfg),
                        grid=args.grid)
    text = json.dumps(res, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
