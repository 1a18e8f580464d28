"""The measuring stick: a small CNN classifier trained on the real data, and the metrics built on it.

Metrics (all in the classifier's 128-d penultimate feature space):
- ``accuracy``: share of images classified as the class they were generated for;
- ``frechet_distance``: Frechet distance between two Gaussian fits of the features (FID's formula);
  report it next to the real-vs-real floor (two disjoint real sets of the same size);
- ``diversity``: mean pairwise feature distance within each class (generated / real ~ 1 is healthy,
  much below 1 is mode collapse).

Train and export: ``python3 -m training.classifier --out weights/classifier.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training import common, data

FEATURE_DIM = 128


class ShapeClassifier(nn.Module):
    """4 conv stages ((3x3 conv, BN, ReLU) x 1 or 2, 2x2 max-pool) -> global average -> 128-d feature -> logits."""

    def __init__(self, num_classes: int = len(data.CLASS_NAMES), widths: Sequence[int] = (16, 32, 64, FEATURE_DIM)):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            for _ in range(1 if i < 2 else 2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.num_classes = num_classes
        self.widths = tuple(widths)

    def embed(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Feature ``(B, 128)`` of images in [-1, 1]."""
        return self.features(x_B3HW).mean(dim=(2, 3))

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x_B3HW))

    def config(self) -> dict:
        return {"kind": "nextscale-shape-classifier", "num_classes": self.num_classes, "widths": list(self.widths)}


def load_classifier(path: str, device="cpu") -> tuple[ShapeClassifier, dict]:
    """``(model in eval mode, config)`` from a safetensors file written by this module."""
    sd, cfg = common.read_safetensors(path)
    model = ShapeClassifier(cfg["num_classes"], cfg["widths"])
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval(), cfg


# ---------------------------------------------------------------------------------------------
# metrics


@torch.no_grad()
def predict(model: ShapeClassifier, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predicted labels (N,), features (N, 128))`` of float images (N, 3, H, W) in [-1, 1]."""
    model.eval()
    dev = next(model.parameters()).device
    preds, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.embed(images[i:i + batch_size].to(dev).float())
        preds.append(model.head(f).argmax(1).cpu())
        feats.append(f.cpu())
    return torch.cat(preds), torch.cat(feats)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    return [float((pred[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
            for c in range(num_classes)]


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    """``trace(sqrtm(s1 @ s2))`` for symmetric PSD s1, s2, via ``sqrt(s1) s2 sqrt(s1)`` (symmetric)."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrt(S_a S_b))`` of two feature sets (N, D), in float64."""
    a, b = feat_a.double().numpy(), feat_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * _sqrtm_trace(s_a, s_b))


