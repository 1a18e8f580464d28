"""Side by side with the official Infinity implementation: identical random weights, teacher-forced logits, greedy bits.

    python bench/compare_official_infinity.py --official /path/to/FoundationVision/Infinity [--dtype float64]
        [--depth 4] [--width 64] [--heads 4] [--text-channels 256] [--bits 4] [--cfg 3] [--seed 0]

The official code is imported from the folder given (a checkout of github.com/FoundationVision/Infinity; it is
never vendored here). Its package is named ``infinity`` (NextScale's is ``nextscale``, so nothing is shadowed).
It cannot import on a CPU-only machine as it is, so the script first registers minimal stand-ins in
``sys.modules``, only for what is missing:

- ``flash_attn`` (always: the real kernels need CUDA and half precision): ``flash_attn_func`` and
  ``flash_attn_varlen_kvpacked_func`` written with ``scaled_dot_product_attention``, one sequence at a time;
- ``timm`` (``register_model`` as the identity, ``DropPath``, ``SoftTargetCrossEntropy``), ``pytz`` and ``imageio``
  when they are not installed (imported at module level, unused on these paths).

``infinity/models/fused_op.py``'s ``fused_ada_layer_norm`` is ``@torch.compile``d; the script hands the model the
same function body uncompiled (compiling on a busy CPU is slow and changes no value). It must still be present:
without it upstream silently falls back to its non-fused block path.

The official model is built as ``tools/run_infinity.py``'s ``load_infinity`` builds the released ones (shared AdaLN,
fused norm, pad to 128, RoPE in every block normalised to the template's 1M grid, level embedding before the first
block only, bit labels, ``inference_mode``), at a tiny size, with its own random initialisation; the tokenizer is
upstream's ``AutoEncoder`` from ``vae_model`` with ``base_ch``/``num_res_blocks`` shrunk and 2 levels (f2). Their
state dicts are loaded into NextScale's classes with the loaders that read the official files (strict), so both
sides hold identical weights. Compared, on the 1:1 '0.06M' schedule (7 scales, 521 tokens) with 2 prompts of
different lengths:

1. teacher-forced logits of the whole sequence (upstream ``forward`` with ``cond_drop_rate = 0``; NextScale
   ``forward_teacher``) on random inputs;
2. greedy sampling (top-k = 1), cfg on the logits, with the learned unconditional embedding and with per-prompt
   negative prompts (one longer than the prompts): the bits of every scale, the guided logits of every scale
   (recorded by wrapping each side's top-k/top-p filter; the smallest bit margin says how far from a tie the greedy
   draws are) and the summed codes; then seeded sampling of one prompt with the 2B's defaults (tau 0.5, top-p 0.97:
   with a batch of one both sides consume the same generator the same way);
3. the tokenizer's decode of the summed codes (upstream ``vae.decode``, recorded during ``ret_img=True``,
   against ``BSQTokenizer.decode``).

``--dtype float64`` (default) runs both models in float64 so that the comparison is not blurred by bf16: upstream's
``CrossAttention`` casts fp32 queries/keys to bfloat16 before its varlen kernel, which it skips for other dtypes.
Upstream's explicit ``.float()`` casts are made no-ops on float64 tensors for the duration of its calls (a
``TorchFunctionMode``; default dtype float64 meanwhile), so upstream computes everything in float64; NextScale keeps
its own fp32 islands (RMSNorm, RoPE, the head's norm and logits, codes), hence differences near 1e-7 relative.
``--dtype float32`` runs both in fp32 (upstream's cross-attention then goes through bf16).

The self-attention heads' cos-attention scales are drawn in [4, 100] (``--attn-scale-max``; upstream initialises
them all to 4), so that attention is sharp and positions matter as in trained models.

Extra rows run upstream with ``fused_norm=False`` (not the released setting) against itself: its ``CrossAttnBlock``
does not pass ``scale_ind`` to self-attention on that branch, so cached sampling rotates every scale with the RoPE
angles of the sequence's first positions. Not a test; CPU only, tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

import nextscale.models.infinity.sampler as nxs_sampler  # noqa: E402
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity  # noqa: E402
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, sample_infinity  # noqa: E402
from nextscale.models.infinity.schedule import InfinitySchedule  # noqa: E402

# -- stand-ins for what upstream imports but cannot use here -----------------------------------------


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    """flash-attn's ``flash_attn_func``: q, k, v ``(B, L, H, c)`` -> ``(B, L, H, c)``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale, is_causal=causal
    )
    return out.transpose(1, 2)


