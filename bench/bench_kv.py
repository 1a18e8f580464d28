"""KV-cache policies: memory kept and fidelity against the full cache, per policy and budget.

Two parts:

1. ``--part memory``: the KV cache of d16/d30/d36-size configs (256 px / 512 px schedules, fp16 keys and values,
   CFG rows) driven by synthetic keys and queries through the real :class:`~nextscale.models.core.kv_cache.KVCache` and
   the policies' ``after_attention`` (the transformer itself is skipped; the cache does not depend on it). Peak
   bytes (buffers plus working copy) and the bytes carried between scales, measured from the cache. ScaleKV and HACK
   use a random profile of the right shape (memory depends on the budgets only).
2. ``--part fidelity``: a d16-size generator with random weights (and a small random 256 px tokenizer) sampled
   with the full cache and with each policy on the same labels and seeds: token agreement per scale and PSNR of
   the decoded images, after a 2-sample calibration. Random weights have no trained attention structure: this
   measures the machinery, not the methods' quality (the trained embedded model is the real test).
3. ``--part embedded``: that real test, on the embedded trained model of ``weights/``: mean PSNR of the decoded
   image against the full-cache image and token agreement (mean over scales / last scale), four classes (seeds
   0..3), cfg 2, profile calibrated on 2 samples (what ``tests/test_kv_policies.py::test_fidelity_ordering``
   computes at 25 % and 50 %).
4. ``--part t2i``: the same on the embedded text-to-image model (an Infinity transformer, ``weights/nextscale_t2i_*``)
   at 0.06M 1:1: four prompts (seeds 0..3), cfg 3, tau 0.5, ScaleKV and HACK calibrated by
   :func:`~nextscale.models.kv.profile.record_profile` on another prompt (2 seeds, what NextScale KV Calibrate (Text)
   runs) and uncalibrated; PSNR against the full-cache image and bit agreement (mean over scales / last scale).
5. ``--part greedy``: HACK's greedy tokens (top-k 1) on the embedded model, budgets 10 / 25 / 50 %, four classes
   (two images each, cfg 2); ``--save`` writes them, ``--compare`` counts the tokens that differ from a saved run
   (e.g. one made at an earlier commit, with this script copied into that checkout).

    OMP_NUM_THREADS=1 nice -n 15 .testbed/venv/bin/python bench/bench_kv.py --part memory
    OMP_NUM_THREADS=1 nice -n 15 .testbed/venv/bin/python bench/bench_kv.py --part fidelity
    .testbed/venv/bin/python bench/bench_kv.py --part embedded
    .testbed/venv/bin/python bench/bench_kv.py --part greedy --save /tmp/hack_tokens.pt
    NEXTSCALE_COMFYUI_DIR=.testbed/comfyui .testbed/venv/bin/python bench/bench_kv.py --part t2i
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from packbootstrap import register_pack  # noqa: E402

register_pack(ROOT)

from nextscale.models.core.kv_cache import KVCache  # noqa: E402
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.kv.policies import POLICIES, KVPolicySpec  # noqa: E402
from nextscale.models.kv.profile import KVProfile, calibrate  # noqa: E402
from nextscale.models.kv.report import decode, kv_report, run_with  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402

BUDGETS = (0.5, 0.25, 0.1)


class Shape:
    """What ``KVPolicySpec.bind`` reads from a generator."""

    def __init__(self, config: VARConfig):
        self.config, self.depth, self.patch_nums, self.num_tokens = (config, config.depth, config.patch_nums,
                                                                     config.num_tokens)


def random_profile(cfg: VARConfig, seed: int = 0) -> KVProfile:
    g = torch.Generator().manual_seed(seed)
    K, L, H = len(cfg.patch_nums), cfg.depth, cfg.num_heads
    return KVProfile(L, H, cfg.patch_nums, torch.rand(L, K, generator=g).tolist(),
                     torch.randn(L, K, generator=g).tolist(), torch.rand(L, H, generator=g).tolist())


@torch.no_grad()
def drive_cache(cfg: VARConfig, policy, rows: int, dtype=torch.float16) -> None:
    """Run the scale loop's cache traffic: per scale and layer, extend with random keys/values, attend nothing,
    call after_attention with random queries."""
    cache = KVCache(cfg.depth, cfg.num_tokens, policy)
    H, c = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    g = torch.Generator().manual_seed(0)
    try:
        for si, pn in enumerate(cfg.patch_nums):
            cache.begin_scale(si)
            for layer in range(cfg.depth):
                kv = cache[layer]
                k = torch.nn.functional.normalize(torch.randn(rows, H, pn * pn, c, generator=g), dim=-1).to(dtype)
                kv.extend(k, k)
                kv.after_attention((torch.randn(rows, H, pn * pn, c, generator=g) * 4).to(dtype))
    finally:
        cache.free()


def part_memory(batches=(1, 16), max_gb: float = 1.5) -> None:
    print("| config | batch | policy | budget | peak KV MB | of full | carried MB | of full |")
    print("|---|---|---|---|---|---|---|---|")
    for depth in (16, 30, 36):
        cfg = VARConfig.official(depth)
        shape, profile = Shape(cfg), random_profile(cfg)
        for batch in batches:
            rows = 2 * batch
            full_bytes = 2 * cfg.depth * cfg.num_tokens * cfg.embed_dim * 2 * rows
            if full_bytes > max_gb * 1e9:
                print(f"| d{depth} | {batch} | (skipped: the full cache is {full_bytes / 1e9:.1f} GB, over "
                      f"--max-gb {max_gb:g}; the cache is linear in the batch) |")
                continue
            full = KVPolicySpec("full").bind(shape, batch)
            drive_cache(cfg, full, rows)
            fp, fc = full.stats.peak_bytes, full.stats.carried_bytes()
            print(f"| d{depth} | {batch} | full | 1 | {fp / 1e6:.1f} | 100% | {fc / 1e6:.1f} | 100% |")
            for policy in POLICIES[1:]:
                for budget in BUDGETS:
                    bound = KVPolicySpec(policy, budget, profile).bind(shape, batch)
                    drive_cache(cfg, bound, rows)
                    p, cb = bound.stats.peak_bytes, bound.stats.carried_bytes()
                    print(f"| d{depth} | {batch} | {policy} | {budget:.0%} | {p / 1e6:.1f} | {p / fp:.1%} | "
                          f"{cb / 1e6:.1f} | {cb / fc:.1%} |", flush=True)


def part_fidelity(classes=(1, 2), seeds=(0,)) -> None:
    torch.manual_seed(0)
    cfg = VARConfig(depth=16, embed_dim=1024, num_heads=16, num_classes=1000)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_sampler import randomize_  # O(1)-scale random weights: every block and head active

    var = randomize_(VAR(cfg), seed=0).requires_grad_(False)
    tcfg = TokenizerConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False)
    vae = MultiScaleVQVAE(tcfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # O(1) weights: decoded images vary with the tokens
        for p in vae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    options = SamplingOptions(cfg=4.0, top_k=900, top_p=0.95)
    t0 = time.time()
    profile = calibrate(var, vae, [3, 4], seed=100, options=options)
    print(f"calibration (2 samples): {time.time() - t0:.1f} s", flush=True)
    print("| policy | budget | peak KV of full | carried of full | token agreement (last 4 scales) | PSNR dB |")
    print("|---|---|---|---|---|---|")
    fulls = {}
    for label in classes:
        for seed in seeds:
            tokens, policy = run_with(var, vae, [label], seed, KVPolicySpec("full"), options)
            fulls[(label, seed)] = (tokens, policy, decode(vae, tokens))
    print(f"full-cache runs done: {time.time() - t0:.1f} s", flush=True)
    for policy in POLICIES[1:]:
        for budget in BUDGETS:
            rows = []
            for label in classes:
                for seed in seeds:
                    r = kv_report(var, vae, [label], seed, KVPolicySpec(policy, budget, profile), options,
                                  full=fulls[(label, seed)])
                    rows.append(r)
            n = len(rows)
            agree = [sum(r.token_agreement[i] for r in rows) / n for i in range(-4, 0)]
            psnr = sum(min(r.psnr, 99.0) for r in rows) / n
            print(f"| {policy} | {budget:.0%} | {rows[0].peak_ratio:.1%} | {rows[0].carried_ratio:.1%} | "
                  f"{', '.join(f'{a:.2f}' for a in agree)} | {psnr:.2f} |", flush=True)


def part_embedded(budgets=(0.1, 0.25, 0.5), policies=("recent", "strided", "scalekv", "hack")) -> None:
    var, vae = embedded_pair()
    labels = list(range(4))
    options = SamplingOptions(cfg=2.0)
    profile = calibrate(var, vae, labels[:2], seed=100)
    fulls = {label: run_with(var, vae, [label], i, KVPolicySpec("full"), options) for i, label in enumerate(labels)}
    fulls = {label: (t, p, decode(vae, t)) for label, (t, p) in fulls.items()}
    psnr, agree = {}, {}
    for policy in policies:
        for budget in budgets:
            rows = [kv_report(var, vae, [label], i, KVPolicySpec(policy, budget, profile), options, full=fulls[label])
                    for i, label in enumerate(labels)]
            psnr[policy, budget] = sum(min(r.psnr, 60.0) for r in rows) / len(rows)
            agree[policy, budget] = (sum(sum(r.token_agreement) / len(r.token_agreement) for r in rows) / len(rows),
                                     sum(r.token_agreement[-1] for r in rows) / len(rows))
    head = " | ".join(f"{b:.0%}" for b in budgets)
    print(f"| policy | {head} |\n|---|" + "---|" * len(budgets))
    for policy in policies:
        print(f"| {policy} | " + " | ".join(f"{psnr[policy, b]:.2f}" for b in budgets) + " |")
    print(f"\n| policy | {head} |\n|---|" + "---|" * len(budgets))
    for policy in policies:
        print(f"| {policy} | " + " | ".join("{:.3f} / {:.3f}".format(*agree[policy, b]) for b in budgets) + " |")


def part_t2i(budgets=(0.1, 0.25, 0.5), policies=("recent", "strided", "scalekv", "hack")) -> None:
    from nextscale.models.infinity.family import FAMILY
    from nextscale.models.infinity.sampler import InfinityOptions, TextCondition
    from nextscale.models.infinity.schedule import InfinitySchedule
    from nextscale.models.kv.profile import record_profile

    sys.path.insert(0, ROOT)
    from training import t2i_text
    from training.t2i_evaluate import load_model

    weights = os.path.join(ROOT, "weights")
    model = load_model(os.path.join(weights, "nextscale_t2i_generator.safetensors"),
                       os.path.join(weights, "nextscale_t2i_text_encoder.safetensors")).eval()
    gen = model.generator
    tok = BSQTokenizer.from_file(os.path.join(weights, "nextscale_t2i_tokenizer.safetensors")).eval()
    words = t2i_text.PromptTokenizer()

    def condition(prompt: str) -> TextCondition:
        ids, mask = words.batch([prompt], gen.config.text_maxlen)
        with torch.no_grad():
            return TextCondition(model.features(ids, mask), mask)

    schedule = InfinitySchedule.from_template(1.0, "0.06M")
    options = InfinityOptions(cfg=3.0, tau=0.5, schedule=schedule)
    profile = record_profile(FAMILY, gen, tok, [condition("green tree")] * 2, seed=100, options=options,
                             schedule=schedule)

    conds = [condition(p) for p in ("red star", "yellow car", "black cat", "blue fish")]
    fulls = []
    for i, c in enumerate(conds):
        tokens, policy = run_with(gen, tok, c, i, KVPolicySpec("full"), options, family=FAMILY, schedule=schedule)
        fulls.append((tokens, policy, decode(tok, tokens, FAMILY)))
    rows = []
    for policy in policies:
        for calibrated in (True, False) if policy in ("scalekv", "hack") else (False,):
            cells = []
            for budget in budgets:
                spec = KVPolicySpec(policy, budget, profile if calibrated else None)
                reports = [kv_report(gen, tok, c, i, spec, options, full=fulls[i], family=FAMILY, schedule=schedule)
                           for i, c in enumerate(conds)]
                psnr = sum(min(r.psnr, 60.0) for r in reports) / len(reports)
                agree = sum(sum(r.token_agreement) / len(r.token_agreement) for r in reports) / len(reports)
                last = sum(r.token_agreement[-1] for r in reports) / len(reports)
                cells.append(f"{psnr:.2f} dB, {agree:.3f} / {last:.3f}")
            name = policy + (" (calibrated)" if calibrated else " (uncalibrated)" if policy in ("scalekv", "hack")
                             else "")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print(f"| policy | {' | '.join(f'{b:.0%}' for b in budgets)} |\n|---|" + "---|" * len(budgets))
    print("\n".join(rows))


def part_greedy(save: str | None, compare: str | None) -> None:
    var, vae = embedded_pair()
    profile = calibrate(var, vae, [0, 1], seed=100)
    greedy = SamplingOptions(cfg=2.0, top_k=1, top_p=0.0)
    tokens = {}
    for budget in (0.1, 0.25, 0.5):
        for label in range(4):
            run, _ = run_with(var, vae, [label, label + 4], label, KVPolicySpec("hack", budget, profile), greedy)
            tokens[f"{budget}/{label}"] = run.indices
    if save:
        torch.save(tokens, save)
    if compare:
        other = torch.load(compare, weights_only=True)
        total = sum(t.numel() for run in tokens.values() for t in run)
        differ = sum(int((a != b).sum()) for key, run in tokens.items() for a, b in zip(run, other[key]))
        print(f"{len(tokens)} runs, {total} tokens, {differ} differ from {compare}")


def embedded_pair() -> tuple[VAR, MultiScaleVQVAE]:
    weights = os.path.join(ROOT, "weights")
    var = VAR.from_file(os.path.join(weights, "nextscale_generator.safetensors")).eval()
    vae = MultiScaleVQVAE.from_file(os.path.join(weights, "nextscale_tokenizer.safetensors")).eval()
    return var, vae


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("memory", "fidelity", "embedded", "t2i", "greedy"), required=True)
    parser.add_argument("--max-gb", type=float, default=1.5, help="skip memory configs whose full cache is larger")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="memory: batch sizes")
    parser.add_argument("--save", help="greedy: write the tokens to this file")
    parser.add_argument("--compare", help="greedy: count the tokens that differ from this file's")
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"memory": lambda: part_memory(tuple(args.batches), args.max_gb), "fidelity": part_fidelity,
     "embedded": part_embedded, "t2i": part_t2i, "greedy": lambda: part_greedy(args.save, args.compare)}[args.part]()
