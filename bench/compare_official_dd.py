"""Side by side with the official Distilled Decoding implementation: identical random weights, the transformer's
two heads, the one- and two-step samples and their decoded images.

    python bench/compare_official_dd.py --official /path/to/microsoft/distilled_decoding [--dtype float64]
        [--depth 2] [--vocab 64] [--cvae 8] [--vae-ch 32] [--seed 0]

The official code is imported from the folder given (a checkout of github.com/microsoft/distilled_decoding, or its
``VAR`` folder; never vendored here). Its top-level packages there are ``models``, ``utils`` and ``dist``: the script
puts the folder first on ``sys.path``, imports ``models`` and ``sample`` and checks that they came from there. ``tap``
(the base of upstream's argument class, imported by ``sample.py``) is replaced in ``sys.modules`` when missing.

Both sides hold identical weights: upstream's ``DD_Model`` is built tiny with upstream's head rule (``depth`` heads of
64 channels), on VAR's 256 px schedule, with and without ``layerwise_n_d_embed``, and every parameter is redrawn from
a seeded normal (upstream's initialisation starts every block near the identity, which would compare little); its
state dict loads into ``DistilledVAR.from_state_dict`` strictly, the config inferred from the shapes. Upstream's
``VQVAE`` is shrunk (``ch`` 32, vocabulary 64, 8 channels) and loaded into VAR's ``MultiScaleVQVAE``. Compared, with
2 classes:

1. both heads (upstream ``forward``: continuous codes and logits) at steps ``t = 0`` and ``t = 3`` on random codes;
2. upstream's few-step loop as its ``sample.py`` runs it (``perturb_data``, ``final_predict``,
   ``get_final_sequence``; split 3) for one step ``(0,)`` and two steps ``(0, 3)`` against ``sample_dd`` with the
   noise ``sample_dd`` draws for the seed: the final codes, the greedy scales' indices, and the image of upstream's
   ``transfer_BLCv_to_B3HW`` against NextScale Decode's (VAR's decoder on the sample's ``f_hat``).

``--dtype float64`` (default) runs both in float64: upstream's ``.float()`` casts are made no-ops on float64 tensors
(a ``TorchFunctionMode``; default dtype float64 meanwhile). Not a test; CPU only, tiny sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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

from nextscale.models.core.schedule import SCHEDULE_256  # noqa: E402
from nextscale.models.dd.model import DistilledVAR  # noqa: E402
from nextscale.models.dd.sampler import DDOptions, noise, sample_dd  # noqa: E402
from nextscale.models.var.family import FAMILY as VAR  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

SPLIT = 3


def load_official(path: str):
    """Upstream's ``models`` package and ``sample`` module, imported from the checkout."""
    root = Path(path).resolve()
    if (root / "VAR" / "models" / "dd.py").is_file():
        root = root / "VAR"
    if not (root / "models" / "dd.py").is_file():
        raise SystemExit(f"{root} is not a checkout of microsoft/distilled_decoding (VAR/models/dd.py is missing)")
    stubs = []
    if importlib.util.find_spec("tap") is None:
        sys.modules["tap"] = types.SimpleNamespace(Tap=type("Tap", (), {}))
        stubs.append("tap")
    sys.path.insert(0, str(root))
    for name in [n for n in sys.modules if n in ("models", "utils", "dist", "sample") or n.startswith(("models.",
                                                                                                         "utils."))]:
        del sys.modules[name]
    import sample

    import models

    for mod in (models, sample):
        if not Path(mod.__file__).resolve().is_relative_to(root):
            raise SystemExit(f"'{mod.__name__}' imported from {mod.__file__}, not from {root}")
    return types.SimpleNamespace(models=models, sample=sample, stubs=stubs)


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


