"""Speed and cost of the training-free acceleration (models/core/accel.py), one setting at a time against the plain
sampler.

    python bench/bench_accel.py cost --per-class 20
    python bench/bench_accel.py speed --model var-d16
    python bench/bench_accel.py speed --model var-d30 infinity-2b --blocks 4 --settings off "unguided 2"
    python bench/bench_accel.py flops

- ``cost``: the embedded model (weights/), the default sampling options of its card (cfg 4, top-k 900, top-p 0.95),
  ``--per-class`` images of each class, the same seeds for every setting: class accuracy and Frechet ratio from the
  card's classifier (training/evaluate.py's measures), the PSNR of each image against the plain image of its seed
  (mean over the images), and CPU seconds per image (sampling and decoding).
- ``speed``: official configs (VAR-d16 and VAR-d30 on the 256 px schedule, Infinity-2B on the 1:1 1024 px schedule)
  with random O(1)-scale weights, fp32, batch 1, cfg 4 (VAR) / 3 (Infinity): CPU seconds (process time, which a
  shared machine's other jobs do not inflate as they do wall time; wall time is printed too) per image of the
  scale loop, the ratio against the plain sampler, and token agreement per scale with the plain run of the same
  seed (for Infinity the fraction of equal bits). ``--blocks N`` builds the model with N of its blocks (same
  width, heads and schedule), for machines where the whole model is too slow.
- ``flops``: the multiply-adds of the scale loop per image for every setting and official model, counted from the
  schedule (linear layers, attention against the cache, the head; pruned tokens, dropped rows and skipped scales
  left out): the speed-up where time follows FLOPs (a CPU, or a GPU at large batch).

Every command takes ``--threads`` (default 1). Not a test: figures go to bench/RESULTS.md with the machine and
command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from packbootstrap import register_pack  # noqa: E402

register_pack()

from bench_sampler import randomise_  # noqa: E402
from nextscale.models.core.accel import Acceleration  # noqa: E402
from nextscale.models.core.hooks import SamplerHooks  # noqa: E402
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity, InfinityConfig  # noqa: E402
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, sample_infinity  # noqa: E402
from nextscale.models.infinity.schedule import InfinitySchedule  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions, sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402

# Scales counted from the end of the schedule (models/core/accel.py); pruning from FastVAR's layer 3.
SETTINGS = {
    "off": Acceleration(),
    "unguided 1": Acceleration(unguided_scales=1),
    "unguided 2": Acceleration(unguided_scales=2),
    "unguided 3": Acceleration(unguided_scales=3),
    "prune 1@0.5": Acceleration(prune_scales=1, keep_ratio=0.5),
    "prune 2@0.5": Acceleration(prune_scales=2, keep_ratio=0.5),
    "prune 2@0.25": Acceleration(prune_scales=2, keep_ratio=0.25),
    "prune 2@0.5 input": Acceleration(prune_scales=2, keep_ratio=0.5, restore="input"),
    "shortcut 1": Acceleration(shortcut_scales=1),
    "shortcut 2": Acceleration(shortcut_scales=2),
    "prune 2@0.5 from 0": Acceleration(prune_scales=2, keep_ratio=0.5, prune_from_layer=0),
    "fastvar": Acceleration(prune_scales=2, keep_ratio=0.5, shortcut_scales=2),
    "unguided 2 + prune 2@0.5": Acceleration(prune_scales=2, keep_ratio=0.5, unguided_scales=2),
    "fast": Acceleration(prune_scales=2, keep_ratio=0.5, unguided_scales=3, shortcut_scales=1),
}
MODELS = ("var-d16", "var-d30", "infinity-2b")
TEXT_TOKENS = 32  # random prompt features for Infinity


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


# -- flops ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Shape:
    """What the FLOP count needs of a model: blocks, width, linear multiply-adds per token and block (in units of
    ``C**2``), the head's outputs, text tokens attended per token (Infinity's cross-attention), token grids."""

    depth: int
    width: int
    linear_c2: int
    head_out: int
    text_tokens: int
    grids: list[tuple[int, int]]


def model_shape(name: str, blocks: int | None = None) -> Shape:
    if name.startswith("var"):
        cfg = VARConfig.official(int(name.split("-d")[1]))
        return Shape(blocks or cfg.depth, cfg.embed_dim, 12, cfg.vocab_size, 0, [(p, p) for p in cfg.patch_nums])
    cfg = InfinityConfig.official("2b")
    grids = list(InfinitySchedule.from_template(1.0, "1M").scales)
    return Shape(blocks or cfg.depth, cfg.embed_dim, 14, 2 * cfg.token_dim, TEXT_TOKENS, grids)


def flops_per_image(shape: Shape, accel: Acceleration, guided: bool = True) -> float:
    """Multiply-adds x 2 of one image's scale loop (see the module docstring)."""
    K, C, total = len(shape.grids), shape.width, 0.0
    cached = [0] * shape.depth  # tokens each block's cache holds
    for si, (h, w) in enumerate(shape.grids):
        if accel.shortcut(si, K):
            continue
        rows = 2 if guided and accel.guided(si, K) else 1
        l = h * w
        for layer in range(shape.depth):
            n = l
            if accel.pruned(si, K) and layer >= accel.prune_from_layer:
                n = max(1, int(l * accel.keep_ratio))
            cached[layer] += n
            total += rows * n * (shape.linear_c2 * C * C + 2 * cached[layer] * C + 2 * shape.text_tokens * C)
        total += rows * l * C * shape.head_out
    return 2 * total


