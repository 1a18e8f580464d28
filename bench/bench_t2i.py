"""Size the embedded text-to-image model: shipped bytes, four images on one thread, and a training step.

    python bench/bench_t2i.py                                   # the recipe's sizes (training/t2i.py)
    python bench/bench_t2i.py --depth 8 --embed-dim 192 --num-heads 3 --t5-width 96

Random weights (the trainers' initialisations), so the timings are those of the trained model with the same shapes:
sampling draws the same number of tokens whatever the weights. Reported: the fp16 bytes of the generator and the T5
encoder and the fp32 bytes of the tokenizer (what the recipe exports), the median wall time of four images (one
batch, guidance on, decoding included) over ``--runs`` runs with its split (the T5 encoder, the tokenizer's decoder,
the rest: the transformer's scale loop), and the median time of a training step of the joint
trainer at ``--batch-size`` (forward and backward of T5 + transformer; the tokenizer is not run, its bits are
cached), alternating the attention's split of the block-causal mask (docs/kernels.md) with the whole mask.
Everything runs on one thread. Not a test: numbers go to bench/RESULTS.md with the CPU, command and date.
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import t2i_text, train_bsq, train_t2i  # noqa: E402
from training.train_t2i import SCHEDULE, TextToImage  # noqa: E402


def fp_bytes(module: torch.nn.Module, bytes_per: int) -> int:
    return sum(t.numel() * (bytes_per if t.is_floating_point() else t.element_size())
               for t in module.state_dict().values())


class PhaseTimer:
    """Seconds spent in wrapped callables, summed per name."""

    def __init__(self):
        self.seconds: collections.Counter[str] = collections.Counter()

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t0
            return out

        return timed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3)
    known, rest = ap.parse_known_args(argv)
    args = train_t2i.build_parser().parse_args(["--data-dir", "-", "--tokenizer", "-", *rest])
    torch.set_num_threads(1)
    tok_args = train_bsq.build_parser().parse_args(["--data-dir", "-"])
    tokenizer = train_bsq.BSQTokenizer(train_bsq.config_from_args(tok_args)).eval()
    t5_cfg, gen_cfg = train_t2i.configs_from_args(args, tokenizer.codebook_dim)
    torch.manual_seed(0)
    model = TextToImage(t5_cfg, gen_cfg)
    sizes = {"generator_fp16": fp_bytes(model.generator, 2), "text_encoder_fp16": fp_bytes(model.text, 2),
             "tokenizer_fp32": fp_bytes(tokenizer, 4)}
    ptok = t2i_text.PromptTokenizer(args.t5_tokenizer)
    prompts = ["red star", "blue fish", "blue apple", "yellow car"]

    model.eval()
    train_t2i.generate(model, tokenizer, prompts, ptok, seed=0)  # warm-up
    timer = PhaseTimer()
    model.text.forward = timer.wrap("text encoder", model.text.forward)
    tokenizer.decode = timer.wrap("decoder", tokenizer.decode)
    times = []
    for r in range(known.runs):
        t0 = time.perf_counter()
        train_t2i.generate(model, tokenizer, prompts, ptok, seed=r + 1)
        times.append(time.perf_counter() - t0)
    split = {name: s / known.runs for name, s in timer.seconds.items()}
    split["transformer"] = sum(times) / known.runs - sum(split.values())

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, d = args.batch_size, tokenizer.codebook_dim
    bits = torch.rand(B, SCHEDULE.num_tokens, d) > 0.5
    ids, mask = ptok.batch(["a caption of a few words, category, folder"] * B, gen_cfg.text_maxlen)
    x = train_t2i.teacher_inputs(tokenizer, bits)
    infinity_model = sys.modules[type(model.generator).__module__]
    interval_mask = infinity_model.block_causal
    masks = {"split": interval_mask,
             "whole mask": lambda counts, device=None: interval_mask(counts, device).as_subclass(torch.Tensor)}
    step_times = {name: [] for name in masks}
    for _ in range(known.train_steps):
        for name, block_causal in masks.items():  # alternated, so that both see the same load
            infinity_model.block_causal = block_causal
            t0 = time.perf_counter()
            loss, _ = train_t2i.bit_loss(train_t2i.teacher_logits(model, ids, mask, None, x), bits.long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_times[name].append(time.perf_counter() - t0)
    infinity_model.block_causal = interval_mask

    print(f"cpu: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print(f"generator depth {gen_cfg.depth} width {gen_cfg.embed_dim} heads {gen_cfg.num_heads} "
          f"hidden {gen_cfg.hidden_dim}; T5 width {t5_cfg.d_model} layers {t5_cfg.num_layers}; "
          f"schedule {[h for h, _ in SCHEDULE.scales]} ({SCHEDULE.num_tokens} tokens), {d} bits")
    print("bytes: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items())
          + f", total {sum(sizes.values()) / 2**20:.2f} MiB")
    print(f"four images: median {statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)}); mean "
          "split " + ", ".join(f"{name} {s:.2f} s" for name, s in split.items()))
    for name, ts in step_times.items():
        print(f"training step, batch {B}, {name}: median {statistics.median(ts):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
