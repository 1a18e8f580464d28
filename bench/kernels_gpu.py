"""GPU parity check and benchmark of NextScale's Triton kernels. Not a test: run it by hand on a CUDA machine.

    python bench/kernels_gpu.py                        # everything; timings in bf16 and fp32
    python bench/kernels_gpu.py --quick                # fewer, smaller workloads (a few minutes less tuning)
    python bench/kernels_gpu.py --only step,prefix --dtypes bf16

For each kernel and workload it

1. checks parity with the torch reference on fresh random inputs, output poisoned with NaN (indices with -1)
   first, with the tolerances of ``tests/test_triton_kernels.py`` (``rel_err = max|out - ref| / max|ref|``:
   fp32 1e-5, fp16 2e-3, bf16 1.6e-2; nearest-code indices equal up to near ties). Large workloads compare a
   slice (first and last batch row, first and last head) so the reference fits in memory;
2. times Triton against SDPA and/or the torch path (median of ``triton.testing.do_bench``, after one call that
   autotunes and compiles);
3. prints the floors: the bytes that must cross HBM at least once (inputs read once, output written once) and
   the FLOPs of the allowed ``QK^T`` and ``PV`` products (``4 * c`` per allowed query-key pair; argmin search
   ``2 * C`` per latent-code pair), the floor time ``max(bytes / bandwidth, FLOPs / peak)`` and the fraction of
   it reached. Peaks: datasheet figures for H100 SXM / PCIe and H200 (dense tensor-core bf16/fp16; CUDA-core
   fp32 for the fp32 kernels, which use exact fp32 products, never TF32), else measured here (copy bandwidth,
   a bf16 matmul), or ``--peak-tbps`` / ``--peak-tflops`` / ``--peak-fp32-tflops``.

Finally it samples a small random VAR greedily on the GPU with the torch and the Triton attention backends and
requires identical tokens (fp32), and (``tuning``) checks what decides the kernels on this device: the Triton
checks of ``kernels/triton_support.py``, the config autotuning keeps within the device's shared memory, and that
every stage count it may choose, and a second tuning, give bitwise the same output (the reproducibility
statement of ``docs/kernels.md``). Exit status 1 when any check fails.

``--cpu-smoke`` runs the same code at toy sizes on CPU through the Triton interpreter (wall-clock timings,
meaningless as performance): a check that this script itself works, for machines without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: this script times the compiled kernels (or pass --cpu-smoke)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from packbootstrap import register_pack  # noqa: E402

register_pack(ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402
from nextscale.kernels import attention as attention_mod  # noqa: E402
from nextscale.kernels import ragged, triton_attention, triton_support, triton_tuning  # noqa: E402
from nextscale.kernels.attention import attention_sdpa, attention_torch, block_causal_mask  # noqa: E402
from nextscale.kernels.quantize import nearest_code_torch  # noqa: E402
from nextscale.kernels.triton_attention import (  # noqa: E402
    block_causal_attention,
    ragged_attention_triton,
    scale_step_attention,
)
from nextscale.kernels.triton_quantize import nearest_code_triton  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # as tests/test_triton_kernels.py
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULES = {
    "256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),  # VAR d16-d30, L = 680
    "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),  # VAR d36, L = 2240
    "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),  # L = 9451 (training option, no weights)
}


# ---------------------------------------------------------------------------------------------------------------
# peaks, timing, reporting


@dataclass
class Peaks:
    bytes_per_s: float
    tc_flops: float  # dense bf16 / fp16 tensor cores
    fp32_flops: float  # CUDA cores (the fp32 kernels use exact fp32 products)
    source: str

    def flops_for(self, dtype: torch.dtype) -> float:
        return self.fp32_flops if dtype == torch.float32 else self.tc_flops


KNOWN_PEAKS = [  # (substring of the device name, bandwidth B/s, bf16 dense FLOP/s, fp32 FLOP/s), datasheets
    ("H200", 4.8e12, 989e12, 67e12),
    ("H100 PCIe", 2.0e12, 756e12, 51e12),
    ("H100 NVL", 3.9e12, 835e12, 60e12),
    ("H100", 3.35e12, 989e12, 67e12),  # SXM5 (HBM3)
]


def measure_peaks(device) -> Peaks:
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=50, return_mode="median")
    bw = 2 * x.numel() * 4 / (ms * 1e-3)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = triton.testing.do_bench(lambda: a @ a, warmup=10, rep=50, return_mode="median")
    tc = 2 * 8192**3 / (ms * 1e-3)
    a = a.float()
    ms = triton.testing.do_bench(lambda: torch.mm(a, a), warmup=5, rep=30, return_mode="median")
    fp32 = 2 * 8192**3 / (ms * 1e-3)
    return Peaks(bw, tc, fp32, "measured here (copy bandwidth, matmul throughput)")


def device_peaks(args, device) -> Peaks:
    if device.type != "cuda":
        peaks = Peaks(50e9, 1e12, 1e12, "nominal CPU figures (--cpu-smoke: timings are meaningless)")
    else:
        name = torch.cuda.get_device_name(device)
        known = next((p for p in KNOWN_PEAKS if p[0] in name), None)
        if known:
            peaks = Peaks(known[1], known[2], known[3], f"datasheet, {known[0]}")
        else:
            peaks = measure_peaks(device)
    if args.peak_tbps:
        peaks.bytes_per_s, peaks.source = args.peak_tbps * 1e12, peaks.source + " + --peak-tbps"
    if args.peak_tflops:
        peaks.tc_flops, peaks.source = args.peak_tflops * 1e12, peaks.source + " + --peak-tflops"
    if args.peak_fp32_tflops:
        peaks.fp32_flops, peaks.source = args.peak_fp32_tflops * 1e12, peaks.source + " + --peak-fp32-tflops"
    return peaks


def bench_ms(fn, device) -> float:
    fn()  # autotune + compile outside the timed runs
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


class Report:
    def __init__(self, peaks: Peaks):
        self.peaks = peaks
        self.failures: list[str] = []
        self.header_printed = False

    def parity(self, what: str, err: float, tol: float) -> None:
        ok = math.isfinite(err) and err <= tol
        print(f"  parity {what}: rel_err {err:.2e} (tol {tol:.1e}) {'ok' if ok else 'FAIL'}")
        if not ok:
            self.failures.append(f"{what}: rel_err {err:.2e} > {tol:.1e}")

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        print(f"  check {what}: {'ok' if ok else 'FAIL'} {detail}")
        if not ok:
            self.failures.append(f"{what} {detail}")

    def timing(self, name: str, dtype, nbytes: float, flops: float, times: dict[str, float]) -> None:
        floor_bw = nbytes / self.peaks.bytes_per_s * 1e3
        floor_fl = flops / self.peaks.flops_for(dtype) * 1e3
        floor = max(floor_bw, floor_fl)
        t = times["triton"]
        base = ", ".join(f"{k} {v:.3f} ms ({v / t:.2f}x)" for k, v in times.items() if k != "triton")
        print(
            f"  {name} [{str(dtype).replace('torch.', '')}]: triton {t:.3f} ms | {base or 'no baseline'}\n"
            f"      floor {floor:.3f} ms = max({nbytes / 1e6:.1f} MB -> {floor_bw:.3f} ms, "
            f"{flops / 1e9:.2f} GFLOP -> {floor_fl:.3f} ms), {'memory' if floor_bw >= floor_fl else 'compute'}"
            f"-bound; triton at {100 * floor / t:.0f}% of the floor, "
            f"{nbytes / t / 1e9:.2f} TB/s, {flops / t / 1e9:.1f} TFLOP/s"
        )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def cos_qkv(B, H, L, S, c, dtype, device, seed):
    g = torch.Generator(device).manual_seed(seed)
    scale_H = torch.linspace(2.0, 100.0, H, device=device).view(1, H, 1, 1)
    q = F.normalize(torch.randn(B, H, L, c, generator=g, device=device), dim=-1) * scale_H
    k = F.normalize(torch.randn(B, H, S, c, generator=g, device=device), dim=-1)
    v = torch.randn(B, H, S, c, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def corners(t: torch.Tensor) -> torch.Tensor:
    """First and last batch row x first and last head: a slice the fp32 reference can afford."""
    B, H = t.shape[:2]
    return t[[0, B - 1]][:, [0, H - 1]]


# ---------------------------------------------------------------------------------------------------------------
# workloads


def bench_scale_step(rep: Report, device, dtypes, quick: bool) -> None:
    """The sampler's attention: queries of scale si against the whole cache (S = tokens up to si), no mask."""
    cases = [("VAR-d16 256px, batch 16 (32 CFG rows)", "256", 32, 16, 64)]
    if not quick:
        cases += [
            ("VAR-d36 512px, batch 4 (8 CFG rows)", "512", 8, 36, 64),
            ("1024px schedule, 2 CFG rows, head dim 128", "1024", 2, 16, 128),
        ]
    if device.type != "cuda":
        cases = [("toy", "smoke", 2, 2, 64)]
    for title, sched, B, H, c in cases:
        pns = SCHEDULES.get(sched, (1, 2, 3))
        print(f"\nscale-step attention: {title}, H={H}, c={c}, schedule {pns}")
        for dtype in dtypes:
            totals = {"triton": 0.0, "sdpa": 0.0}
            nbytes = flops = 0.0
            S = 0
            for si, pn in enumerate(pns):
                L = pn * pn
                S += L
                q, k, v = cos_qkv(B, H, L, S, c, dtype, device, seed=si)
                out = torch.full_like(q, float("nan"))
                scale_step_attention(q, k, v, out=out)
                if si >= len(pns) - 2:  # parity on the two largest scales
                    err = rel_err(corners(out), attention_torch(corners(q), corners(k), corners(v)))
                    rep.parity(f"step si={si} L={L} S={S} {dtype}", err, TOL[dtype])
                t_tr = bench_ms(functools.partial(scale_step_attention, q, k, v, out=out), device)
                t_sd = bench_ms(functools.partial(attention_sdpa, q, k, v), device)
                totals["triton"] += t_tr
                totals["sdpa"] += t_sd
                e = q.element_size()
                nbytes += 2 * B * H * L * c * e + 2 * B * H * S * c * e
                flops += 4 * B * H * L * S * c
                if si >= len(pns) - 3:
                    print(f"    si={si} L={L} S={S}: triton {t_tr:.3f} ms, sdpa {t_sd:.3f} ms")
            rep.timing("all scales of one layer", dtype, nbytes, flops, totals)


