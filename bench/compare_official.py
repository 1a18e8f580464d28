"""Side by side with the official VAR implementation: same weights, greedy sampling, time and peak memory.

    python bench/compare_official.py --official /path/to/FoundationVision/VAR [--depth 16] [--batch 1] [--runs 3]

The official code is imported from the folder given (a checkout of github.com/FoundationVision/VAR; it is never
vendored here; it needs ``huggingface_hub``, which ComfyUI already installs). Its ``build_vae_var`` builds a VQVAE
and a VAR with its own random initialisation; their state dicts are loaded into NextScale's classes key for key
(the same path that loads the official checkpoints), so both sides hold identical weights.

Both sample the same labels greedily (top-k = 1, so no random draw decides a token) with cfg 4 and VAR's ramp;
the official ``autoregressive_infer_cfg`` returns images, NextScale's sampler returns tokens that are decoded. The
official tokens are recorded on the way (its ``sample_with_top_k_top_p_`` is wrapped, nothing else changes). The
script reports the token agreement, the largest pixel difference and the PSNR between the two images (identical
tokens and a difference of 0 up to float rounding in fp32), the median time per image of each after a warm-up,
their ratio, and the peak RSS above the baseline during each call (sampled every 5 ms), all from one run of this
script. Not a test.

``--dtype bfloat16`` runs NextScale as its loaders' ``dtype`` option does (bf16 weights, fp32 residual stream,
LayerNorms and attention on CPU; see docs/performance.md); the official code stays in fp32, which is how it runs
on a CPU, or under ``torch.autocast("cpu", bfloat16)`` with ``--official-autocast``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

from bench_sampler import PeakMemory  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.sampler import SamplingOptions, sample  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402


def measure(fn):
    """``(result, seconds, peak RSS above the start in MB)`` of ``fn()``."""
    with PeakMemory(torch.device("cpu")) as memory:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, max(0.0, memory.peak_mb - memory.start_mb)


def init_tokenizer_(vae) -> None:
    """``build_vae_var`` switches torch's initialisers off and leaves the tokenizer's weights uninitialised (it expects
    a checkpoint): fan-in normal weights, unit norm gains, zero biases, a unit-variance codebook."""
    g = torch.Generator().manual_seed(1)
    for name, p in vae.named_parameters():
        if p.dim() > 1:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def load_official(path: str):
    root = Path(path).resolve()
    if not (root / "models" / "var.py").is_file():
        raise SystemExit(f"{root} is not a checkout of FoundationVision/VAR (models/var.py is missing)")
    sys.path.insert(0, str(root))
    import models as official  # the official package (imports `dist` from its root)

    if not hasattr(official, "build_vae_var"):
        raise SystemExit(f"'models' imported from {official.__file__}, not from {root}: run from another folder")
    return official


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of a FoundationVision/VAR checkout")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="NextScale's generator and tokenizer weights (the loaders' dtype option)")
    ap.add_argument("--official-autocast", action="store_true",
                    help="run the official code under torch.autocast('cpu', bfloat16) (its weights stay fp32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.chdir(Path(__file__).resolve().parents[1])
    official = load_official(args.official)
    torch.manual_seed(0)
    vae_o, var_o = official.build_vae_var(device="cpu", depth=args.depth, flash_if_available=False,
                                          fused_if_available=False)
    vae_o.eval(), var_o.eval()
    init_tokenizer_(vae_o)
    dtype = getattr(torch, args.dtype)
    tokenizer = MultiScaleVQVAE.from_state_dict(vae_o.state_dict()).to(dtype).eval()
    var = VAR.from_state_dict(var_o.state_dict()).to(dtype).eval()
    labels = torch.arange(args.batch) * 97 % 1000
    options = SamplingOptions(cfg=args.cfg, top_k=1, top_p=0.0)
    recorded: list[torch.Tensor] = []
    record_official_tokens_(recorded)
    tokens: dict[str, list[torch.Tensor]] = {}

    def ours():
        toks = sample(var, tokenizer, labels, seed=0, options=options)
        tokens["nextscale"] = [t.flatten(1) for t in toks.indices]
        f_hat = tokenizer.indices_to_fhat(toks.flat(), toks.patch_nums)
        return tokenizer.fhat_to_img(f_hat.to(dtype)).add(1).mul(0.5)

    def theirs():
        recorded.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.official_autocast):
            image = var_o.autoregressive_infer_cfg(B=args.batch, label_B=labels, g_seed=0, cfg=args.cfg, top_k=1,
                                                   top_p=0.0)
        tokens["official"] = [t.flatten(1) for t in recorded]
        return image

    results = {}
    for name, fn in (("nextscale", ours), ("official", theirs)):
        image, _, _ = measure(fn)  # warm-up
        times, peaks = [], []
        for _ in range(args.runs):
            image, seconds, peak = measure(fn)
            times.append(seconds)
            peaks.append(peak)
        results[name] = (image.float().clamp(0, 1), statistics.median(times) / args.batch, max(peaks))
    for name, (image, _, _) in results.items():
        if not torch.isfinite(image).all():
            print(f"warning: the {name} image has {int((~torch.isfinite(image)).sum())} non-finite values")
    a, b = results["nextscale"][0], results["official"][0]
    diff = (a - b).abs().max().item()
    psnr = 10 * torch.log10(1 / (a - b).pow(2).mean().clamp_min(1e-20)).item()
    ours_L, theirs_L = torch.cat(tokens["nextscale"], 1), torch.cat(tokens["official"], 1)
    agreement = (ours_L == theirs_L).float().mean().item()
    first_diff = next((si for si, (x, y) in enumerate(zip(tokens["nextscale"], tokens["official"]))
                       if not torch.equal(x, y)), None)
    official_mode = "bf16 autocast" if args.official_autocast else "fp32"
    print(f"# VAR-d{args.depth}, batch {args.batch}, cfg {args.cfg}, greedy, cpu, NextScale {args.dtype}, official "
          f"{official_mode}, {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.runs} "
          f"after a warm-up")
    print("| implementation | s / image | peak RSS above start (MB) |")
    print("|---|---|---|")
    for name in ("official", "nextscale"):
        print(f"| {name} | {results[name][1]:.3f} | {results[name][2]:.0f} |")
    ratio = results["official"][1] / results["nextscale"][1]
    mem = results["official"][2] / max(results["nextscale"][2], 1e-9)
    print(f"time ratio official / nextscale = {ratio:.2f}; peak-memory ratio official / nextscale = {mem:.2f}")
    print(f"greedy tokens: {agreement:.4f} agree (first scale that differs: {first_diff}); images: largest pixel "
          f"difference {diff:.2e}, PSNR {psnr:.1f} dB")
    return 0


def record_official_tokens_(out: list) -> None:
    """Wrap the official sampler's draw so that each scale's indices are appended to ``out``."""
    official_var = sys.modules["models.var"]
    draw = official_var.sample_with_top_k_top_p_

    def recording(*args, **kwargs):
        idx = draw(*args, **kwargs)
        out.append(idx[..., 0].clone())
        return idx

    official_var.sample_with_top_k_top_p_ = recording


if __name__ == "__main__":
    sys.exit(main())