def run_flops(args) -> list[dict]:
    out = []
    for name in MODELS:
        shape = model_shape(name)
        base = flops_per_image(shape, SETTINGS["off"])
        for setting in args.settings:
            f = flops_per_image(shape, SETTINGS[setting])
            out.append({"model": name, "setting": setting, "tflop": round(f / 1e12, 3), "ratio": round(base / f, 2)})
            print(f"{name:12s} {setting:18s} {f / 1e12:8.3f} TFLOP  {base / f:5.2f}x")
    return out


# -- speed ---------------------------------------------------------------------------------------------------------


def build(name: str, blocks: int | None):
    """The model (fp32, random weights) and a function ``run(accel, seed)`` returning its token maps."""
    if name.startswith("var"):
        cfg = VARConfig.official(int(name.split("-d")[1]))
        if blocks:
            cfg = dataclasses.replace(cfg, depth=blocks)
        with torch.device("meta"):
            var, vae = VAR(cfg), MultiScaleVQVAE(TokenizerConfig(patch_nums=cfg.patch_nums))
        var, vae = var.to_empty(device="cpu"), vae.to_empty(device="cpu")
        var.load_state_dict(VAR.rebuilt_buffers(cfg), strict=False)
        randomise_(var, 0)
        randomise_(vae, 1)
        var, vae = var.eval().requires_grad_(False), vae.eval().requires_grad_(False)
        options = SamplingOptions(cfg=4.0, top_k=900, top_p=0.96)

        def run(accel, seed):
            tokens = sample(var, vae, torch.tensor([seed % 1000]), seed=seed, options=options,
                            hooks=SamplerHooks(accel=accel))
            return tokens.indices

        return run
    cfg = InfinityConfig.official("2b")
    if blocks:
        cfg = dataclasses.replace(cfg, depth=blocks, block_chunks=1)
    with torch.device("meta"):
        model = Infinity(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(Infinity.rebuilt_buffers(cfg), strict=False)
    randomise_(model, 0)
    model = model.eval().requires_grad_(False)
    tok = BSQTokenizer(BSQConfig(codebook_dim=cfg.token_dim, base_ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval()
    schedule = InfinitySchedule.from_template(1.0, "1M")
    options = InfinityOptions(cfg=3.0, tau=0.5, schedule=schedule)

    def run(accel, seed):
        g = torch.Generator().manual_seed(seed)
        text = TextCondition(torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=g),
                             torch.ones(1, TEXT_TOKENS, dtype=torch.bool))
        return sample_infinity(model, tok, text, seed=seed, options=options, hooks=SamplerHooks(accel=accel)).bits

    return run


def agreement(maps: list[torch.Tensor], plain: list[torch.Tensor]) -> list[float]:
    return [round((a == b).float().mean().item(), 3) for a, b in zip(maps, plain)]


def run_speed(args) -> list[dict]:
    out = []
    for name in args.model:
        run = build(name, args.blocks)
        shape = model_shape(name, args.blocks)
        plain_maps, plain_s = None, None
        for setting in ["off"] + [s for s in args.settings if s != "off"]:
            accel = SETTINGS[setting]
            cpu, wall = [], []
            for _ in range(args.runs):
                c, t = time.process_time(), time.perf_counter()
                with torch.inference_mode():
                    maps = run(accel, args.seed)
                cpu.append(time.process_time() - c)
                wall.append(time.perf_counter() - t)
            seconds = min(cpu)
            if setting == "off":
                plain_maps, plain_s = maps, seconds
            row = {"model": name, "blocks": shape.depth, "setting": setting, "cpu_s_per_image": round(seconds, 2),
                   "wall_s_per_image": round(min(wall), 2), "ratio": round(plain_s / seconds, 2),
                   "flop_ratio": round(flops_per_image(shape, SETTINGS["off"]) / flops_per_image(shape, accel), 2),
                   "agreement_per_scale": agreement(maps, plain_maps)}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


# -- cost ----------------------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a - b).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def run_cost(args) -> list[dict]:
    from training import classifier as clf
    from training import data
    from training.evaluate import generate

    weights = ROOT / "weights"
    tokenizer = MultiScaleVQVAE.from_file(str(weights / "nextscale_tokenizer.safetensors"))
    var = VAR.from_file(str(weights / "nextscale_generator.safetensors")).float()
    model, _ = clf.load_classifier(str(weights / "classifier.safetensors"))
    K = var.num_classes
    labels = torch.arange(args.per_class * K) % K
    n = len(labels)
    held = data.synthetic_dataset(0, "heldout", 2 * n, tokenizer.config.image_size)
    xh, yh = held.tensors()
    options = SamplingOptions()
    out, plain = [], None
    for setting in ["off"] + [s for s in args.settings if s != "off"]:
        c = time.process_time()
        images = generate(var, tokenizer, labels, args.seed, options, hooks=SamplerHooks(accel=SETTINGS[setting]))
        seconds = (time.process_time() - c) / n
        if setting == "off":
            plain, plain_s = images, seconds
        m = clf.compare(model, images, labels, xh[:n], yh[:n], xh[n:], K)
        row = {"setting": setting, "images": n, "class_accuracy": round(m["class_accuracy"], 3),
               "frechet_ratio": round(m["frechet_ratio"], 2),
               "psnr_vs_plain_db": round(psnr(images, plain).clamp_max(99).mean().item(), 1),
               "cpu_s_per_image": round(seconds, 4), "ratio": round(plain_s / seconds, 2)}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("cost", "speed", "flops"))
    parser.add_argument("--model", nargs="+", default=["var-d16"], choices=MODELS)
    parser.add_argument("--blocks", type=int, default=None, help="build the model with this many blocks")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1, help="timed runs per setting (the fastest is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    rows = {"cost": run_cost, "speed": run_speed, "flops": run_flops}[args.command](args)
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "argv": sys.argv[1:], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