def redraw(module: nn.Module, gen: torch.Generator, gain: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * gain)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def official_steps(dd, labels, noise_BLCv, steps):
    """Upstream ``sample.py``'s loop over ``t_list = steps`` with ``loss_split_t = SPLIT``."""
    x = noise_BLCv
    for t in steps:
        t_B = torch.zeros(len(labels)) + t
        x = dd.perturb_data(x, t_B, noise_BLCv)
        codes, logits = dd.final_predict(labels, x, t_B)
        x = dd.get_final_sequence(codes, logits, SPLIT)
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of a microsoft/distilled_decoding checkout")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--depth", type=int, default=2, help="upstream's rule: depth heads of 64 channels")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--cvae", type=int, default=8)
    ap.add_argument("--vae-ch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    off = load_official(args.official)
    print(f"# Distilled Decoding: official vs NextScale, {args.dtype}, cpu, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; stand-ins: {', '.join(off.stubs) or 'none'}")
    gen = torch.Generator().manual_seed(args.seed)
    pn, width = SCHEDULE_256, 64 * args.depth
    t0 = time.perf_counter()

    with upstream_precision(dtype):
        vae = off.models.VQVAE(vocab_size=args.vocab, z_channels=args.cvae, ch=args.vae_ch, test_mode=True,
                               share_quant_resi=4, v_patch_nums=pn)
    redraw(vae, gen, 0.05)
    vae = vae.to(dtype).eval()
    tok = MultiScaleVQVAE.from_state_dict(vae.state_dict(), "upstream VQVAE").to(dtype)
    print(f"VQ-VAE: {len(vae.state_dict())} keys loaded strictly into MultiScaleVQVAE")

    labels = torch.tensor([3, 7])
    B, L = len(labels), sum(p * p for p in pn)
    x_BLCv = torch.randn(B, L, args.cvae, generator=gen, dtype=dtype)
    failed = False
    for layerwise in (True, False):
        label = "layerwise" if layerwise else "shared mark"
        with upstream_precision(dtype):
            official = off.models.DD_Model(
                vae, num_classes=10, depth=args.depth, embed_dim=width, num_heads=args.depth, drop_path_rate=0.0,
                attn_l2_norm=True, patch_nums=pn, flash_if_available=False, fused_if_available=False,
                n_d_embed_enable=True, layerwise_n_d_embed=layerwise,
            )
        redraw(official, torch.Generator().manual_seed(args.seed + 1), 0.3)
        with torch.no_grad():
            official.head.weight.mul_(0.1)  # logits of order 1: the greedy argmax is decided by a margin
        official = official.to(dtype).eval()
        ours = DistilledVAR.from_state_dict(official.state_dict(), f"upstream DD_Model ({label})").to(dtype)
        assert ours.config.layerwise == layerwise and ours.config.patch_nums == pn
        print(f"DD_Model, {label}: {len(official.state_dict())} keys loaded strictly, config: {ours.config}")

        with torch.no_grad():
            for t in (0, SPLIT):
                with upstream_precision(dtype):
                    codes_theirs, logits_theirs = official(labels, x_BLCv, torch.zeros(B) + t)
                codes_ours, logits_ours = ours(labels, x_BLCv, ours.config.scale_start(t))
                print(f"  t={t}: codes max rel diff {rel(codes_ours, codes_theirs):.2e}, logits max rel diff "
                      f"{rel(logits_ours, logits_theirs):.2e}")

            noise_BLCv = noise(args.seed, B, (L, args.cvae), torch.device("cpu")).to(dtype)
            greedy = ours.config.scale_start(SPLIT)
            for steps in ((0,), (0, SPLIT)):
                with upstream_precision(dtype):
                    final_theirs = official_steps(official, labels, noise_BLCv, steps)
                    img_theirs = off.sample.transfer_BLCv_to_B3HW(final_theirs.clone(), official, vae)
                tokens = sample_dd(ours, tok, labels, seed=args.seed, options=DDOptions(steps=steps, split=SPLIT))
                codebook = vae.quantize.embedding.weight
                idx_theirs = (final_theirs[:, :greedy, None] - codebook).square().sum(-1).argmin(-1)
                idx_ours = torch.cat([i.reshape(B, -1) for i in tokens.indices], 1)[:, :greedy]
                same = bool(torch.equal(idx_theirs, idx_ours))
                img_ours = VAR.decode(tok, tokens).add(1).mul(0.5)
                img_diff = float((img_ours.double() - img_theirs.double()).abs().max())
                print(f"  {len(steps)} step(s) {steps}: greedy-scale indices equal: {same}; image max |diff| "
                      f"{img_diff:.2e}")
                failed |= not same
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
