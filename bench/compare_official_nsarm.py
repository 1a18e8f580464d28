"""Side by side with the official NSARM implementation: identical random weights, the mapped first scales, logits,
greedy and seeded bits, summed codes and decoded images of one super-resolution run.

    python bench/compare_official_nsarm.py --official /path/to/Xiangtaokong/NSARM [--dtype float64]
        [--depth 4] [--width 64] [--heads 4] [--map-layers 1] [--seed 1]

The official code is imported from the folder given (a checkout of github.com/Xiangtaokong/NSARM; never vendored
here) with the stand-ins and float64 handling of ``bench/compare_official_infinity.py`` (its docstring says what
they are); NSARM's package is also named ``infinity``.

The official model is built as NSARM's ``tools/run_infinity.py`` builds it for ``scripts/infer.sh`` (shared AdaLN,
fused norm, spatial patchify, level embedding before the first block only, RoPE normalised to the 1M grid, bit
labels, ``inference_mode``), with a tiny transformer (``--depth``, ``--width``, ``--heads``) and a tiny f2 tokenizer
with d = 14 (the network's hard-coded width). Its transformation network ``Map_Transformer_residual_for8B`` has no
size arguments: it is built at full size (widths 64 ... 1024, 32 x 32 input) and each branch's encoder is cut to its
first ``--map-layers`` layers after building (the same layers, fewer of them). Its state dict is loaded into
:class:`~nextscale.models.nsarm.model.NSARM` strictly, so both sides hold identical weights.

The run: a 64 px random image (a 32 x 32 latent for the f2 tokenizer, as a 256 px image is for the f8 one) upscaled
on the 1:1 '0.25M' schedule (10 scales: the 7 mapped ones, then 3 predicted), one prompt, ``cfg = 1`` as upstream
runs it. Compared:

1. the tokenizer latent of the image (upstream ``encode_for_raw_features``), the transformation network's outputs
   and the bits of the 7 mapped scales;
2. greedy sampling (top-k 1: upstream's hard-coded top-k 2 / top-p 0.97 replaced at its sampling function), tau
   0.5: the bits of every scale, the logits of every scale (recorded at each side's top-k/top-p filter), the summed
   codes and the decoded image; then the same with guidance (cfg 3 on the logits, the learned unconditional rows);
3. seeded sampling with upstream's settings (top-k 2, top-p 0.97, tau 0.5), seed 1 on both sides: once with
   upstream's ``torch.multinomial`` (a single draw is an exponential race in torch 2.x, two exponentials per bit,
   where NextScale draws one uniform per bit from a per-item CPU generator, so that a seed gives the same bits on
   every device and batch size: the bits part at the first predicted scale while the logits agree), and once with
   upstream's sampling function drawing as NextScale does from upstream's own generator, which checks that both
   loops consume the generator alike (draws at the mapped scales included) and give the same bits.

``encode_for_raw_features`` returns an fp32 latent, which upstream's network computes on under bf16 autocast; here
it is cast to the comparison dtype on entry (NextScale's network casts it to its compute dtype likewise).
Upstream's bits are recorded where its loop makes them: the quantiser call on the mapped scales' outputs, the
``indices_to_codes`` call on the predicted ones. Not a test; CPU only, tiny sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

import nextscale.models.infinity.sampler as nxs_sampler  # noqa: E402
from compare_official_infinity import (  # noqa: E402
    Recorder,
    compare_bits,
    diff,
    load_official,
    packed,
    padded,
    sharpen_attention_,
    upstream_precision,
)
from nextscale.models.core.sampling import categorical, filter_top_k_top_p_  # noqa: E402
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity  # noqa: E402
from nextscale.models.infinity.schedule import InfinitySchedule  # noqa: E402
from nextscale.models.nsarm.mapper import PREFIX, MapperConfig  # noqa: E402
from nextscale.models.nsarm.model import NSARM, NSARMConfig  # noqa: E402
from nextscale.models.nsarm.sampler import UpscaleCondition, UpscaleOptions, sample_nsarm  # noqa: E402

RESOLUTION = "0.25M"
D = 14  # the network's hard-coded latent width


def build_official(off, args):
    """Upstream's tokenizer (``vae_model``, f2, d = 14, shrunk) and NSARM (``load_infinity``'s arguments, tiny
    transformer, the network's encoders cut to ``--map-layers``)."""
    real = off.vae.AutoEncoder

    def tiny(ns):  # vae_model hard-codes base_ch=128, num_res_blocks=2
        ns.base_ch, ns.num_res_blocks = args.vae_ch, 1
        return real(ns)

    off.vae.AutoEncoder = tiny
    try:
        vae = off.vae.vae_model(None, "dynamic", codebook_dim=D, codebook_size=2**D, patch_size=2,
                                encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2])
    finally:
        off.vae.AutoEncoder = real
    model = off.infinity.Infinity(
        vae_local=vae, text_channels=args.text_channels, text_maxlen=args.text_maxlen,
        shared_aln=True, raw_scale_schedule=None, checkpointing="full-block", customized_flash_attn=False,
        fused_norm=True, pad_to_multiplier=128, use_flex_attn=False, add_lvl_embeding_only_first_block=1,
        use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn=RESOLUTION, apply_spatial_patchify=1,
        inference_mode=True, train_h_div_w_list=[1.0],
        depth=args.depth, embed_dim=args.width, num_heads=args.heads, mlp_ratio=4, drop_path_rate=0.0,
        block_chunks=args.block_chunks, cond_drop_rate=0.0,
    )
    for encoder in model.map_transformer.transformers:
        del encoder.layers[args.map_layers:]
        encoder.num_layers = args.map_layers
    return vae.eval().requires_grad_(False), model.eval().requires_grad_(False)


