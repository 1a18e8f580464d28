"""Side by side with the official Switti implementation: identical random weights, teacher-forced logits, greedy
tokens of its pipeline, and the VQ-VAE round trip.

    python bench/compare_official_switti.py --official /path/to/yandex-research/switti [--dtype float64]
        [--depth 2] [--vocab 64] [--cvae 8] [--vae-ch 32] [--cfg 3] [--seed 0]

The official code is imported from the folder given (a checkout of github.com/yandex-research/switti; it is never
vendored here). Its top-level packages are ``models``, ``utils`` and ``dist``: the script puts the checkout first on
``sys.path``, imports them, and checks that they came from there. What it imports but cannot have here is replaced
in ``sys.modules``, only when missing: ``tap`` (``Tap``, the base of its training arguments), ``pytz`` (unused on
these paths) and ``diffusers.models.embeddings.GaussianFourierProjection``, whose stand-in computes what diffusers'
class does with Switti's arguments (``set_W_to_weight=False, log=False, flip_sin_to_cos=False``): a parameter
``weight`` of random frequencies and ``[sin, cos](2 pi x weight)`` per value.

Both sides hold identical weights: upstream's ``Switti`` (``use_ar`` False and True) is built tiny with upstream's
head rule (``depth`` heads), the 512 px schedule, SwiGLU, RoPE and the crop condition, and every parameter is redrawn
from a seeded normal (upstream's training initialisation starts every block near the identity, which would compare
little); its state dict loads into ``Switti.from_state_dict`` strictly, the config inferred from the shapes (and
Switti-AR from the stored mask). The VQ-VAE is upstream's ``VQVAE`` shrunk (``ch`` 32, vocabulary 64, 8 channels),
loaded into VAR's ``MultiScaleVQVAE``. Compared, for both variants, with 2 prompts of 9 and 17 tokens (of 77):

1. teacher-forced logits of the whole sequence (upstream ``forward`` with the 512 px crop condition; NextScale
   ``forward_teacher``) on random inputs;
2. upstream's ``SwittiPipeline`` with stand-in text encoders returning fixed random CLIP states (its own encoders need
   the released CLIP weights), greedy (top-k 1, top-p 0), cfg ramp on from scale 1 and off from scale 7 (the null rows
   dropped, ``last_scale_temp`` 0.5), against ``sample_switti`` with the same options: the tokens of every scale, the
   logits every scale samples from (recorded by wrapping each side's top-k/top-p filter) and the decoded image;
3. the VQ-VAE, in fp32 (upstream sums the scales' codes in an fp32 ``f_hat`` whatever its dtype): indices of a
   random 512 px image on the 512 px schedule (upstream ``img_to_idxBl``) and its decode
   (``idxBl_to_img(..., last_one=True)``).

``--dtype float64`` (default) runs both in float64: upstream's ``.float()`` casts are made no-ops on float64 tensors
(a ``TorchFunctionMode``; default dtype float64 meanwhile). Upstream's RoPE angles and NextScale's RMSNorm (and the
head's norm) stay fp32, hence differences near 1e-7 relative. Not a test; CPU only, tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

import nextscale.models.switti.sampler as nxs_sampler  # noqa: E402
from nextscale.models.core.schedule import SCHEDULE_512  # noqa: E402
from nextscale.models.switti.model import Switti, SwittiText  # noqa: E402
from nextscale.models.switti.sampler import SwittiCondition, SwittiOptions, sample_switti  # noqa: E402
from nextscale.models.var.family import FAMILY as VAR  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

# -- stand-ins for what upstream imports but cannot use here -----------------------------------------


class _FourierFeatures(nn.Module):
    """diffusers' ``GaussianFourierProjection`` as Switti builds it (no log, no flip, parameter ``weight``)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x):
        angles = x[:, None] * self.weight[None, :] * 2 * math.pi
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def install_stubs() -> list[str]:
    stubs = {}
    if importlib.util.find_spec("tap") is None:
        stubs["tap"] = _module("tap", Tap=type("Tap", (), {}))
    if importlib.util.find_spec("pytz") is None:
        stubs["pytz"] = _module("pytz", timezone=lambda name: None)
    if importlib.util.find_spec("diffusers") is None:
        embeddings = _module("diffusers.models.embeddings", GaussianFourierProjection=_FourierFeatures)
        models = _module("diffusers.models", embeddings=embeddings)
        stubs.update({"diffusers": _module("diffusers", models=models), "diffusers.models": models,
                      "diffusers.models.embeddings": embeddings})
    sys.modules.update(stubs)
    return sorted(stubs)