def bench_block_causal(rep: Report, device, dtypes, quick: bool) -> None:
    """Teacher forcing / calibration / prefill: the whole sequence under the block-causal mask."""
    cases = [("256px (L=680), batch 8", "256", 8, 16, 64), ("512px (L=2240), batch 2", "512", 2, 36, 64)]
    if not quick:
        cases += [("1024px (L=9451), batch 1", "1024", 1, 16, 64)]
    if device.type != "cuda":
        cases = [("toy", "smoke", 2, 2, 64)]
    for title, sched, B, H, c in cases:
        pns = SCHEDULES.get(sched, (1, 2, 3, 5))
        L = sum(p * p for p in pns)
        mask = block_causal_mask(pns, device=device)
        allowed = int((mask == 0).sum())
        print(f"\nblock-causal attention: {title}, H={H}, c={c}: {allowed / L / L:.1%} of the L x L pairs allowed")
        for dtype in dtypes:
            q, k, v = cos_qkv(B, H, L, L, c, dtype, device, seed=L)
            out = torch.full_like(q, float("nan"))
            block_causal_attention(q, k, v, pns, out=out)
            err = rel_err(corners(out), attention_torch(corners(q), corners(k), corners(v), mask))
            rep.parity(f"block-causal L={L} {dtype}", err, TOL[dtype])
            mask_d = mask.to(dtype)
            times = {"triton": bench_ms(functools.partial(block_causal_attention, q, k, v, pns, out=out), device)}
            times["sdpa+mask"] = bench_ms(functools.partial(attention_sdpa, q, k, v, mask_d), device)
            times["sdpa dense, no mask"] = bench_ms(functools.partial(attention_sdpa, q, k, v), device)
            if L <= 2240 and B * H * L * L * 4 <= 8 * 2**30:
                times["torch"] = bench_ms(functools.partial(attention_torch, q, k, v, mask), device)
            e = q.element_size()
            rep.timing("full sequence, one layer", dtype, 4 * B * H * L * c * e, 4 * B * H * allowed * c, times)