def _flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, **kw
):
    """flash-attn's varlen call: packed q ``(Nq, H, c)``, kv ``(Nk, 2, H, c)``, sequence ``i`` is
    ``q[cu_q[i]:cu_q[i+1]]`` against ``kv[cu_k[i]:cu_k[i+1]]``; returns ``(Nq, H, c)`` in q's dtype."""
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        qa, qb, ka, kb = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        k_, v_ = kv[ka:kb].unbind(1)
        o = F.scaled_dot_product_attention(
            q[qa:qb].transpose(0, 1), k_.transpose(0, 1), v_.transpose(0, 1), scale=softmax_scale
        )
        out[qa:qb] = o.transpose(0, 1)
    return out


class _DropPath(nn.Module):
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return x


class _SoftTargetCrossEntropy(nn.Module):
    def forward(self, x, target):
        return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__nextscale_stub__ = True
    return mod


def install_stubs() -> list[str]:
    """Register the stand-ins in ``sys.modules``; returns the names registered."""
    stubs = {"flash_attn": _module(
        "flash_attn", flash_attn_func=_flash_attn_func, flash_attn_varlen_kvpacked_func=_flash_attn_varlen_kvpacked_func
    )}
    if importlib.util.find_spec("timm") is None:
        layers = _module("timm.models.layers", DropPath=_DropPath, drop_path=lambda x, *a, **k: x)
        models = _module("timm.models", register_model=lambda fn: fn, layers=layers)
        loss = _module("timm.loss", SoftTargetCrossEntropy=_SoftTargetCrossEntropy)
        stubs.update({"timm": _module("timm", models=models, loss=loss), "timm.models": models,
                      "timm.models.layers": layers, "timm.loss": loss})
    if importlib.util.find_spec("pytz") is None:
        stubs["pytz"] = _module("pytz", timezone=lambda name: None)
    if importlib.util.find_spec("imageio") is None:
        stubs["imageio"] = _module("imageio")
    sys.modules.update(stubs)
    return sorted(stubs)


def load_official(path: str):
    """Upstream's modules ``(infinity, basic, fused_op, vae, dynamic_resolution)`` imported from the checkout."""
    root = Path(path).resolve()
    if not (root / "infinity" / "models" / "infinity.py").is_file():
        raise SystemExit(
            f"{root} is not a checkout of FoundationVision/Infinity (infinity/models/infinity.py is missing)"
        )
    stubs = install_stubs()
    sys.path.insert(0, str(root))
    from infinity.models import basic, fused_op
    from infinity.models import infinity as official
    from infinity.models.bsq_vae import vae
    from infinity.utils import dynamic_resolution

    for mod in (official, basic, fused_op, vae, dynamic_resolution):
        if not Path(mod.__file__).resolve().is_relative_to(root):
            raise SystemExit(f"'{mod.__name__}' imported from {mod.__file__}, not from {root}")
    # the fused AdaLN, uncompiled (same body); upstream reads the name when it builds a model
    compiled = fused_op.fused_ada_layer_norm
    official.fused_ada_layer_norm = getattr(compiled, "_torchdynamo_orig_callable", None) or compiled.__wrapped__
    return types.SimpleNamespace(infinity=official, basic=basic, vae=vae, dr=dynamic_resolution, stubs=stubs)


