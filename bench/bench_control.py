"""How much a control adapter steers the embedded generator: edge agreement of controlled vs uncontrolled samples.

    python bench/bench_control.py [--adapter weights/nextscale_control_edges.safetensors] [--count 100]

For ``count`` held-out images of the shapes dataset: the edge map of the image (the pack's Canny-like
preprocessor) is the control; the same class and seed are sampled with the adapter at strength 1 and without
control. The edges of each generated image are compared with the control edges: F1 with a 1-pixel tolerance
(precision: generated edge pixels within 1 px of a control edge; recall: control edge pixels within 1 px of a
generated edge), and the class accuracy of the samples by the measuring-stick classifier. Not a test: figures go
to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training import common, data  # noqa: E402

common.import_pack()
from nextscale.models.control.adapters import ControlAdapter  # noqa: E402
from nextscale.models.control.maps import canny_edges  # noqa: E402
from nextscale.models.core.hooks import SamplerHooks  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions, sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

from training.classifier import load_classifier, predict  # noqa: E402


def edge_f1(pred_B1HW: torch.Tensor, ref_B1HW: torch.Tensor) -> torch.Tensor:
    dil = lambda x: F.max_pool2d(x, 3, 1, 1)  # noqa: E731
    tp_p = (pred_B1HW * dil(ref_B1HW)).flatten(1).sum(1)
    tp_r = (ref_B1HW * dil(pred_B1HW)).flatten(1).sum(1)
    precision = tp_p / pred_B1HW.flatten(1).sum(1).clamp_min(1)
    recall = tp_r / ref_B1HW.flatten(1).sum(1).clamp_min(1)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-8)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=str(ROOT / "weights" / "nextscale_control_edges.safetensors"))
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--cfg", type=float, default=4.0)
    args = ap.parse_args()
    var = VAR.from_file(str(ROOT / "weights" / "nextscale_generator.safetensors")).eval()
    vae = MultiScaleVQVAE.from_file(str(ROOT / "weights" / "nextscale_tokenizer.safetensors")).eval()
    adapter = ControlAdapter.from_file(args.adapter)
    held = data.synthetic_dataset(0, "heldout", args.count, 64)
    x, labels = held.tensors()
    img01 = (x + 1) / 2
    ref = canny_edges(img01)
    options = SamplingOptions(cfg=args.cfg)
    classifier, _ = load_classifier(str(ROOT / "weights" / "classifier.safetensors"))
    scores = {}
    for name, strength in (("without control", 0.0), ("adapter, strength 1", 1.0)):
        f1s, correct = [], 0
        for i in range(0, args.count, 25):
            lab, ctrl = labels[i : i + 25], img01[i : i + 25]
            control = canny_edges(ctrl).expand(-1, 3, -1, -1) * 2 - 1  # [-1, 1], as NextScale Apply Control passes it
            hooks = SamplerHooks(control=adapter.bind(var, control, strength=strength))
            toks = sample(var, vae, lab, seed=1000 + i, options=options, hooks=hooks)
            gen01 = (vae.indices_to_img(toks.flat()).clamp(-1, 1) + 1) / 2
            f1s.append(edge_f1(canny_edges(gen01), ref[i : i + 25]))
            correct += int((predict(classifier, gen01 * 2 - 1)[0] == lab).sum())
        scores[name] = torch.cat(f1s).mean().item()
        print(f"{name}: edge F1 vs the control edges (1 px tolerance) = {scores[name]:.3f}, "
              f"class accuracy {correct / args.count:.3f}")


if __name__ == "__main__":
    main()