def bench_ragged(rep: Report, device, dtypes, quick: bool) -> None:
    """A compressed cache: per (row, head) a different number of kept keys (some heads empty)."""
    cases = [("512px last scale, 8 CFG rows, H=36, cache 2240 -> 5..100% per head", 8, 36, 1024, 2240, 64)]
    if not quick:
        cases += [("1024px scale 12, 2 rows, H=16, c=128, cache 9451", 2, 16, 2304, 9451, 128)]
    if device.type != "cuda":
        cases = [("toy", 2, 3, 9, 40, 64)]
    for title, B, H, L, S, c in cases:
        print(f"\nragged KV attention: {title}")
        g = torch.Generator().manual_seed(S)
        frac = torch.rand(B, H, generator=g) * 0.95 + 0.05
        lengths = (frac * S).long()
        lengths[0, 0], lengths[-1, -1] = 0, 1  # an empty head and a single-key head
        for dtype in dtypes:
            q, k, v = cos_qkv(B, H, L, S, c, dtype, device, seed=L)
            k_p, v_p, off = ragged.pack_kv_prefix(k, v, lengths.to(device), offsets_dtype=torch.int32)
            out = torch.full_like(q, float("nan"))
            ragged_attention_triton(q, k_p, v_p, off, out=out)
            # reference on the corner heads (their packed slices re-packed on their own)
            sub_len = lengths[[0, B - 1]][:, [0, H - 1]]
            ks, vs, offs = ragged.pack_kv_prefix(corners(k), corners(v), sub_len.to(device))
            err = rel_err(corners(out), ragged.ragged_attention_torch(corners(q), ks, vs, offs))
            rep.parity(f"ragged L={L} S<={S} {dtype}", err, TOL[dtype])
            full = rel_err(out[1:].float(), ragged.ragged_attention_sdpa(q[1:], *_rows_from(k_p, v_p, off, H, 1)))
            rep.parity(f"ragged vs padded SDPA, rows 1.. {dtype}", full, 2 * TOL[dtype])
            times = {"triton": bench_ms(functools.partial(ragged_attention_triton, q, k_p, v_p, off, out=out), device)}
            times["padded sdpa"] = bench_ms(functools.partial(ragged.ragged_attention_sdpa, q, k_p, v_p, off), device)
            times["dense sdpa on the uncompressed cache"] = bench_ms(functools.partial(attention_sdpa, q, k, v), device)
            e = q.element_size()
            total = int(lengths.sum())
            nbytes = 2 * B * H * L * c * e + 2 * total * c * e + off.numel() * off.element_size()
            rep.timing("one layer", dtype, nbytes, 4 * L * c * total, times)