def nextscale_draw(logits, rng=None, top_k=0, top_p=0.0, num_samples=1):
    """Upstream's sampling function's contract drawn as NextScale draws (one float32 uniform per bit from ``rng``;
    upstream runs with float64 as the default dtype here, which ``torch.rand`` would otherwise draw)."""
    pairs = filter_top_k_top_p_(logits, top_k, top_p)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return categorical(pairs.softmax(dim=-1), [rng])[..., None]
    finally:
        torch.set_default_dtype(default)


def sample_official(off, model, vae, text, lr_pil, schedule, dtype, seed, cfg, tau, greedy, draw=None):
    """Upstream's ``autoregressive_infer_cfg`` as ``gen_one_img`` calls it (its sampling function replaced by
    ``draw`` when given); returns the bits per scale, the logits per scale (B, l*d, 2), the summed codes and the
    decoded image, recorded on the way."""
    lfq = vae.quantizer.lfq
    mapped, predicted, decode = Recorder(lfq.forward), Recorder(lfq.indices_to_codes), Recorder(vae.decode)
    real_sample = off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_
    sample = draw or real_sample

    def draw_(logits, rng=None, top_k=0, top_p=0.0, num_samples=1):
        if greedy:
            top_k, top_p = 1, 0.0
        return sample(logits, rng=rng, top_k=top_k, top_p=top_p, num_samples=num_samples)

    logits = Recorder(draw_)
    lfq.forward, lfq.indices_to_codes, vae.decode = mapped, predicted, decode
    off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_ = logits
    try:
        with upstream_precision(dtype):
            model.autoregressive_infer_cfg(
                vae=vae, scale_schedule=[(1, h, w) for h, w in schedule.scales], label_B_or_BLT=packed(*text),
                B=1, negative_label_B_or_BLT=None, g_seed=seed, cfg_list=[cfg] * schedule.num_scales,
                tau_list=[tau] * schedule.num_scales, returns_vemb=1, cfg_insertion_layer=[0], vae_type=D,
                ret_img=True, trunk_scale=1000, inference_mode=True, LR_img=lr_pil,
            )
    finally:
        off.infinity.sample_with_top_k_top_p_also_inplace_modifying_logits_ = real_sample
        del lfq.forward, lfq.indices_to_codes, vae.decode  # back to the class's methods
    bits = [r.bit_indices[:, 0].bool() for r in mapped.out] + [b[:, 0].bool() for b in predicted.seen]
    return bits, logits.seen, decode.seen[-1], decode.out[-1]


