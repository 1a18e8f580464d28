"""Side by side with the official FlexVAR implementation: identical random weights, the whole-sequence logits, the
greedy tokens of the scale loop on several schedules, FlexVAE's encoding and the decoded image.

    python bench/compare_official_flexvar.py --official /path/to/jiaosiyu1999/FlexVAR [--dtype float64]
        [--depth 2] [--vocab 64] [--seed 0]

The official code is imported from the folder given (a checkout of github.com/jiaosiyu1999/FlexVAR; never vendored
here): its top-level ``models`` and ``dist``, with the folder first on ``sys.path``; the script checks they came from
there. Upstream's ``FlexVAR`` is built tiny with upstream's head rule (``depth`` heads of 64 channels,
``attn_l2_norm``), every parameter redrawn from a seeded normal (upstream's initialisation starts every block near
the identity, which would compare little), and its state dict loads into ``FlexVAR.from_state_dict`` strictly, the
config inferred from the shapes. FlexVAE is upstream's ``VQModel`` (LlamaGen's VQ) shrunk to two levels (``ch``
128, 64 codes; 32 codebook channels, which upstream's sampler hard-codes), redrawn and loaded into ``FlexVAE``
strictly. Compared, with 2 classes:

1. the logits of upstream's ``forward`` (``cond_drop_rate`` 0) against ``FlexVAR.forward_teacher`` on the same
   teacher input (random token maps, each bicubic-upsampled to the next side) for each schedule;
2. upstream's ``autoregressive_infer_cfg`` (cfg 1.5, VAR's ramp, ``top_k=1``: greedy) against ``sample_flexvar``
   with ``top_k=1``: the token maps of every scale (recorded from upstream's sampling function) and the decoded
   image, on training's 256-px schedule, upstream's 13-step one and a 512-px one (sides above ``max_pn`` 16);
3. FlexVAE: the multi-scale encoding's indices (upstream's ``multi_scale_encode``) of random images.

``--dtype float64`` (default) runs both in float64 (default dtype float64, upstream's ``.float()`` casts kept as
float64: ``compare_official_dd.upstream_precision``). Not a test; CPU only, tiny sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

from compare_official_dd import redraw, rel, upstream_precision  # noqa: E402
from nextscale.models.flexvar.family import FAMILY  # noqa: E402
from nextscale.models.flexvar.model import FlexVAR  # noqa: E402
from nextscale.models.flexvar.sampler import FlexVAROptions, sample_flexvar  # noqa: E402
from nextscale.models.flexvar.schedule import PUBLISHED  # noqa: E402
from nextscale.models.flexvar.tokenizer import FlexVAE  # noqa: E402

CVAE = 32  # upstream's sampler reshapes the last scale's codes to 32 channels
SCHEDULES = {
    "256 px, 10 steps (training's)": PUBLISHED[(16, 10)],
    "256 px, 13 steps": PUBLISHED[(16, 13)],
    "512 px, 10 steps": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}


def load_official(path: str):
    """Upstream's ``models`` package, imported from the checkout."""
    root = Path(path).resolve()
    if not (root / "models" / "flexvar.py").is_file():
        raise SystemExit(f"{root} is not a checkout of jiaosiyu1999/FlexVAR (models/flexvar.py is missing)")
    sys.path.insert(0, str(root))
    for name in [n for n in sys.modules if n in ("models", "dist") or n.startswith("models.")]:
        del sys.modules[name]
    import models.vq_llama

    import models
    import models.flexvar

    if not Path(models.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"'models' imported from {models.__file__}, not from {root}")
    return models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of a jiaosiyu1999/FlexVAR checkout")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--depth", type=int, default=2, help="upstream's rule: depth heads of 64 channels")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    official_models = load_official(args.official)
    print(f"# FlexVAR: official vs NextScale, {args.dtype}, cpu, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    vq = official_models.vq_llama
    with upstream_precision(dtype):
        vae = vq.VQModel(vq.ModelArgs(codebook_size=args.vocab, codebook_embed_dim=CVAE, encoder_ch_mult=[1, 2],
                                      decoder_ch_mult=[1, 2], z_channels=128))
    redraw(vae, gen, 0.05)
    vae = vae.to(dtype).eval()
    tok = FlexVAE.from_state_dict(vae.state_dict(), "upstream VQModel").to(dtype)
    print(f"FlexVAE: {len(vae.state_dict())} keys loaded strictly, config: {tok.config}")

    width = 64 * args.depth
    with upstream_precision(dtype):
        official = official_models.flexvar.FlexVAR(
            vae, num_classes=10, depth=args.depth, embed_dim=width, num_heads=args.depth, drop_path_rate=0.0,
            cond_drop_rate=0.0, attn_l2_norm=True, flash_if_available=False, fused_if_available=False,
        )
    redraw(official, torch.Generator().manual_seed(args.seed + 1), 0.3)
    with torch.no_grad():
        official.head.weight.mul_(0.1)  # logits of order 1: the greedy argmax is decided by a margin
    official = official.to(dtype).eval()
    ours = FlexVAR.from_state_dict(official.state_dict(), "upstream FlexVAR").to(dtype)
    print(f"FlexVAR: {len(official.state_dict())} keys loaded strictly, config: {ours.config}")

    drawn: list[torch.Tensor] = []
    upstream_draw = official_models.flexvar.sample_with_top_k_top_p_

    def recording_draw(*a, **kw):
        idx = upstream_draw(*a, **kw)
        drawn.append(idx[:, :, 0])
        return idx

    official_models.flexvar.sample_with_top_k_top_p_ = recording_draw
    labels, failed = torch.tensor([3, 7]), False
    with torch.no_grad():
        for name, pn in SCHEDULES.items():
            B = len(labels)
            indices = [torch.randint(args.vocab, (B, p, p), generator=gen) for p in pn]
            x_BLCv = tok.teacher_input(indices, pn).to(dtype)
            with upstream_precision(dtype):
                theirs = official(labels, x_BLCv, pn)
            logits_diff = rel(ours.forward_teacher(labels, x_BLCv, pn), theirs)

            drawn.clear()
            with upstream_precision(dtype):
                img_theirs = official.autoregressive_infer_cfg(vae, B, labels, pn, cfg=1.5, top_k=1, top_p=0.0)
            options = FlexVAROptions(patch_nums=pn, cfg=1.5, top_k=1, top_p=0.0)
            tokens = sample_flexvar(ours, tok, labels, seed=args.seed, options=options)
            same = all(torch.equal(t.flatten(1), u) for t, u in zip(tokens.indices, drawn, strict=True))
            img_diff = float((FAMILY.decode(tok, tokens).double() - img_theirs.clamp(-1, 1).double()).abs().max())
            print(f"{name} {','.join(map(str, pn))}: logits max rel diff {logits_diff:.2e}; greedy tokens of all "
                  f"{len(pn)} scales equal: {same}; decoded image max |diff| {img_diff:.2e}")
            failed |= not same or logits_diff > 1e-6 or img_diff > 1e-6

        images = torch.rand(2, 3, 32, 32, generator=gen, dtype=dtype) * 2 - 1
        pn = (1, 2, 4, 8, 16)
        with upstream_precision(dtype):
            h = vae.encoder(images)
            theirs = [vae.quantize(vae.quant_conv(torch.nn.functional.interpolate(h, size=(p, p), mode="area")))[2][2]
                      for p in pn]
        ours_idx = tok.img_to_indices(images, pn)
        same = all(torch.equal(a.flatten(), b) for a, b in zip(ours_idx, theirs, strict=True))
        print(f"FlexVAE multi-scale encoding {','.join(map(str, pn))}: indices equal: {same}")
        failed |= not same
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