def _rows_from(k_p, v_p, off, H, first_row):
    """The packed layout of batch rows ``first_row..`` (a suffix of the packing)."""
    start = int(off[first_row * H])
    return k_p[start:], v_p[start:], (off[first_row * H :] - start).contiguous()


def bench_nearest_code(rep: Report, device, quick: bool) -> None:
    """The tokenizer's encoding loop: nearest of V = 4096 codes (C = 32) for every latent of a scale."""
    cases = [("256px scale 16x16, batch 16", 16 * 256), ("512px scale 32x32, batch 16", 16 * 1024)]
    if not quick:
        cases += [("1024px scale 64x64, batch 16", 16 * 4096)]
    V, C = 4096, 32
    if device.type != "cuda":
        cases, V = [("toy", 77)], 300
    print(f"\nnearest-code search: V={V}, C={C}")
    g = torch.Generator(device).manual_seed(0)
    codebook = torch.randn(V, C, generator=g, device=device)
    for title, N in cases:
        z = torch.randn(N, C, generator=g, device=device)
        out = torch.full((N,), -1, dtype=torch.int64, device=device)
        nearest_code_triton(z, codebook, out=out)
        ref = nearest_code_torch(z, codebook)
        differ = out != ref
        ok = bool((out >= 0).all())
        if ok and differ.any():
            z_d, e_d = z[differ].double(), codebook.double()
            d_out, d_ref = (z_d - e_d[out[differ]]).square().sum(1), (z_d - e_d[ref[differ]]).square().sum(1)
            ok = torch.allclose(d_out, d_ref, rtol=1e-5, atol=1e-6)
        rep.check(f"nearest code N={N}", ok, f"({int(differ.sum())} near-tie differences)")
        times = {"triton": bench_ms(functools.partial(nearest_code_triton, z, codebook, out=out), device)}
        times["torch (chunked addmm + argmin)"] = bench_ms(functools.partial(nearest_code_torch, z, codebook), device)
        rep.timing(title, torch.float32, (N * C + V * C) * 4 + N * 8, 2 * N * V * C, times)