def load_official(path: str):
    """Upstream's modules ``(switti, vqvae, pipeline)`` imported from the checkout."""
    root = Path(path).resolve()
    if not (root / "models" / "switti.py").is_file():
        raise SystemExit(f"{root} is not a checkout of yandex-research/switti (models/switti.py is missing)")
    stubs = install_stubs()
    sys.path.insert(0, str(root))
    for name in [n for n in sys.modules if n in ("models", "utils", "dist") or n.startswith(("models.", "utils."))]:
        del sys.modules[name]
    from models import pipeline, switti, vqvae

    for mod in (switti, vqvae, pipeline):
        if not Path(mod.__file__).resolve().is_relative_to(root):
            raise SystemExit(f"'{mod.__name__}' imported from {mod.__file__}, not from {root}")
    return types.SimpleNamespace(switti=switti, vqvae=vqvae, pipeline=pipeline, stubs=stubs)


class _KeepFloat64(TorchFunctionMode):
    """``Tensor.float()`` leaves float64 tensors as they are (upstream casts to fp32 in many places)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def upstream_precision(dtype: torch.dtype):
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


class _FixedEncoder(nn.Module):
    """A text encoder of upstream's pipeline (``encode(prompts)``) returning fixed states per prompt."""

    def __init__(self, table: dict[str, dict[str, torch.Tensor]]):
        super().__init__()
        self.table = table

    def encode(self, prompts):
        rows = [self.table[p] for p in prompts]
        return types.SimpleNamespace(**{k: torch.cat([r[k] for r in rows]) for k in rows[0]})