def diversity(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Mean pairwise L2 distance between features of the same class, per class (nan for < 2 items)."""
    out = []
    for c in range(num_classes):
        f = features[labels == c].double()
        if len(f) < 2:
            out.append(float("nan"))
            continue
        d = torch.cdist(f, f)
        n = len(f)
        out.append(float(d.sum() / (n * (n - 1))))
    return out


def frechet_share_per_class(feat_real: torch.Tensor, feat_gen: torch.Tensor, gen_labels: torch.Tensor,
                            feat_other: torch.Tensor, other_labels: torch.Tensor, num_classes: int) -> list[float]:
    """How much of ``frechet_distance(feat_real, feat_gen)`` each class accounts for.

    Entry ``c`` is that distance minus the one after the generated features of class ``c`` are replaced by real
    ones of class ``c`` from another set (``feat_other``; as many as it has, up to the generated count): what
    generating class ``c`` perfectly would gain. The entries need not add up to the distance (the classes share
    the mean and the covariance), but they rank the classes by the gap they leave.
    """
    fd = frechet_distance(feat_real, feat_gen)
    out = []
    for c in range(num_classes):
        slots = torch.nonzero(gen_labels == c).flatten()
        real_c = feat_other[other_labels == c]
        k = min(len(slots), len(real_c))
        if k == 0:
            out.append(float("nan"))
            continue
        swapped = feat_gen.clone()
        swapped[slots[:k]] = real_c[:k].to(swapped.dtype)
        out.append(fd - frechet_distance(feat_real, swapped))
    return out


def compare(model: ShapeClassifier, gen_images: torch.Tensor, gen_labels: torch.Tensor, real_a: torch.Tensor,
            real_a_labels: torch.Tensor, real_b: torch.Tensor, num_classes: int,
            real_b_labels: torch.Tensor | None = None) -> dict:
    """Every metric of generated images against real set ``a``, with ``a`` vs ``b`` (same size) as the floor.

    With ``real_b_labels``, also :func:`frechet_share_per_class` (real ``b`` standing in for each class in turn).
    """
    pred_g, feat_g = predict(model, gen_images)
    _, feat_a = predict(model, real_a)
    _, feat_b = predict(model, real_b)
    div_g = diversity(feat_g, gen_labels, num_classes)
    div_r = diversity(feat_a, real_a_labels, num_classes)
    fd = frechet_distance(feat_a, feat_g)
    floor = frechet_distance(feat_a, feat_b)
    extra = {}
    if real_b_labels is not None:
        extra["frechet_share_per_class"] = frechet_share_per_class(feat_a, feat_g, gen_labels, feat_b,
                                                                   real_b_labels, num_classes)
    return {
        "class_accuracy": accuracy(pred_g, gen_labels),
        "per_class_accuracy": per_class_accuracy(pred_g, gen_labels, num_classes),
        "frechet_distance": fd,
        "frechet_floor_real_vs_real": floor,
        "frechet_ratio": fd / max(floor, 1e-12),
        "diversity_generated": div_g,
        "diversity_real": div_r,
        "diversity_ratio_mean": float(np.nanmean(np.asarray(div_g) / np.asarray(div_r))),
        "num_generated": len(gen_images),
        "num_real_per_set": len(real_a),
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# training


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light corruption (noise, blur, colour jitter) so generated images' artifacts do not fool the classifier."""
    B = x.shape[0]
    noise = torch.rand(B, 1, 1, 1, generator=g) * 0.08
    x = x + noise * torch.randn(x.shape, generator=g)
    blur = (torch.rand(B, 1, 1, 1, generator=g) < 0.3).float()
    x = blur * F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) + (1 - blur) * x
    gain = 1 + 0.1 * (torch.rand(B, 3, 1, 1, generator=g) - 0.5)
    return (x * gain).clamp(-1, 1)


def train_classifier(train: data.ArrayDataset, heldout: data.ArrayDataset, steps: int = 800, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, device="cpu", log: common.RunLog | None = None,
                     progress: bool = True) -> tuple[ShapeClassifier, float]:
    torch.manual_seed(seed)
    model = ShapeClassifier(len(train.class_names)).to(device)
    opt = common.adamw(model, lr, weight_decay=1e-4, betas=(0.9, 0.999))
    x_all, y_all = train.tensors()
    batches = common.StepBatches((x_all, y_all), batch_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bar = common.Progress(steps, desc="classifier", enabled=progress)
    model.train()
    for step in range(steps):
        common.set_lr(opt, common.lr_at(step, steps, lr, warmup=50, min_ratio=0.02))
        x, y = batches.batch(step)
        x = _augment(x, g).to(device)
        loss = F.cross_entropy(model(x), y.to(device), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(loss=loss.item())
        if log and (step % 100 == 0 or step == steps - 1):
            log.log("train", step=step, loss=loss.item())
    bar.close()
    xh, yh = heldout.tensors()
    pred, _ = predict(model, xh)
    return model.eval(), accuracy(pred, yh)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Train the measuring-stick classifier on the real data")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a folder of class subfolders")
    ap.add_argument("--resolution", type=int, default=data.DEFAULT_RESOLUTION)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-count", type=int, default=20000)
    ap.add_argument("--heldout-count", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cache-dir", default=os.path.join(common.repo_root(), "data"))
    ap.add_argument("--run-dir", default=os.path.join(common.repo_root(), "runs", "classifier"))
    ap.add_argument("--out", default=os.path.join(common.repo_root(), "weights", "classifier.safetensors"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    device = common.pick_device(args.device)
    log = common.RunLog(args.run_dir)
    log.log("start", args=vars(args), device=str(device))
    t0 = time.time()
    train, heldout = data.load_datasets(args.data, args.resolution, args.seed, args.train_count, args.heldout_count,
                                        args.cache_dir)
    model, acc = train_classifier(train, heldout, args.steps, args.batch_size, args.lr, args.seed, device, log)
    cfg = {**model.config(), "class_names": list(train.class_names), "resolution": args.resolution,
           "heldout_accuracy": acc, "data": args.data, "seed": args.seed}
    size = common.export_safetensors(args.out, model.cpu().state_dict(), cfg, dtype=torch.float16)
    log.log("done", heldout_accuracy=acc, seconds=round(time.time() - t0, 1), out=args.out, bytes=size)
    print(json.dumps({"heldout_accuracy": acc, "out": args.out, "bytes": size}))


if __name__ == "__main__":
    main()
