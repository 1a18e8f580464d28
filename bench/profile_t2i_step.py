"""Where a step of the text-to-image generator trainer (training/train_t2i.py) goes, phase by phase, on one thread.

    OMP_NUM_THREADS=1 python bench/profile_t2i_step.py --data-dir runs/t2i/data \\
        --tokenizer runs/t2i/tokenizer.safetensors [--steps 6]

The trainer's own functions on the real data with the recipe's sizes (extra arguments go to the trainer's parser,
e.g. ``--depth 4``), fresh weights: the batch and captions of each step, the cached bits unpacked into the labels and
the teacher inputs, the T5 forward, the transformer forward, the backward, clipping with AdamW, the EMA. Encoding the
batch with the tokenizer is timed too, though a step does not run it (the trainer reads the bits from its cache).
Prints the median of each phase over the steps after the first. Not a test: numbers go to bench/RESULTS.md with the
CPU, the load and the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import common, t2i_data, t2i_text, train_t2i  # noqa: E402
from training.train_t2i import SCHEDULE, BSQTokenizer, TextToImage  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    known, rest = ap.parse_known_args(argv)
    args = train_t2i.build_parser().parse_args(rest)
    torch.set_num_threads(1)
    ds = t2i_data.load_from_args(args)
    tokenizer = BSQTokenizer.from_file(args.tokenizer)
    ptok = t2i_text.PromptTokenizer(args.t5_tokenizer)
    t5_cfg, gen_cfg = train_t2i.configs_from_args(args, tokenizer.codebook_dim)
    torch.manual_seed(args.seed)
    model = TextToImage(t5_cfg, gen_cfg).train()
    ema = common.EMA(model, args.ema)
    opt = common.adamw(model, args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    batches = common.StepBatches((torch.from_numpy(ds.split_indices("train")),), args.batch_size, args.seed)
    phases: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases.setdefault(name, []).append(now - t0)
        return now

    for step in range(known.steps):
        t = time.perf_counter()
        idx = batches.batch(step)[0].numpy()
        packed = train_t2i.encode_images(tokenizer, ds.images[idx])
        t = lap("tokenizer encode (not in a step: cached)", t)
        captions, drop = train_t2i.step_captions(ds.captions(idx), args.seed, step, args.text_drop)
        bits = train_t2i.unpack_bits(packed, tokenizer.codebook_dim)
        ids, mask = ptok.batch(captions, gen_cfg.text_maxlen)
        t = lap("captions, T5 tokens, bits", t)
        x = train_t2i.teacher_inputs(tokenizer, bits)
        t = lap("teacher inputs", t)
        text = model.features(ids, mask, drop)
        t = lap("T5 forward", t)
        ctx = model.generator.condition(text, mask, guided=False)
        logits = model.generator.forward_teacher(ctx, x, SCHEDULE).float()
        t = lap("transformer forward", t)
        loss, _ = train_t2i.bit_loss(logits, bits.long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t = lap("loss and backward", t)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        t = lap("clipping and AdamW", t)
        ema.update(model, step)
        lap("EMA", t)

    medians = {name: statistics.median(ts[1:] or ts) for name, ts in phases.items()}
    step_total = sum(m for name, m in medians.items() if not name.startswith("tokenizer"))
    print(f"one thread, batch {args.batch_size}, load average {os.getloadavg()[0]:.1f}; "
          f"medians of steps 2-{known.steps}")
    for name, m in medians.items():
        share = "" if name.startswith("tokenizer") else f" {100 * m / step_total:5.1f} %"
        print(f"{name:42s} {m:7.3f} s{share}")
    print(f"{'step':42s} {step_total:7.3f} s")


if __name__ == "__main__":
    main()
