"""The memory model against measured peaks on the CPU, and the table of official sizes on cards (docs/memory.md).

One run prints both parts:

1. **Measured**: the peak of tensor bytes a run allocates (:class:`~nextscale.models.core.memory.PeakMeter`)
   against the family's prediction (``MemoryNeed.sampling`` for a sampling run, ``.decode`` for a decode): the
   embedded VAR at batch 1 and 4, VAR-d16 (official config, random weights, 256 px, fp32) at batch 1 and 4, a
   small Infinity config (the official architecture at width 256, a 32 x 32-latent schedule) at batch 1 and 4, and
   the tokenizers' decodes. cfg on (two rows per image), top-p 0.9.
2. **Table**: official sizes built on the ``meta`` device (no memory used): weights per storage dtype, the KV cache
   per batch, and for each card (8 ... 80 GB) and batch the first setting, in order of quality cost, whose weights
   and working memory fit the card whole (no weights streamed), and before it the planner's sub-batches of an
   earlier setting when they fit. A card of N GB has N GiB (8 GB = 8192 MiB); its usable memory is that less
   0.9 GiB (the CUDA context, about 0.5 GiB, and ComfyUI's reserve of 0.4 GiB).

3. ``--part fp8`` (not in the default run): the cost of fp8 storage with per-tensor scales, as the loaders'
   ``fp8_e4m3fn`` stores the matrices, against bf16 storage, both computed in fp32 (the storage's error alone):
   logit error and greedy token agreement of teacher-forced logits on VAR-d16 (official config, ``init_weights``,
   256 px) and on Infinity-2B's layer shape (width 2048, 16 heads, MLP 8192) at depth 4 and the 0.06M schedule;
   then the embedded model's class accuracy and Frechet ratio (``training.evaluate``, two draws of 500 images).

    OMP_NUM_THREADS=1 nice -n 15 .testbed/venv/bin/python bench/bench_memory.py
    .testbed/venv/bin/python bench/bench_memory.py --part table      # the table alone (seconds)
    OMP_NUM_THREADS=1 nice -n 15 .testbed/venv/bin/python bench/bench_memory.py --part fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from packbootstrap import register_pack  # noqa: E402

register_pack(ROOT)

from nextscale.models.core.checkpoint import save_safetensors  # noqa: E402
from nextscale.models.core.family import FAMILIES, Workload  # noqa: E402
from nextscale.models.core.memory import GiB, PeakMeter, largest_batch, size, weight_bytes  # noqa: E402
from nextscale.models.core.schedule import SCHEDULE_512  # noqa: E402
from nextscale.models.core.tokens import NextScaleBitTokens  # noqa: E402
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity, InfinityConfig  # noqa: E402
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, latent_scales  # noqa: E402
from nextscale.models.infinity.schedule import InfinitySchedule  # noqa: E402
from nextscale.models.kv.policies import KVPolicySpec  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402

VAR_FAMILY, INFINITY_FAMILY = FAMILIES.get("var"), FAMILIES.get("infinity")
WEIGHTS = os.path.join(ROOT, "weights")
CARDS_GB = (8, 12, 16, 24, 48, 80)
RESERVED = 0.9 * GiB  # CUDA context and ComfyUI's EXTRA_RESERVED_VRAM
BATCHES = (1, 4, 16)
FP8 = torch.float8_e4m3fn
# Settings in order of quality cost (docs/memory.md: ScaleKV's PSNR against the full cache on the embedded model).
SETTINGS = (
    ("bf16", None), ("bf16", 0.5), ("fp8", None), ("fp8", 0.5), ("bf16", 0.25), ("fp8", 0.25), ("bf16", 0.1),
    ("fp8", 0.1),
)


# -- 1. measured -----------------------------------------------------------------------------------------------


def measured_rows() -> list[tuple[str, int, int]]:
    """(what, predicted, measured) for every CPU row."""
    rows = []
    options = SamplingOptions(cfg=2.0, top_p=0.9)
    torch.manual_seed(0)
    pairs = {
        "embedded VAR (d8, 64 px)": (
            VAR.from_file(os.path.join(WEIGHTS, "nextscale_generator.safetensors")),
            MultiScaleVQVAE.from_file(os.path.join(WEIGHTS, "nextscale_tokenizer.safetensors")),
        ),
        "VAR-d16, random weights (256 px)": (
            VAR(VARConfig.official(16)).eval().requires_grad_(False), MultiScaleVQVAE(TokenizerConfig()).eval()
        ),
    }
    for name, (var, vae) in pairs.items():
        for batch in (1, 4):
            with PeakMeter() as meter:
                tokens = VAR_FAMILY.sample(var, vae, torch.arange(batch), seed=0, options=options)
            need = VAR_FAMILY.memory(var, None, Workload(batch_size=batch))
            rows.append((f"{name}, sampling, batch {batch}", need.sampling, meter.peak))
            with PeakMeter() as meter:
                VAR_FAMILY.decode(vae, tokens)
            decode = VAR_FAMILY.memory(None, vae, Workload(decode_batch=batch)).decode
            rows.append((f"{name}, decode, batch {batch}", decode, meter.peak))
    config = InfinityConfig(depth=8, embed_dim=256, num_heads=4, hidden_dim=1024, token_dim=16, text_dim=64,
                            text_maxlen=32)
    schedule = InfinitySchedule.custom([(1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32)])
    torch.manual_seed(0)
    model = Infinity(config).eval().requires_grad_(False)
    tok = BSQTokenizer(BSQConfig(16, base_ch=64, ch_mult=(1, 2, 2), num_res_blocks=1)).eval()
    for batch in (1, 4):
        g = torch.Generator().manual_seed(batch)
        condition = TextCondition(torch.randn(batch, 12, 64, generator=g), torch.ones(batch, 12, dtype=torch.bool))
        with PeakMeter() as meter:
            tokens = INFINITY_FAMILY.sample(model, tok, condition, seed=0,
                                            options=InfinityOptions(cfg=3.0, top_p=0.9, schedule=schedule))
        need = INFINITY_FAMILY.memory(model, None, Workload(batch_size=batch, schedule=schedule, text_tokens=12))
        rows.append((f"Infinity d8 w256, random weights (32x32 latent), sampling, batch {batch}", need.sampling,
                     meter.peak))
        with PeakMeter() as meter:
            INFINITY_FAMILY.decode(tok, NextScaleBitTokens(bits=tokens.bits, scales=tokens.scales))
        decode = INFINITY_FAMILY.memory(None, tok, Workload(decode_batch=batch, schedule=tokens.scales)).decode
        rows.append((f"BSQ tokenizer f4 (128 px), decode, batch {batch}", decode, meter.peak))
        for bands in (4, 16) if batch == 1 else ():  # one image that does not fit whole: decoded in bands of rows
            with PeakMeter() as meter:
                INFINITY_FAMILY.decode(tok, NextScaleBitTokens(bits=tokens.bits, scales=tokens.scales), bands=bands)
            decode = INFINITY_FAMILY.memory(None, tok, Workload(decode_batch=1, schedule=tokens.scales,
                                                                decode_bands=bands)).decode
            rows.append((f"BSQ tokenizer f4 (128 px), decode in {bands} bands, batch 1", decode, meter.peak))
    return rows


def print_measured() -> None:
    print("| run | predicted | measured | predicted / measured |")
    print("|---|---|---|---|")
    for what, predicted, peak in measured_rows():
        print(f"| {what} | {size(predicted)} | {size(peak)} | {predicted / peak:.3f} |")


# -- 2. the table ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Official:
    """An official model built on ``meta``: its family, generator, tokenizer, schedule and its resolution."""

    name: str
    family: object
    generator: torch.nn.Module
    tokenizer: torch.nn.Module
    schedule: object
    pixels: str

    @functools.cache  # noqa: B019 (a handful of models, each alive for the whole run)
    def need(self, batch: int, storage: str, budget: float | None):
        geometry = self.family.kv_geometry(self.generator, self.schedule)
        policy = None if budget is None else KVPolicySpec("scalekv", budget).bind_scales(
            geometry.layers, geometry.heads, geometry.scales
        )
        workload = Workload(batch_size=batch, schedule=self.schedule, kv_policy=policy, dtype=torch.bfloat16)
        need = self.family.memory(self.generator, self.tokenizer, workload)
        weights = weight_bytes(self.generator, torch.bfloat16, FP8 if storage == "fp8" else None)
        return dataclasses.replace(need, weights=weights + weight_bytes(self.tokenizer))

    def decode(self) -> int:
        """NextScale Decode's working memory for one image at full size (fp32 tokenizer)."""
        return self.family.memory(None, self.tokenizer, Workload(decode_batch=1, schedule=self.latent)).decode

    @property
    def latent(self):
        if self.family is INFINITY_FAMILY:
            return latent_scales(self.generator, self.tokenizer, self.schedule)
        return self.schedule