def random_text(width: int, lengths: list[int], gen: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """One prompt per length: states ``(1, 77, width)``, pooled ``(1, width)``, bias 0 up to the length, -inf after."""
    out = {}
    for n in lengths:
        bias = torch.full((1, 77), float("-inf"), dtype=dtype)
        bias[:, :n] = 0
        out[n] = {"last_hidden_state": torch.randn(1, 77, width, generator=gen, dtype=dtype),
                  "pooler_output": torch.randn(1, width, generator=gen, dtype=dtype), "attn_bias": bias}
    return out


def redraw(module: nn.Module, gen: torch.Generator, gain: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * gain)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def greedy_runs(off, official, ours, vae, tok, encoders, prompts, condition, args, dtype):
    """Upstream's pipeline and ``sample_switti``, greedy with the same guidance window: the indices upstream embeds
    per scale, the logits each side samples from, upstream's image and NextScale's tokens."""
    recorded = {"theirs": [], "ours": []}
    up_filter, our_filter = off.pipeline.sample_with_top_k_top_p_, nxs_sampler.filter_top_k_top_p_

    def record_theirs(logits, **kw):
        recorded["theirs"].append(logits.clone())
        return up_filter(logits, **kw)

    def record_ours(logits, top_k, top_p):
        recorded["ours"].append(logits.clone())
        return our_filter(logits, top_k, top_p)

    drawn = []
    hook = vae.quantize.embedding.register_forward_pre_hook(lambda m, a: drawn.append(a[0].clone()))
    off.pipeline.sample_with_top_k_top_p_, nxs_sampler.filter_top_k_top_p_ = record_theirs, record_ours
    try:
        pipe = off.pipeline.SwittiPipeline(official, vae, *encoders, "cpu", dtype=dtype)
        with upstream_precision(dtype):
            img_theirs = pipe(prompts, null_prompt="", seed=args.seed, cfg=args.cfg, top_k=1, top_p=0.0,
                              return_pil=False, turn_on_cfg_start_si=1, turn_off_cfg_start_si=7, last_scale_temp=0.5)
        options = SwittiOptions(cfg=args.cfg, top_k=1, top_p=0.0, guidance_start=1, guidance_stop=7, temperature=0.5)
        tokens = sample_switti(ours, tok, condition, seed=args.seed, options=options)
    finally:
        hook.remove()
        off.pipeline.sample_with_top_k_top_p_, nxs_sampler.filter_top_k_top_p_ = up_filter, our_filter
    return drawn, recorded, img_theirs, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of a yandex-research/switti checkout")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--depth", type=int, default=2, help="upstream's rule: depth heads of 64 channels")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--cvae", type=int, default=8)
    ap.add_argument("--vae-ch", type=int, default=32)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    off = load_official(args.official)
    print(f"# Switti: official vs NextScale, {args.dtype}, cpu, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; stand-ins: {', '.join(off.stubs) or 'none'}")
    gen = torch.Generator().manual_seed(args.seed)
    pn, width = SCHEDULE_512, 64 * args.depth
    t0 = time.perf_counter()

    with upstream_precision(dtype):
        vae = off.vqvae.VQVAE(vocab_size=args.vocab, z_channels=args.cvae, ch=args.vae_ch, v_patch_nums=pn)
    redraw(vae, gen, 0.05)
    vae = vae.to(dtype).eval()
    tok = MultiScaleVQVAE.from_state_dict(vae.state_dict(), "upstream VQVAE").to(dtype)
    print(f"VQ-VAE: {len(vae.state_dict())} keys loaded strictly into MultiScaleVQVAE")

    # the text both sides see: CLIP-L 768 + bigG 1280 states, bigG pooled, bias of the bigG encoding
    lengths = [9, 17, 2]  # two prompts, and the null prompt (start and end tokens)
    clip_l, clip_g = random_text(768, lengths, gen, dtype), random_text(1280, lengths, gen, dtype)
    names = {9: "a prompt", 17: "a longer prompt", 2: ""}
    enc_l = _FixedEncoder({names[n]: v for n, v in clip_l.items()})
    enc_g = _FixedEncoder({names[n]: v for n, v in clip_g.items()})

    def text_of(ns: list[int]) -> SwittiText:
        return SwittiText(
            torch.cat([torch.cat([clip_l[n]["last_hidden_state"], clip_g[n]["last_hidden_state"]], -1) for n in ns]),
            torch.cat([clip_g[n]["pooler_output"] for n in ns]),
            torch.cat([clip_g[n]["attn_bias"] for n in ns]),
        )

    prompts, text, null = [names[9], names[17]], text_of([9, 17]), text_of([2])
    B = len(prompts)
    x_BLCv = torch.randn(B, sum(p * p for p in pn) - 1, args.cvae, generator=gen, dtype=dtype)

    worst = 0.0
    for use_ar in (False, True):
        label = "Switti-AR" if use_ar else "Switti"
        with upstream_precision(dtype):
            official = off.switti.Switti(
                Cvae=args.cvae, V=args.vocab, depth=args.depth, embed_dim=width, num_heads=args.depth, patch_nums=pn,
                use_ar=use_ar,
            )
        redraw(official, torch.Generator().manual_seed(args.seed + 1), 0.3)
        official = official.to(dtype).eval()
        ours = Switti.from_state_dict(official.state_dict(), f"upstream {label}").to(dtype)
        assert ours.config.causal == use_ar and ours.config.num_heads == args.depth
        print(f"{label}: {len(official.state_dict())} keys loaded strictly, config inferred: {ours.config}")

        with torch.no_grad(), upstream_precision(dtype):
            theirs = official(x_BLCv, text.context_BTC, text.pooled_BC, text.bias_BT, [512] * B, [512] * B)
        mine = ours.forward_teacher(text, x_BLCv)
        r = rel(mine, theirs.float())
        worst = max(worst, r)
        print(f"  teacher-forced logits (B={B}, L={x_BLCv.shape[1] + 1}): max |diff| / max |logit| = {r:.2e}")

        # greedy pipeline, guidance on for scales 1..6, off (null rows dropped, temperature 0.5) from scale 7
        drawn, recorded, img_theirs, tokens = greedy_runs(off, official, ours, vae, tok, (enc_l, enc_g), prompts,
                                                          SwittiCondition(text, null), args, dtype)
        same = [bool(torch.equal(a.view(B, -1), b.view(B, -1))) for a, b in zip(drawn, tokens.indices)]
        logit_rel = max(rel(a, b) for a, b in zip(recorded["ours"], recorded["theirs"]))
        top2 = min(float((lg.topk(2, dim=-1).values.diff(dim=-1)).abs().min()) for lg in recorded["theirs"])
        img_ours = VAR.decode(tok, tokens).add(1).mul(0.5)
        img_rel = float((img_ours.double() - img_theirs.double()).abs().max())
        worst = max(worst, logit_rel)
        print(f"  greedy pipeline, cfg {args.cfg} on scales 1..6: tokens equal at {sum(same)}/{len(same)} scales; "
              f"sampled logits max rel diff {logit_rel:.2e} (smallest top-1/top-2 margin {top2:.3g}); "
              f"image max |diff| {img_rel:.2e}")
        if not all(same):
            return 1

    # upstream's decoding sums the scales in an fp32 f_hat whatever the model's dtype: this part runs in fp32
    vae, tok = vae.float(), tok.float()
    image = torch.rand(1, 3, 512, 512, generator=gen) * 2 - 1
    with torch.no_grad():
        idx_theirs = vae.img_to_idxBl(image)
        rec_theirs = vae.idxBl_to_img(idx_theirs, same_shape=True, last_one=True)
    encoded = VAR.encode(tok, image, pn, "stretch")
    idx_same = all(torch.equal(a, b.view(1, -1)) for a, b in zip(idx_theirs, encoded.indices))
    rec_ours = VAR.decode(tok, encoded)
    print(f"VQ-VAE round trip at 512 px: indices equal at every scale: {idx_same}; decoded image max |diff| "
          f"{float((rec_ours.double() - rec_theirs.double()).abs().max()):.2e}")
    print(f"done in {time.perf_counter() - t0:.1f} s; worst logit rel diff {worst:.2e}")
    return 0 if idx_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