def sample_nextscale(model, tok, text, image, seed, options):
    """NextScale's ``sample_nsarm``, the logits recorded at its top-k/top-p filter."""
    logits = Recorder(nxs_sampler.filter_top_k_top_p_)
    nxs_sampler.filter_top_k_top_p_ = logits
    try:
        toks = sample_nsarm(model, tok, UpscaleCondition(image, *padded(*text)), seed=seed, options=options)
    finally:
        nxs_sampler.filter_top_k_top_p_ = logits.fn
    return toks.bits, logits.seen, toks.summed_codes, tok.decode(toks.summed_codes)


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of a Xiangtaokong/NSARM checkout")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--block-chunks", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--map-layers", type=int, default=1, help="encoder layers kept in each branch of the network")
    ap.add_argument("--text-channels", type=int, default=256, help="a multiple of 128 (upstream's pooling heads)")
    ap.add_argument("--text-maxlen", type=int, default=32)
    ap.add_argument("--vae-ch", type=int, default=32)
    ap.add_argument("--attn-scale-max", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=1, help="upstream's infer.sh runs seed 1")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    off = load_official(args.official)
    if not hasattr(off.infinity, "Map_Transformer_residual_for8B"):
        raise SystemExit(f"{args.official} is not a checkout of Xiangtaokong/NSARM (no Map_Transformer_residual_for8B)")
    t0 = time.perf_counter()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    vae_o, inf_o = build_official(off, args)
    sharpen_attention_(inf_o, args.attn_scale_max, g)
    sd = inf_o.state_dict()
    transformer = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    official = MapperConfig.official()
    config = NSARMConfig(
        Infinity.infer_config(transformer),
        MapperConfig(channels=D, grid=official.grid, sides=official.sides, widths=official.widths,
                     layers=(args.map_layers,) * official.num_scales, heads=official.heads, resolution=RESOLUTION),
    )
    inf_n = NSARM.from_state_dict({k: v.clone() for k, v in sd.items()}, "<official state_dict>", config)
    tok_n = BSQTokenizer.from_state_dict({k: v.clone() for k, v in vae_o.state_dict().items()}, "<official vae>")
    not_taken = sorted(set(sd) - set(inf_n.state_dict()))
    for m in (vae_o, inf_o, inf_n, tok_n):
        m.to(dtype)
    network = inf_o.map_transformer.forward  # takes the fp32 latent of encode_for_raw_features (bf16 autocast there)
    inf_o.map_transformer.forward = lambda x: network(x.to(dtype))

    table = [(h, w) for _, h, w in off.dr.dynamic_resolution_h_w[1.0][RESOLUTION]["scales"]]
    sched = InfinitySchedule.from_template(1.0, RESOLUTION)
    if table != list(sched.scales) or inf_n.schedule() != sched:
        raise SystemExit(f"the 1:1 {RESOLUTION} schedules differ: official {table}, NextScale {list(sched.scales)}")

    side = official.grid * tok_n.downsample
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8)
    lr_pil = Image.fromarray(pixels.numpy())
    image = (torch.from_numpy(np.asarray(lr_pil)).permute(2, 0, 1)[None].to(dtype) / 255) * 2 - 1
    text = (torch.randn(1, 9, args.text_channels, generator=g, dtype=torch.float64).to(dtype), [9])
    rows = []

    # 1. the latent, the network's outputs, the mapped bits
    with upstream_precision(dtype):
        raw_o = vae_o.encode_for_raw_features(image[:, :, None], scale_schedule=None)[0].squeeze(2)
        maps_o = inf_o.map_transformer(raw_o)
    raw_n = tok_n.encode_latent(image)
    maps_n = inf_n.map_transformer(raw_n)
    rows.append((f"tokenizer latent {tuple(raw_o.shape)}", "-", *diff(raw_n, raw_o)))
    d_maps = [diff(a, b) for a, b in zip(maps_n, maps_o)]
    rows.append((f"network outputs, {len(maps_o)} scales (sides {list(official.sides)})", "-",
                 max(a for a, _ in d_maps), max(r for _, r in d_maps)))
    bits_n = inf_n.map_transformer.bits(raw_n)
    bits_o = [(m.reshape(1, D, s, s) > 0).permute(0, 2, 3, 1) for m, s in zip(maps_o, official.sides)]
    total = sum(b.numel() for b in bits_o)
    equal = sum(int((a == b).sum()) for a, b in zip(bits_n, bits_o))
    rows.append(("mapped bits", f"{equal}/{total} equal", None, None))

    # 2. greedy, without and with guidance; 3. seeded with upstream's settings
    seeded = "seeded, cfg 1, tau 0.5, top-k 2, top-p 0.97"
    cases = (("greedy, cfg 1, tau 0.5", 1.0, 0.5, True, UpscaleOptions(cfg=1.0, tau=0.5, top_k=1, top_p=0.0), None),
             ("greedy, cfg 3, tau 0.5", 3.0, 0.5, True, UpscaleOptions(cfg=3.0, tau=0.5, top_k=1, top_p=0.0), None),
             (f"{seeded}, upstream's torch.multinomial", 1.0, 0.5, False, UpscaleOptions(), None),
             (f"{seeded}, NextScale's draw on both sides", 1.0, 0.5, False, UpscaleOptions(), nextscale_draw))
    for name, cfg, tau, greedy, opts, draw in cases:
        theirs = sample_official(off, inf_o, vae_o, text, lr_pil, sched, dtype, args.seed, cfg, tau, greedy, draw)
        ours = sample_nextscale(inf_n, tok_n, text, image, args.seed, opts)
        if compare_bits(name, ours, theirs, rows, greedy=greedy):
            rows.append((f"{name}: summed codes {tuple(theirs[2].shape)}", "-", *diff(ours[2], theirs[2])))
            rows.append((f"{name}: decoded images {tuple(theirs[3].shape)}", "-", *diff(ours[3], theirs[3])))

    rows = [r for r in rows if not (r[0].startswith(seeded) and "margins" in r[0])]  # random draws: no margins
    map_params = sum(p.numel() for p in inf_n.map_transformer.parameters())
    print(f"# NSARM: official vs NextScale, {args.dtype}, cpu, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; transformer depth {args.depth} ({args.block_chunks} chunks), width {args.width}, "
          f"{args.heads} heads, text {args.text_channels} ch; tokenizer f2 d = {D} base {args.vae_ch}, patchified; "
          f"network {map_params / 1e6:.1f} M parameters ({args.map_layers} encoder layer(s) per branch); 1:1 "
          f"{RESOLUTION} ({sched.num_scales} scales, {official.num_scales} mapped), a {side} px input; "
          f"cos-attention scales in [4, {args.attn_scale_max:g}]; seed {args.seed}; {time.perf_counter() - t0:.1f} s")
    print(f"stand-ins: {', '.join(off.stubs)}; fused_ada_layer_norm uncompiled")
    print(f"state dict: {len(sd)} keys loaded strictly ({len(sd) - len(transformer)} of the network; not taken: "
          f"{', '.join(not_taken) or 'none'}); {len(vae_o.state_dict())} tokenizer keys")
    print("| compared | result | max abs diff | relative |")
    print("|---|---|---|---|")
    for name, result, a, r in rows:
        a, r = ("-", "-") if a is None else (f"{a:.1e}", f"{r:.1e}")
        print(f"| {name} | {result} | {a} | {r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