def check_greedy_sampling(rep: Report, device) -> None:
    """A small random VAR (O(1) weights) samples the same greedy tokens with either backend."""
    from nextscale.models.core.hooks import Control, SamplerHooks
    from nextscale.models.var.model import VAR, VARConfig
    from nextscale.models.var.sampler import SamplingOptions, sample
    from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig

    pns = SCHEDULES["256"] if device.type == "cuda" else (1, 2, 3, 4)
    vocab, cvae = (4096, 32) if device.type == "cuda" else (96, 8)
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(
        TokenizerConfig(vocab_size=vocab, z_channels=cvae, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=pns)
    )
    var = VAR(
        VARConfig(depth=4, embed_dim=256, num_heads=4, num_classes=10, vocab_size=vocab, cvae=cvae, patch_nums=pns)
    )
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in var.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("scale_mul_1H11"):
                r = math.log(4.0) + 0.3 * r
            elif p.dim() == 2 and not name.endswith(("class_emb.weight", "lvl_embed.weight")):
                r = r * (0.3 if "ada_lin" in name else 3.0 if name == "head.weight" else 1.0) / math.sqrt(p.shape[1])
            elif p.dim() == 1:
                r = 0.1 * r
            p.copy_(r)
    vae, var = vae.to(device).eval().requires_grad_(False), var.to(device).eval().requires_grad_(False)
    labels = torch.tensor([1, 7, 3, 10], device=device)
    opts = SamplingOptions(cfg=3.0, top_k=1, top_p=0.0)
    calls = []
    triton_fn = attention_mod._BACKENDS["triton"]
    attention_mod._BACKENDS["triton"] = lambda *a: calls.append(1) or triton_fn(*a)
    previous = os.environ.get(attention_mod.ENV_BACKEND)
    runs, margins = {}, {}

    class Margins(Control):
        def logits(self, si, logits_BlV):
            top2 = logits_BlV.topk(2, dim=-1).values
            margins[si] = top2[..., 0] - top2[..., 1]
            return logits_BlV

    try:
        for backend in ("torch", "triton", ""):  # "" = automatic: Triton on CUDA
            os.environ[attention_mod.ENV_BACKEND] = backend
            hooks = SamplerHooks(control=Margins()) if backend == "torch" else None
            runs[backend or "auto"] = sample(var, vae, labels, seed=0, options=opts, hooks=hooks)
    finally:
        attention_mod._BACKENDS["triton"] = triton_fn
        if previous is None:
            os.environ.pop(attention_mod.ENV_BACKEND, None)
        else:
            os.environ[attention_mod.ENV_BACKEND] = previous
    print(f"\ngreedy sampling, random VAR depth 4, schedule {pns}, fp32 on {device.type}")
    smallest = min(float(m.min()) for m in margins.values())
    print(f"  smallest top1 - top2 logit margin of the torch run: {smallest:.2e}")
    for name in ("triton", "auto"):
        differ = [
            si for si, (a, b) in enumerate(zip(runs[name].indices, runs["torch"].indices)) if not torch.equal(a, b)
        ]
        detail = ""
        if differ:  # a flip is excusable only at a near tie (fp32 sums in another order), then it cascades
            si = differ[0]
            where = (runs[name].indices[si] != runs["torch"].indices[si]).flatten(1)
            worst = float(margins[si].view_as(where)[where].max())
            detail = f"(first difference at scale {si}, largest margin among the flipped tokens {worst:.1e})"
            if worst < 1e-4:
                print(f"  near tie {detail}: accepted")
                differ = []
        rep.check(f"greedy tokens torch == {name}", not differ, detail)
    expect = 2 * var.depth * len(pns) if device.type == "cuda" else var.depth * len(pns)
    rep.check("the triton backend ran every cached step", len(calls) == expect, f"({len(calls)} calls)")