def officials() -> list[Official]:
    with torch.device("meta"):
        var_tok = MultiScaleVQVAE(TokenizerConfig())
        rows = [
            Official(f"VAR-d{d}", VAR_FAMILY, VAR(VARConfig.official(d)), var_tok, None, "256")
            for d in (16, 20, 24, 30)
        ]
        rows.append(Official("VAR-d36", VAR_FAMILY, VAR(VARConfig.official(36)),
                             MultiScaleVQVAE(TokenizerConfig(patch_nums=SCHEDULE_512)), SCHEDULE_512, "512"))
        one_megapixel = InfinitySchedule.from_template(1.0, "1M")
        rows.append(Official("Infinity-2B", INFINITY_FAMILY, Infinity(InfinityConfig.official("2b")),
                             BSQTokenizer(BSQConfig(32)), one_megapixel, "1024"))
        rows.append(Official("Infinity-8B", INFINITY_FAMILY, Infinity(InfinityConfig.official("8b")),
                             BSQTokenizer(BSQConfig(14, ch_mult=(1, 2, 4, 4))), one_megapixel, "1024"))
    return rows


def describe_setting(storage: str, budget: float | None) -> str:
    return f"{storage}, " + ("full cache" if budget is None else f"ScaleKV {budget:.0%}")


