"""Where an NSARM upscale's PSNR goes: which scales carry the picture, what the input still knows about the scales
the transformer predicts, and what a trained model gets of them (the embedded super-resolution model's diagnosis).

    python bench/bench_nsarm_sr_bound.py --data-dir runs/t2i/data --tokenizer runs/t2i/tokenizer.safetensors \\
        [--model runs/sr/nextscale_sr.safetensors] [--count 64]

On ``--count`` held-out images of the text-to-image set, degraded as the embedded SR recipe degrades them
(training/sr_data.py) to 32 px inputs, against their 64 px originals, all on the recipe's schedule (sides 1, 2, 4,
6, 8, 12, 16; NSARM's network maps the first five, the sides the 8 x 8 input latent holds; the transformer predicts
12 and 16). Without a model:

- PSNR of bicubic upscaling, and of the tokenizer decoding the original's first ``k`` scales (``k = 7``: the ceiling
  of any model decoded by this tokenizer; the finer scales are left at zero);
- the original's mapped scales with the finer ones taken from the tokenizer's bits of the bicubic upscale (what the
  input itself says about the predicted scales) or the original's bits flipped at random with probability ``p``
  (the bit accuracy a prediction of those scales needs);
- per scale, how often the bicubic upscale's bits equal the original's.

With ``--model`` (training/train_sr.py's export): the transformer's teacher-forced bit accuracy per scale (argmax,
the original's earlier scales as input); the original's mapped scales with the transformer predicting the rest
(tau 0.5, the recipe's sampling); the network's mapped scales with the original's finer ones; and the model's
upscale, alone and with the node's colour fix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training import common, data, sr_data, t2i_data  # noqa: E402
from training.train_bsq import SCHEDULE  # noqa: E402
from training.train_sr import upscale  # noqa: E402
from training.train_t2i import scale_slices, teacher_inputs  # noqa: E402
from training.train_tokenizer import psnr  # noqa: E402

common.import_pack()
from nextscale.models.core.hooks import SamplerHooks  # noqa: E402
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.sampler import InfinityOptions, KeepScales, TextCondition, sample_infinity  # noqa: E402
from nextscale.models.nsarm.model import NSARM  # noqa: E402
from nextscale.models.nsarm.sampler import AreaNextInput  # noqa: E402
from nextscale.models.nsarm.tiles import color_fix  # noqa: E402

MAPPED = 5  # the recipe's network maps sides 1..8
FLIPS = (0.02, 0.05, 0.1, 0.2)


def accuracy(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    return [float((x == y).float().mean()) for x, y in zip(a, b, strict=False)]


def row(label: str, value) -> None:
    cells = " / ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else f"{value:.2f} dB"
    print(f"| {label} | {cells} |", flush=True)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    t2i_data.add_data_args(ap)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--model", default=None, help="an embedded SR model (training/train_sr.py's export)")
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    common.set_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = t2i_data.load_from_args(args)
    tok = BSQTokenizer.from_file(args.tokenizer).eval()
    held = common.spread(ds.split_indices("heldout"), args.count)
    lr = data.to_tensor(sr_data.degrade_batch(ds.images, held, args.seed, sr_data.HELDOUT_VARIANT))
    hr = data.to_tensor(ds.images[held])
    bic = sr_data.bicubic(lr)
    scales = list(SCHEDULE.scales)
    original, from_bicubic = tok.encode_bits(hr, scales), tok.encode_bits(bic, scales)

    def decoded(bits: list[torch.Tensor]) -> torch.Tensor:
        return tok.decode(tok.bits_to_summed_codes(bits, scales[-1]))

    def db(images: torch.Tensor) -> float:
        return float(psnr(images.clamp(-1, 1), hr).mean())

    print(f"{len(held)} held-out images, sides {[s[0] for s in scales]}, {MAPPED} mapped\n")
    print("| what | PSNR, or bit accuracy per scale |\n|---|---|")
    row("bicubic upscale", db(bic))
    for k in range(1, len(scales) + 1):
        row(f"original's first {k} scales", db(decoded(original[:k])))
    row("original's mapped scales + the bicubic upscale's bits for the rest", db(decoded(
        original[:MAPPED] + from_bicubic[MAPPED:])))
    for p in FLIPS:
        flipped = [b ^ (torch.rand(b.shape) < p) for b in original[MAPPED:]]
        row(f"original's mapped scales + its finer bits, {p:.0%} flipped", db(decoded(original[:MAPPED] + flipped)))
    row("bit accuracy of the bicubic upscale's bits", accuracy(from_bicubic, original))
    if not args.model:
        return

    model = NSARM.from_file(args.model).float().eval()
    flat = torch.cat([b.flatten(1, 2) for b in original], 1)
    text, mask = model.empty_prompt(len(held), "cpu")
    logits = model.forward_teacher(model.condition(text, mask, guided=False), teacher_inputs(AreaNextInput(tok), flat),
                                   SCHEDULE)
    predicted = logits.view(*flat.shape, 2).argmax(-1).bool()
    row("transformer, teacher-forced argmax", [float((predicted[:, sl] == flat[:, sl]).float().mean())
                                               for sl in scale_slices()])
    mapped = model.map_transformer.bits(tok.encode_latent(lr))
    row("network's bit accuracy (mapped scales)", accuracy(mapped, original))
    row("network's mapped scales + original's finer ones", db(decoded(mapped + original[MAPPED:])))

    def sample(keep: list[torch.Tensor]) -> torch.Tensor:
        tokens = sample_infinity(model, AreaNextInput(tok), TextCondition(text, mask), seed=args.seed,
                                 options=InfinityOptions(cfg=1.0, tau=0.5, schedule=model.schedule()),
                                 hooks=SamplerHooks(guide=KeepScales(keep, len(keep))))
        return tok.decode(tokens.summed_codes)

    row("original's mapped scales + transformer's (tau 0.5)", db(sample(original[:MAPPED])))
    upscaled = upscale(model, tok, lr, seed=args.seed)  # the recipe's evaluation path (NSARM's sampler)
    row("model's upscale (network + transformer, tau 0.5)", db(upscaled))
    row("model's upscale + colour fix (adain + wavelet)", db(color_fix(upscaled, lr, "adain + wavelet")))


if __name__ == "__main__":
    main()