def check_tuning(rep: Report, device) -> None:
    """The Triton checks of this device; per dtype and query tile, the config autotuning keeps and bitwise equal
    outputs for every stage count it may choose and after tuning again (the order of the sums never depends on
    timings)."""
    usable, detail = triton_support.triton_device_status(device)
    rep.check("Triton kernels used on this device", usable, f"({detail})")
    limit = triton_tuning.shared_memory_limit(device)
    print(f"\ntuning: {limit} bytes of shared memory per block")
    tuned = triton_attention._attn_fwd_tuned
    stages_by_dtype = dict(triton_attention.STAGES)
    try:
        for dtype in DTYPES.values():
            for L, c in ((9, 128), (300, 128), (300, 64)):
                q, k, v = cos_qkv(2, 4, L, 700, c, dtype, device, seed=L + c)
                outs = {}
                for stages in (*stages_by_dtype[dtype], "tuned", "tuned again"):
                    triton_attention.STAGES[dtype] = stages_by_dtype[dtype] if isinstance(stages, str) else (stages,)
                    tuned.cache.clear()
                    outs[stages] = scale_step_attention(q, k, v)
                    print(f"  {dtype} L={L} c={c} stages {stages}: {tuned.best_config}")
                first = next(iter(outs.values()))
                rep.check(f"{dtype} L={L} c={c}: the same bits whatever autotuning chooses",
                          all(torch.equal(o, first) for o in outs.values()))
    finally:
        triton_attention.STAGES.update(stages_by_dtype)
        tuned.cache.clear()


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller workloads")
    ap.add_argument("--dtypes", default="bf16,fp32", help="dtypes to time, from fp32, fp16, bf16 (default bf16,fp32)")
    ap.add_argument("--only", default="step,prefix,ragged,code,sample,tuning", help="comma list of sections to run")
    ap.add_argument("--peak-tbps", type=float, help="HBM bandwidth in TB/s (overrides the datasheet/measured one)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16/fp16 tensor-core TFLOP/s")
    ap.add_argument("--peak-fp32-tflops", type=float, help="fp32 CUDA-core TFLOP/s")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU via the Triton interpreter")
    args = ap.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: this script checks and times the compiled kernels (try --cpu-smoke)")
        return 2
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]
    sections = {s.strip() for s in args.only.split(",")}
    peaks = device_peaks(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}")
    print(
        f"peaks ({peaks.source}): {peaks.bytes_per_s / 1e12:.2f} TB/s, {peaks.tc_flops / 1e12:.0f} TFLOP/s "
        f"bf16/fp16, {peaks.fp32_flops / 1e12:.0f} TFLOP/s fp32"
    )
    rep = Report(peaks)
    with torch.no_grad():
        if "step" in sections or "prefix" in sections or "ragged" in sections:  # parity in every dtype first
            for dt in DTYPES.values():
                q, k, v = cos_qkv(2, 3, 37, 301, 64, dt, device, seed=1)
                rep.parity(
                    f"step smoke {dt}", rel_err(scale_step_attention(q, k, v), attention_torch(q, k, v)), TOL[dt]
                )
        if "step" in sections:
            bench_scale_step(rep, device, dtypes, args.quick)
        if "prefix" in sections:
            bench_block_causal(rep, device, dtypes, args.quick)
        if "ragged" in sections:
            bench_ragged(rep, device, dtypes, args.quick)
        if "code" in sections:
            bench_nearest_code(rep, device, args.quick)
        if "sample" in sections:
            check_greedy_sampling(rep, device)
        if "tuning" in sections and device.type == "cuda":
            check_tuning(rep, device)
    print()
    if rep.failures:
        print(f"{len(rep.failures)} parity failure(s):\n  " + "\n  ".join(rep.failures))
        return 1
    print("all parity checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