class _KeepFloat64(TorchFunctionMode):
    """``Tensor.float()`` leaves float64 tensors as they are (upstream casts to fp32 in many places)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def upstream_precision(dtype: torch.dtype):
    """Run upstream entirely in ``dtype`` (float64: its ``.float()`` casts disabled, default dtype float64)."""
    if dtype != torch.float64:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _KeepFloat64():
            yield
    finally:
        torch.set_default_dtype(old)


# -- building both sides ------------------------------------------------------------------------------


def build_official(off, args, fused_norm: bool = True, vae=None):
    """Upstream's tokenizer (``vae_model``, shrunk) and transformer (``load_infinity``'s arguments, tiny)."""
    if vae is None:
        real = off.vae.AutoEncoder

        def tiny(ns):  # vae_model hard-codes base_ch=128, num_res_blocks=2
            ns.base_ch, ns.num_res_blocks = args.vae_ch, 1
            return real(ns)

        off.vae.AutoEncoder = tiny
        try:
            vae = off.vae.vae_model(None, "dynamic", codebook_dim=args.bits, codebook_size=2**args.bits,
                                    patch_size=2, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2])
        finally:
            off.vae.AutoEncoder = real
    model = off.infinity.Infinity(
        vae_local=vae, text_channels=args.text_channels, text_maxlen=args.text_maxlen,
        shared_aln=True, raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False,
        fused_norm=fused_norm, pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1,
        use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="0.06M", apply_spatial_patchify=0,
        inference_mode=True, train_h_div_w_list=[1.0],
        depth=args.depth, embed_dim=args.width, num_heads=args.heads, mlp_ratio=4, drop_path_rate=0.0,
        block_chunks=args.block_chunks, cond_drop_rate=0.0,
    )
    return vae.eval().requires_grad_(False), model.eval().requires_grad_(False)


def packed(text_BTC, lens):
    """Upstream's varlen text: ``(kv_compact, lens, cu_seqlens_k, max_seqlen_k)``."""
    kv = torch.cat([t[:n] for t, n in zip(text_BTC, lens)])
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(torch.int32)
    return kv, list(lens), cu, max(lens)


def padded(text_BTC, lens):
    mask = torch.arange(text_BTC.shape[1])[None] < torch.tensor(lens)[:, None]
    return text_BTC * mask[..., None], mask


class Recorder:
    """Wraps a function, keeping a clone of its first argument (taken before the call: the top-k filters work in
    place) and its result at every call."""

    def __init__(self, fn):
        self.fn, self.seen, self.out = fn, [], []

    def __call__(self, x, *a, **k):
        self.seen.append(x.detach().clone())
        self.out.append(self.fn(x, *a, **k))
        return self.out[-1]


def sharpen_attention_(model, high: float, generator: torch.Generator) -> None:
    """Draw every self-attention head's cos-attention scale log-uniformly in ``[4, high]`` (upstream initialises all
    to 4; trained models reach the clamp, 100): sharp attention makes the outputs depend on RoPE and on the keys."""
    for block in model.unregistered_blocks:
        p = block.sa.scale_mul_1H11
        u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
        p.copy_((math.log(4.0) + u * (math.log(high) - math.log(4.0))).to(p.dtype))


# -- the comparisons ----------------------------------------------------------------------------------


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference, and it over the largest magnitude of ``b`` (the official side)."""
    a, b = a.double(), b.double()
    d = (a - b).abs().max().item()
    return d, d / max(b.abs().max().item(), 1e-30)


def sample_official(off, model, vae, text, negative, schedule, dtype, seed, cfg, tau, top_k, top_p):
    """Upstream's ``autoregressive_infer_cfg`` (``run_infinity``'s arguments); ``text``/``negative`` are
    ``(features, lens)``. Returns bits per scale ``(B, h, w, d)``, the guided logits per scale (B, l*d, 2), the
    summed codes and the decoded image, recorded on the way (the bits are not returned by upstream)."""
    bits, logits = (
        Recorder(vae.quantizer.lfq.indices_to_codes),
        Recorder(off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_),
    )
    decode = Recorder(vae.decode)
    vae.quantizer.lfq.indices_to_codes, vae.decode = bits, decode
    off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_ = logits
    try:
        with upstream_precision(dtype):
            model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=[(1, h, w) for h, w in schedule.scales], label_B_or_BLT=packed(*text),
                B=len(text[1]), negative_label_B_or_BLT=None if negative is None else packed(*negative),
                g_seed=seed, cfg_list=[cfg] * schedule.num_scales, tau_list=[tau] * schedule.num_scales,
                top_k=top_k, top_p=top_p,
                returns_vemb=1, cfg_insertion_layer=[0], vae_type=vae.codebook_dim, ret_img=True, inference_mode=True,
            )
    finally:
        off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_ = logits.fn
        del vae.quantizer.lfq.indices_to_codes, vae.decode  # back to the class's methods
    return [b[:, 0].bool() for b in bits.seen], logits.seen, decode.seen[-1], decode.out[-1]


def sample_nextscale(model, tok, text, negative, schedule, seed, options):
    """NextScale's ``sample_infinity``, the guided logits recorded at its top-k/top-p filter."""
    logits = Recorder(nxs_sampler.filter_top_k_top_p_)
    nxs_sampler.filter_top_k_top_p_ = logits
    try:
        condition = TextCondition(*padded(*text), None if negative is None else padded(*negative))
        toks = sample_infinity(model, tok, condition, seed=seed, options=replace(options, schedule=schedule))
    finally:
        nxs_sampler.filter_top_k_top_p_ = logits.fn
    return toks.bits, logits.seen, toks.summed_codes, tok.decode(toks.summed_codes)


