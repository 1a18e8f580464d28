"""Where the embedded generator's Fréchet gap comes from: which classes, and which scales.

    python bench/bench_embedded_gap.py [--generator weights/nextscale_generator.safetensors] [--per-class 50]
                                       [--classes star] [--cfg 4] [--threads 1]

Two measurements with the measuring-stick classifier, on the held-out split, at the sampler's defaults (``--cfg``
changes the guidance):

1. per class: the Fréchet distance of the class's samples against real images of the class, next to the same
   distance between two real sets of the class (its floor), and the class's share of the overall distance
   (training/classifier.py ``frechet_share_per_class``: what replacing that class's samples with real images would
   take off the distance);
2. per scale, for the classes named by ``--classes``: the class's Fréchet distance when the first ``s`` scales are
   not sampled but taken from the tokens of real held-out images of the class (a sampling guide that teacher-forces
   them), for every ``s``. The scale at which the distance falls is where the generator loses the class's shape.

Not a test: figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training import classifier as clf  # noqa: E402
from training import common, data  # noqa: E402
from training.evaluate import generate  # noqa: E402

common.import_pack()
from nextscale.models.core.hooks import Guide, SamplerHooks  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402


class ForceFirstScales(Guide):
    """Replaces the drawn tokens of scales ``< upto`` with given ones (one row per sample)."""

    def __init__(self, tokens: list[torch.Tensor], upto: int):
        self.tokens, self.upto = tokens, upto

    def apply(self, si: int, idx_Bl: torch.Tensor) -> torch.Tensor:
        return self.tokens[si].reshape(idx_Bl.shape).to(idx_Bl) if si < self.upto else idx_Bl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(ROOT / "weights" / "nextscale_tokenizer.safetensors"))
    ap.add_argument("--generator", default=str(ROOT / "weights" / "nextscale_generator.safetensors"))
    ap.add_argument("--classifier", default=str(ROOT / "weights" / "classifier.safetensors"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--classes", default="star", help="comma-separated class names for the per-scale part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=SamplingOptions.cfg, help="guidance (default: the sampler's)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = MultiScaleVQVAE.from_file(args.tokenizer)
    var = VAR.from_file(args.generator)
    model, _ = clf.load_classifier(args.classifier)
    names = var.class_names or [str(c) for c in range(var.num_classes)]
    K, n = var.num_classes, args.per_class * var.num_classes
    held = data.synthetic_dataset(0, "heldout", 2000, tokenizer.config.image_size, None)
    x, y = held.tensors()
    if 3 * n > len(x):
        raise SystemExit(f"--per-class {args.per_class}: needs {3 * n} held-out images, the split has {len(x)}")
    xa, ya, xb, yb = x[:n], y[:n], x[n:2 * n], y[n:2 * n]
    options = SamplingOptions(cfg=args.cfg)
    labels = torch.arange(n) % K
    gen = generate(var, tokenizer, labels, args.seed, options)
    _, fg = clf.predict(model, gen)
    _, fa = clf.predict(model, xa)
    _, fb = clf.predict(model, xb)
    fd, floor = clf.frechet_distance(fa, fg), clf.frechet_distance(fa, fb)
    share = clf.frechet_share_per_class(fa, fg, labels, fb, yb, K)
    print(f"generator {args.generator}, cfg {args.cfg:g}")
    print(f"overall: Frechet {fd:.3f}, floor {floor:.3f}, ratio {fd / floor:.2f}")
    print("| class | Fréchet (class) | floor (class) | ratio | share of the overall distance |")
    print("|---|---|---|---|---|")
    for c in range(K):
        fc = clf.frechet_distance(fa[ya == c], fg[labels == c])
        flc = clf.frechet_distance(fa[ya == c], fb[yb == c])
        print(f"| {names[c]} | {fc:.2f} | {flc:.2f} | {fc / flc:.1f} | {share[c]:.3f} |")

    # per scale: real tokens for the first s scales come from a third held-out set of the class
    xc, yc = x[2 * n:], y[2 * n:]
    for name in [s.strip() for s in args.classes.split(",") if s.strip()]:
        if name not in names:
            raise SystemExit(f"--classes: '{name}' is not a class of this generator ({', '.join(names)})")
        c = names.index(name)
        real_c = xc[yc == c][: args.per_class]
        tokens = tokenizer.img_to_indices(real_c)
        lab = torch.full((len(real_c),), c)
        ref = fa[ya == c]
        row = []
        for upto in range(len(var.patch_nums) + 1):
            guide = SamplerHooks(guide=ForceFirstScales(tokens, upto))  # its tokens: one row per image, one batch
            imgs = generate(var, tokenizer, lab, args.seed, options, batch_size=len(lab), hooks=guide)
            pred, f = clf.predict(model, imgs)
            row.append((upto, clf.frechet_distance(ref, f), float((pred == c).float().mean())))
        print(f"\n{name}: first s scales from real tokens ({len(real_c)} images; s = {len(var.patch_nums)} is "
              f"the tokenizer's round trip)")
        print("| s | " + " | ".join(str(s) for s, _, _ in row) + " |")
        print("|---" * (len(row) + 1) + "|")
        print("| Fréchet (class) | " + " | ".join(f"{d:.2f}" for _, d, _ in row) + " |")
        print("| class accuracy | " + " | ".join(f"{a:.2f}" for _, _, a in row) + " |")


if __name__ == "__main__":
    main()
