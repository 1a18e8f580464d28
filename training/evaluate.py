"""Metrics of a trained tokenizer/generator pair, measured with the classifier.

- tokenizer: held-out reconstruction PSNR (image -> indices -> image) and code usage;
- generator: class accuracy of generated images (classifier's prediction == requested class), Frechet
  distance in the classifier's feature space against held-out real images, with the real-vs-real floor
  (two disjoint held-out sets of the same size), per-class diversity (generated / real), and each class's share
  of the distance (what replacing that class's samples with real images would take off it);
- ``--repeats N``: the generated set drawn N times (disjoint seeds), each draw's ratio and their mean; one draw of
  500 images moves the ratio by a few tenths;
- ``--also-cfg C``: the same draws (same seeds) again at guidance ``C``, each draw's class accuracy and ratio: VAR
  itself reports FID at another cfg (1.5) than its demo samples with (4), and so does the embedded model's card;
- speed: wall time of sampling 4 images (one batch, default options, decode included) on this machine.

Example (from the repository root)::

    python3 -m training.evaluate --tokenizer weights/nextscale_tokenizer.safetensors \\
        --generator weights/nextscale_generator.safetensors --classifier weights/classifier.safetensors \\
        --per-class 50 --out runs/eval.json --grid runs/samples.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from training import classifier as clf
from training import common, data

common.import_pack()
from nextscale.models.core.hooks import SamplerHooks  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions, sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

# image i of repeat r uses seed ``seed + r * REPEAT_SEED_STRIDE + i``: no two draws share a per-image seed
REPEAT_SEED_STRIDE = 100_000


@torch.no_grad()
def generate(var: VAR, tokenizer: MultiScaleVQVAE, labels: torch.Tensor, seed: int, options: SamplingOptions,
             batch_size: int = 50, hooks: SamplerHooks | None = None) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for ``labels``; batch ``j`` uses seed ``seed + j * batch_size``
    (so image ``i`` uses seed ``seed + i``, the sampler's per-item rule). ``hooks`` go to every batch."""
    out = []
    for j in range(0, len(labels), batch_size):
        toks = sample(var, tokenizer, labels[j:j + batch_size], seed=seed + j, options=options, hooks=hooks)
        f_hat = toks.f_hat if toks.f_hat is not None else tokenizer.indices_to_fhat(toks.flat(), toks.patch_nums)
        out.append(tokenizer.fhat_to_img(f_hat).cpu())
    return torch.cat(out)


@torch.no_grad()
def time_sampling(var, tokenizer, options: SamplingOptions, n_images: int = 4, repeats: int = 3) -> dict:
    """Median wall time (s) of sampling and decoding ``n_images`` in one batch, after one warm-up run."""
    labels = torch.arange(n_images) % var.num_classes
    generate(var, tokenizer, labels, 0, options, n_images)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        generate(var, tokenizer, labels, 100 + r, options, n_images)
        times.append(time.perf_counter() - t)
    return {"images": n_images, "median_s": statistics.median(times), "runs_s": [round(t, 3) for t in times],
            "threads": torch.get_num_threads()}


def evaluate(tokenizer_path: str, generator_path: str | None, classifier_path: str, per_class: int = 50,
             options: SamplingOptions | None = None, seed: int = 0, data_seed: int = 0, heldout_count: int = 2000,
             cache_dir: str | None = None, grid: str | None = None, timing: bool = True,
             tokenizer_count: int = 1000, generator_dtype: str = "float32", repeats: int = 1,
             also_cfg: Sequence[float] = ()) -> dict:
    """Every metric of the module docstring. ``repeats`` > 1 draws the generated set again with seeds
    ``seed + r * REPEAT_SEED_STRIDE`` (disjoint from the first set's per-image seeds) and adds, under
    ``generator.repeats``, each draw's class accuracy and Frechet ratio with their mean: a 500-image ratio moves
    by a few tenths from one draw to the next, so the mean is the figure to compare models by. Each guidance in
    ``also_cfg`` draws the same seeds once more with ``options.cfg`` replaced, listed under ``generator.at_cfg``."""
    from training.train_tokenizer import evaluate_tokenizer

    tokenizer = MultiScaleVQVAE.from_file(tokenizer_path)
    res = tokenizer.config.image_size
    held = data.synthetic_dataset(data_seed, "heldout", heldout_count, res, cache_dir)
    out: dict = {"tokenizer": evaluate_tokenizer(tokenizer, held.images[:tokenizer_count])}
    model, _ = clf.load_classifier(classifier_path)
    # the ceiling of the generator: what the classifier makes of tokenizer round trips of real images
    xr, yr = held.tensors()
    n_rt = min(tokenizer_count, len(held) // 2)
    with torch.no_grad():
        rt = torch.cat([tokenizer.indices_to_img(tokenizer.img_to_indices(xr[i:min(i + 100, n_rt)]))
                        for i in range(0, n_rt, 100)])
    pred_rt, feat_rt = clf.predict(model, rt)
    _, feat_a = clf.predict(model, xr[:n_rt])
    _, feat_b = clf.predict(model, xr[n_rt:2 * n_rt])
    out["tokenizer"]["classifier_accuracy_on_round_trips"] = clf.accuracy(pred_rt, yr[:n_rt])
    out["tokenizer"]["frechet_round_trips_vs_real"] = clf.frechet_distance(feat_a, feat_rt)
    out["tokenizer"]["frechet_floor_real_vs_real"] = clf.frechet_distance(feat_a, feat_b)
    if generator_path is None:
        return out
    var = VAR.from_file(generator_path).to(getattr(torch, generator_dtype))  # as the loader's dtype option does
    options = options or SamplingOptions()
    K = var.num_classes
    labels = torch.arange(per_class * K) % K
    t0 = time.perf_counter()
    gen = generate(var, tokenizer, labels, seed, options)
    out["generation_seconds"] = round(time.perf_counter() - t0, 1)
    n = len(labels)
    if 2 * n > len(held):
        raise SystemExit(f"need {2 * n} held-out images for the real-vs-real floor, have {len(held)}")
    xh, yh = held.tensors()
    m = clf.compare(model, gen, labels, xh[:n], yh[:n], xh[n:2 * n], K, real_b_labels=yh[n:2 * n])
    seeds = [seed + r * REPEAT_SEED_STRIDE for r in range(repeats)]

    def draw(s: int, opts: SamplingOptions) -> dict:
        return clf.compare(model, generate(var, tokenizer, labels, s, opts), labels, xh[:n], yh[:n], xh[n:2 * n], K)

    if repeats > 1:
        m["repeats"] = _summary(seeds, [m] + [draw(s, options) for s in seeds[1:]])
    if also_cfg:
        m["at_cfg"] = []
        for c in also_cfg:
            opts = dataclasses.replace(options, cfg=float(c))
            m["at_cfg"].append({"cfg": float(c), **_summary(seeds, [draw(s, opts) for s in seeds])})
    m["class_names"] = list(var.class_names or range(K))
    m["options"] = {"cfg": options.cfg, "top_k": options.top_k, "top_p": options.top_p,
                    "temperature": options.temperature, "more_smooth": options.more_smooth}
    out["generator"] = m
    if timing:
        out["timing_4_images"] = time_sampling(var, tokenizer, options)
    if grid:
        order = torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in range(K)])
        data.save_grid(data.to_uint8(gen[order]), grid, cols=8)
    return out