def compare_bits(name, ours, theirs, rows, greedy=True):
    """Rows for the bits and guided logits of two runs; returns True when every bit is equal."""
    (bits_a, logits_a), (bits_b, logits_b) = ours[:2], theirs[:2]
    total = sum(b.numel() for b in bits_b)
    wrong = [int((a != b).sum()) for a, b in zip(bits_a, bits_b)]
    first = next((si for si, w in enumerate(wrong) if w), None)
    result = f"{total - sum(wrong)}/{total} bits equal"
    result += "" if first is None else f", first difference at scale {first}"
    rows.append((f"{name}: bits", result, None, None))
    upto = len(bits_b) if first is None else first + 1  # the inputs are identical up to there
    d = max(diff(a.reshape(b.shape), b)[0] for a, b in zip(logits_a[:upto], logits_b[:upto]))
    top = max(b.abs().max().item() for b in logits_b[:upto])
    margin = min((b[..., 1] - b[..., 0]).abs().min().item() for b in logits_b[:upto])
    rows.append((f"{name}: guided logits", f"smallest bit margin {margin:.1e}" if greedy else "-", d, d / top))
    if first is not None:
        b = logits_b[first].reshape(logits_a[first].shape)
        where = (bits_a[first] != bits_b[first]).reshape(b.shape[0], -1)
        margins = ", ".join(f"{m:.1e}" for m in (b[..., 1] - b[..., 0]).abs()[where].tolist())
        rows.append((f"{name}: margins of the bits differing at scale {first}", margins, None, None))
    return first is None


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of a FoundationVision/Infinity checkout")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--block-chunks", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--text-channels", type=int, default=256, help="a multiple of 128 (upstream's pooling heads)")
    ap.add_argument("--text-maxlen", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4, help="the tokenizer's d")
    ap.add_argument("--vae-ch", type=int, default=32)
    ap.add_argument("--attn-scale-max", type=float, default=100.0,
                    help="cos-attention scales drawn in [4, this]; 4 keeps upstream's initialisation")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.text_channels % 128 or args.text_channels < 128:
        raise SystemExit("--text-channels must be a multiple of 128: upstream pools the text with channels / 128 heads")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    off = load_official(args.official)
    t0 = time.perf_counter()

    # upstream's models, its weights copied into NextScale's with the official-file loaders
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    vae_o, inf_o = build_official(off, args)
    if inf_o.unregistered_blocks[0].fused_norm_func is None:
        raise SystemExit("the official model fell back to its non-fused block path (fused_op did not import)")
    sharpen_attention_(inf_o, args.attn_scale_max, g)
    sd = inf_o.state_dict()
    inf_n = Infinity.from_state_dict({k: v.clone() for k, v in sd.items()}, "<official state_dict>")
    tok_n = BSQTokenizer.from_state_dict({k: v.clone() for k, v in vae_o.state_dict().items()}, "<official vae>")
    not_taken = sorted(set(sd) - set(inf_n.state_dict()))
    _, inf_nf = build_official(off, args, fused_norm=False, vae=vae_o)
    inf_nf.load_state_dict(dict(sd), strict=True)
    for m in (vae_o, inf_o, inf_nf, inf_n, tok_n):
        m.to(dtype)

    # the schedule: upstream's table (as (1, h, w) triples, as run_infinity passes them) against NextScale's
    table = [(h, w) for _, h, w in off.dr.dynamic_resolution_h_w[1.0]["0.06M"]["scales"]]
    sched = InfinitySchedule.from_template(1.0, "0.06M")
    if table != list(sched.scales):
        raise SystemExit(f"the 1:1 0.06M schedules differ: official {table}, NextScale {list(sched.scales)}")
    L, d = sched.num_tokens, args.bits

    # two prompts of different lengths; per-prompt negatives, one longer than either prompt
    lens, neg_lens = [7, 12], [5, 14]
    text = (torch.randn(2, max(lens), args.text_channels, generator=g, dtype=torch.float64).to(dtype), lens)
    neg = (torch.randn(2, max(neg_lens), args.text_channels, generator=g, dtype=torch.float64).to(dtype), neg_lens)
    rows = []

    # 1. teacher-forced logits of the whole sequence
    x_BLd = (torch.randn(2, L - 1, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(dtype)
    scales_o = [(1, h, w) for h, w in table]
    with upstream_precision(dtype):
        logits_o = inf_o(packed(*text), x_BLd.clone(), scales_o)
        logits_nf = inf_nf(packed(*text), x_BLd.clone(), scales_o)
    logits_n = inf_n.forward_teacher(inf_n.condition(*padded(*text), guided=False), x_BLd, sched)
    rows.append((f"teacher-forced logits {tuple(logits_o.shape)}", "-", *diff(logits_n, logits_o)))

    # 2. sampling; 3. decoding
    greedy = {"cfg": args.cfg, "tau": args.tau, "top_k": 1, "top_p": 0.0}
    seeded = {"cfg": args.cfg, "tau": 0.5, "top_k": 900, "top_p": 0.97}  # the 2B's defaults, a batch of one
    cases = (("greedy, learned unconditional", text, None, greedy),
             ("greedy, negative prompts", text, neg, greedy),
             ("seeded, 1 prompt, tau 0.5, top-p 0.97", (text[0][:1], lens[:1]), None, seeded))
    for name, prompts, negative, opts in cases:
        theirs = sample_official(off, inf_o, vae_o, prompts, negative, sched, dtype, args.seed, **opts)
        ours = sample_nextscale(inf_n, tok_n, prompts, negative, sched, args.seed, InfinityOptions(**opts))
        if compare_bits(name, ours, theirs, rows, greedy=opts["top_k"] == 1):
            rows.append((f"{name}: summed codes {tuple(theirs[2].shape)}", "-", *diff(ours[2], theirs[2])))
            rows.append((f"{name}: decoded images {tuple(theirs[3].shape)}", "-", *diff(ours[3], theirs[3])))
        if negative is None and opts is greedy:
            img = tok_n.decode(theirs[2].to(dtype))
            rows.append(("BSQTokenizer.decode vs vae.decode, same summed codes", "-", *diff(img, theirs[3])))
            # upstream's own non-fused block path against its fused one
            rows.append(("official fused_norm=False vs fused: teacher-forced logits", "-", *diff(logits_nf, logits_o)))
            nonfused = sample_official(off, inf_nf, vae_o, prompts, negative, sched, dtype, args.seed, **opts)
            compare_bits(f"official fused_norm=False vs fused, {name}", nonfused, theirs, rows)

    print(f"# Infinity: official vs NextScale, {args.dtype}, cpu, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; depth {args.depth} ({args.block_chunks} chunks), width {args.width}, "
          f"{args.heads} heads, text {args.text_channels} ch (maxlen {args.text_maxlen}), d = {d}, tokenizer f2 "
          f"base {args.vae_ch}; cos-attention scales in [4, {args.attn_scale_max:g}]; 1:1 0.06M "
          f"({sched.num_scales} scales, {L} tokens); prompts of {lens} tokens, negatives of {neg_lens}; "
          f"cfg {args.cfg}, tau {args.tau}; {time.perf_counter() - t0:.1f} s")
    print(f"stand-ins: {', '.join(off.stubs)}; fused_ada_layer_norm uncompiled")
    print(f"state dicts: {len(sd)} transformer keys loaded strictly (not taken: {', '.join(not_taken) or 'none'}); "
          f"{len(vae_o.state_dict())} tokenizer keys")
    print("| compared | result | max abs diff | relative |")
    print("|---|---|---|---|")
    for name, result, a, r in rows:
        a, r = ("-", "-") if a is None else (f"{a:.1e}", f"{r:.1e}")
        print(f"| {name} | {result} | {a} | {r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