def fitting(model: Official, batch: int, card: int) -> str:
    """The first setting (in order of quality cost) that fits ``batch`` images whole on the card, and an earlier
    one that the planner runs in sub-batches, if any."""
    usable = card * GiB - RESERVED
    cells = []
    for storage, budget in SETTINGS:
        need = model.need(batch, storage, budget)
        if need.total <= usable:
            cells.append(f"{describe_setting(storage, budget)} ({size(need.total)})")
            break
        weights = model.need(1, storage, budget).weights
        images = largest_batch(lambda n, s=storage, b=budget: model.need(n, s, b).working, batch, usable - weights)
        if images and not cells:
            cells.append(f"{describe_setting(storage, budget)} in sub-batches of {images}")
    return "; ".join(cells) or "does not fit"


def print_table() -> None:
    models = officials()
    print("| model | px | weights bf16 | weights fp8 | KV cache, batch 1 | batch 4 | batch 16 | sampling, batch 1 "
          "| decode, 1 image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in models:
        kv = [m.need(b, "bf16", None).kv_cache for b in BATCHES]
        print(f"| {m.name} | {m.pixels} | {size(m.need(1, 'bf16', None).weights)} | "
              f"{size(m.need(1, 'fp8', None).weights)} | {' | '.join(size(k) for k in kv)} | "
              f"{size(m.need(1, 'bf16', None).working)} | {size(m.decode())} |")
    print()
    print("| model | batch | " + " | ".join(f"{c} GB" for c in CARDS_GB) + " |")
    print("|---|---|" + "---|" * len(CARDS_GB))
    for m in models:
        for batch in BATCHES:
            print(f"| {m.name} | {batch} | " + " | ".join(fitting(m, batch, c) for c in CARDS_GB) + " |")


# -- 3. the cost of fp8 --------------------------------------------------------------------------------------------


def stored(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (fp32) with every ``Linear`` matrix rounded through ``dtype`` storage and back: bf16 as it is, fp8
    divided by its per-tensor scale (largest magnitude / 448) as the loaders store it, then multiplied back."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                w = layer.weight
                scale = w.abs().amax() / torch.finfo(dtype).max if dtype is FP8 else torch.ones(())
                w.copy_((w / scale).to(dtype).float() * scale)
    return module


def agreement(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative logit error and the share of positions whose argmax agrees."""
    error = ((got - ref).norm() / ref.norm()).item()
    return error, (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def fp8_logits() -> None:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    var = VAR(VARConfig.official(16)).eval().requires_grad_(False)
    var.init_weights()
    labels, inputs = torch.tensor([207]), torch.randn(1, var.num_tokens - 1, var.config.cvae, generator=g)
    state = {k: v.clone() for k, v in var.state_dict().items()}
    with torch.inference_mode():
        ref = stored(var, torch.bfloat16).forward_teacher(labels, inputs)
        var.load_state_dict(state)
        got = stored(var, FP8).forward_teacher(labels, inputs)
    print("| model | logit error, fp8 vs bf16 storage | greedy token agreement |")
    print("|---|---|---|")
    error, agree = agreement(got, ref)
    print(f"| VAR-d16 (init_weights, 256 px, 680 tokens) | {error:.4f} | {agree:.3f} |")
    config = dataclasses.replace(InfinityConfig.official("2b"), depth=4, block_chunks=4)
    torch.manual_seed(0)
    model = Infinity(config).eval().requires_grad_(False)
    model.init_weights()
    schedule = InfinitySchedule.from_template(1.0, "0.06M")
    L = sum(schedule.token_counts)
    text = torch.randn(1, 24, config.text_dim, generator=g)
    inputs = torch.randn(2, L - schedule.token_counts[0], config.token_dim, generator=g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        stored(model, torch.bfloat16)
        ref = model.forward_teacher(model.condition(text, torch.ones(1, 24, dtype=torch.bool)), inputs, schedule)
        model.load_state_dict(state)
        stored(model, FP8)
        got = model.forward_teacher(model.condition(text, torch.ones(1, 24, dtype=torch.bool)), inputs, schedule)
    bits = lambda logits: logits.reshape(*logits.shape[:-1], -1, 2)  # noqa: E731 (each bit's two logits)
    error, agree = agreement(bits(got), bits(ref))
    print(f"| Infinity-2B layers at depth 4 (0.06M schedule, {L} tokens, bits) | {error:.4f} | {agree:.3f} |")


def fp8_embedded() -> None:
    sys.path.insert(0, ROOT)  # training/ (the classifier and its metrics)
    from training.evaluate import evaluate

    print("\n| embedded generator stored in | class accuracy (2 draws) | Frechet ratio (2 draws) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3fn, scaled", FP8)):
            var = stored(VAR.from_file(os.path.join(WEIGHTS, "nextscale_generator.safetensors")), dtype)
            path = os.path.join(folder, "generator.safetensors")
            save_safetensors(var.state_dict(), path, metadata={"nextscale_config": var.config.to_dict()})
            metrics = evaluate(os.path.join(WEIGHTS, "nextscale_tokenizer.safetensors"), path,
                               os.path.join(WEIGHTS, "classifier.safetensors"), per_class=50, repeats=2, timing=False,
                               tokenizer_count=100)["generator"]["repeats"]
            accuracy = ", ".join(f"{a:.3f}" for a in metrics["class_accuracy"])
            ratio = ", ".join(f"{r:.2f}" for r in metrics["frechet_ratio"])
            print(f"| {name} | {accuracy} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "measured", "table", "fp8"), default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in ("all", "measured"):
        start = time.time()
        print_measured()
        print(f"\n(measured in {time.time() - start:.0f} s)\n")
    if args.part in ("all", "table"):
        print_table()
    if args.part == "fp8":
        fp8_logits()
        fp8_embedded()


if __name__ == "__main__":
    main()