def _summary(seeds: list[int], draws: list[dict]) -> dict:
    """Each draw's class accuracy and Frechet ratio (draw ``i`` generated from ``seeds[i]``), and the ratios' mean."""
    ratios = [d["frechet_ratio"] for d in draws]
    return {"seeds": seeds, "class_accuracy": [d["class_accuracy"] for d in draws], "frechet_ratio": ratios,
            "frechet_ratio_mean": statistics.fmean(ratios),
            "frechet_ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}


def write_card(path: str, tokenizer_path: str, generator_path: str, metrics: dict, options: SamplingOptions,
               commands: list[str], notes: str = "") -> dict:
    """The embedded model's JSON card (``weights/nextscale_embedded.json``): class names, schedule, resolution,
    default sampling options, the commands that trained it and its measured metrics."""
    tok = MultiScaleVQVAE.from_file(tokenizer_path)
    var = VAR.from_file(generator_path)
    card = {
        "name": "nextscale-embedded",
        "class_names": list(var.class_names or []),
        "resolution": tok.config.image_size,
        "patch_nums": list(var.patch_nums),
        "vocab_size": var.config.vocab_size,
        "files": {"tokenizer": os.path.basename(tokenizer_path), "generator": os.path.basename(generator_path),
                  "classifier": "classifier.safetensors"},
        "sizes_bytes": {"tokenizer": os.path.getsize(tokenizer_path), "generator": os.path.getsize(generator_path)},
        "tokenizer_config": tok.config.to_dict(),
        "generator_config": {k: v for k, v in var.config.to_dict().items() if k != "class_names"},
        "default_sampling": {"cfg": options.cfg, "top_k": options.top_k, "top_p": options.top_p,
                             "temperature": options.temperature},
        "data": "synthetic NextScale shapes (training/data.py), seed 0, 64 px; held-out split 'heldout'",
        "training_commands": commands,
        "metrics": metrics,
        "notes": notes,
    }
    common.write_json(path, card)
    return card


def main(argv=None):
    ap = argparse.ArgumentParser(description="Measure a trained tokenizer/generator pair")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--generator", default=None)
    ap.add_argument("--classifier", default=os.path.join(common.repo_root(), "weights", "classifier.safetensors"))
    ap.add_argument("--per-class", type=int, default=50, help="generated images per class")
    ap.add_argument("--cfg", type=float, default=4.0, help="default: the sampler node's default")
    ap.add_argument("--top-k", type=int, default=900)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="draw the generated set this many times (other seeds) and report each ratio and their mean")
    ap.add_argument("--also-cfg", type=float, action="append", default=[], metavar="CFG",
                    help="draw the same sets again at this guidance (repeatable); reported under generator.at_cfg")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--heldout-count", type=int, default=2000)
    ap.add_argument("--cache-dir", default=os.path.join(common.repo_root(), "data"))
    ap.add_argument("--grid", default=None, help="write a PNG grid of samples (8 per class) here")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the metrics as JSON here")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the generator's weights (NextScale Load Generator's dtype)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: give 1 (one generated set) or more")
    common.set_threads(args.threads)
    opts = SamplingOptions(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    res = evaluate(args.tokenizer, args.generator, args.classifier, args.per_class, opts, args.seed, args.data_seed,
                   args.heldout_count, args.cache_dir, args.grid, not args.no_timing, generator_dtype=args.dtype,
                   repeats=args.repeats, also_cfg=args.also_cfg)
    text = json.dumps(res, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
