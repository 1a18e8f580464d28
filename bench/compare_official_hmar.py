"""Side by side with the official HMAR implementation: identical random weights, every pass's logits, the sampled
tokens (greedy, and with the same draws) and the decoded image.

    python bench/compare_official_hmar.py --official /path/to/NVlabs/HMAR [--dtype float64] [--depth 3]
        [--branch 2] [--vocab 64] [--cvae 8] [--vae-ch 32] [--seed 0]

The official code is imported from the folder given (a checkout of github.com/NVlabs/HMAR; never vendored here). Its
top-level packages there are ``models``, ``attn``, ``utils`` and ``dist``: the script puts the folder first on
``sys.path``, imports ``models`` and checks that it came from there. Two of upstream's modules are replaced in
``sys.modules`` for a CPU run: ``utils.misc`` (it imports wandb, pytz and torchvision; HMAR takes one helper from it,
the substring test that freezes parameters) and ``attn.block_sparse_attn_interface`` (its module allocates CUDA
tensors when built; sampling never calls it: ``generate`` attends per scale with ``using_block_sparse_attn=False``).

Both sides hold identical weights: upstream's ``HMAR`` is built tiny with upstream's head rule (``depth`` heads of 64
channels, ``depth - branch`` base blocks, ``branch`` next-scale and mask blocks) on VAR's 256 px schedule, and every
parameter is redrawn from a seeded normal; its state dict loads into ``HMAR.from_state_dict`` strictly, the config
inferred from the shapes. Upstream's ``VQVAE`` is shrunk (``ch`` 32, vocabulary 64, 8 channels) and loaded into
VAR's ``MultiScaleVQVAE``. Upstream's ``generate`` runs with its released refinement schedule (``mask_schedule``
of ``utils/sampling_arg_util.py``) against ``sample_hmar`` with the same, both with classifier-free guidance:

1. greedy (top-k 1): every pass's guided logits, the tokens, and the image of upstream's ``generate`` against
   NextScale Decode's;
2. sampled (top-k 8, top-p 0.9): upstream's draw (``sample_with_top_k_top_p_``) is wrapped to filter as it does and
   then draw with NextScale's per-item generators (:func:`~nextscale.models.core.sampling.categorical`), so both
   sides draw the same numbers and the confidence ranking of the refinement passes is compared token for token.

``--dtype float64`` (default) runs both in float64 (upstream's ``.float()`` casts are no-ops on float64 tensors;
NextScale's ``f_hat`` accumulates in float32 as in every precision). Not a test; CPU only, tiny sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import torch
from compare_official_dd import redraw, rel, upstream_precision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from packbootstrap import register_pack

register_pack()

import nextscale.models.hmar.sampler as hmar_sampler  # noqa: E402
from nextscale.models.core.sampling import categorical, item_generators  # noqa: E402
from nextscale.models.core.schedule import SCHEDULE_256  # noqa: E402
from nextscale.models.hmar.model import HMAR  # noqa: E402
from nextscale.models.hmar.sampler import OFFICIAL_REFINEMENT, HMAROptions, sample_hmar  # noqa: E402
from nextscale.models.var.family import FAMILY as VAR  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

UPSTREAM_SCHEDULE = [list(c) for c in OFFICIAL_REFINEMENT] + [[pn * pn] for pn in SCHEDULE_256[3:]]


class _UnusedBlockSparseAttention(nn.Module):
    """Stands in for upstream's block-sparse module, which ``generate`` never calls."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def load_official(path: str):
    """Upstream's ``models`` package, imported from the checkout."""
    root = Path(path).resolve()
    if not (root / "models" / "hmar.py").is_file():
        raise SystemExit(f"{root} is not a checkout of NVlabs/HMAR (models/hmar.py is missing)")
    sys.path.insert(0, str(root))
    packages = ("models", "utils", "dist", "attn")
    for name in [n for n in sys.modules if n.split(".")[0] in packages]:
        del sys.modules[name]
    misc = types.ModuleType("utils.misc")
    misc.does_not_contain_substrings = lambda name, parts: not any(part in name for part in parts)
    sparse = types.ModuleType("attn.block_sparse_attn_interface")
    sparse.BlockSparseAttention = _UnusedBlockSparseAttention
    sys.modules.update({"utils.misc": misc, "attn.block_sparse_attn_interface": sparse})
    import models

    if not Path(models.__file__).resolve().is_relative_to(root):
        raise SystemExit(f"'models' imported from {models.__file__}, not from {root}")
    return models


class Recorder:
    """Wraps upstream's draw (in ``models.hmar``) and NextScale's filter to record every pass's guided logits, and
    upstream's ``get_next_autoregressive_input`` to record each scale's final code map ``(B, l, Cvae)``; with
    ``generators``, upstream draws with them after filtering as it does."""

    def __init__(self, upstream_hmar_module, quantize, generators=None):
        self.module, self.original = upstream_hmar_module, upstream_hmar_module.sample_with_top_k_top_p_
        self.ours_filter = hmar_sampler.filter_top_k_top_p_
        self.quantize, self.next_input = quantize, quantize.get_next_autoregressive_input
        self.generators, self.theirs, self.ours, self.code_maps = generators, [], [], []

    def __enter__(self):
        def theirs(logits_BlV, rng=None, top_k=0, top_p=0.0, num_samples=1):
            self.theirs.append(logits_BlV.clone())
            drawn = self.original(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=num_samples)
            if self.generators is None:
                return drawn
            return categorical(logits_BlV.softmax(dim=-1), self.generators)[..., None]

        def ours(logits_BlV, top_k=0, top_p=0.0):
            self.ours.append(logits_BlV.clone())
            return self.ours_filter(logits_BlV, top_k, top_p)

        def next_input(si, SN, f_hat, h_BChw):
            self.code_maps.append(h_BChw.flatten(2).transpose(1, 2).clone())
            return self.next_input(si, SN, f_hat, h_BChw)

        self.module.sample_with_top_k_top_p_, hmar_sampler.filter_top_k_top_p_ = theirs, ours
        self.quantize.get_next_autoregressive_input = next_input
        return self

    def __exit__(self, *exc):
        self.module.sample_with_top_k_top_p_, hmar_sampler.filter_top_k_top_p_ = self.original, self.ours_filter
        del self.quantize.get_next_autoregressive_input


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="folder of an NVlabs/HMAR checkout")
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--depth", type=int, default=3, help="upstream's rule: depth heads of 64 channels")
    ap.add_argument("--branch", type=int, default=2, help="blocks of each branch (upstream's n_layers_train)")
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--cvae", type=int, default=8)
    ap.add_argument("--vae-ch", type=int, default=32)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = load_official(args.official)
    print(f"# HMAR: official vs NextScale, {args.dtype}, cpu, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    gen = torch.Generator().manual_seed(args.seed)
    pn, t0 = SCHEDULE_256, time.perf_counter()

    with upstream_precision(dtype):
        vae = models.VQVAE(vocab_size=args.vocab, z_channels=args.cvae, ch=args.vae_ch, test_mode=True,
                           share_quant_resi=4, v_patch_nums=pn)
        official = models.HMAR(
            vae, num_classes=10, depth=args.depth, embed_dim=64 * args.depth, num_heads=args.depth,
            attn_l2_norm=True, patch_nums=pn, flash_if_available=False, fused_if_available=False,
            n_layers_train=args.branch,
        )
    redraw(vae, gen, 0.05)
    vae = vae.to(dtype).eval()
    tok = MultiScaleVQVAE.from_state_dict(vae.state_dict(), "upstream VQVAE").to(dtype)
    print(f"VQ-VAE: {len(vae.state_dict())} keys loaded strictly into MultiScaleVQVAE")
    redraw(official, torch.Generator().manual_seed(args.seed + 1), 0.3)
    with torch.no_grad():
        for head in (official.ns_head, official.mask_head):
            head.weight.mul_(0.1)  # logits of order 1: the greedy argmax is decided by a margin
    official = official.to(dtype).eval()
    ours = HMAR.from_state_dict(official.state_dict(), "upstream HMAR").to(dtype)
    assert (ours.config.depth, ours.config.branch_depth, ours.config.patch_nums) == (args.depth, args.branch, pn)
    print(f"HMAR: {len(official.state_dict())} keys loaded strictly, config: {ours.config}")

    labels, failed = torch.tensor([3, 7]), False
    for mode, top_k, top_p in (("greedy", 1, 0.0), ("sampled", 8, 0.9)):
        generators = item_generators(args.seed, len(labels)) if mode == "sampled" else None
        with Recorder(sys.modules["models.hmar"], vae.quantize, generators) as rec, torch.no_grad():
            with upstream_precision(dtype):
                img_theirs = official.generate(
                    len(labels), labels, g_seed=args.seed, cfg=args.cfg, top_k=top_k, top_p=top_p, mask=True,
                    mask_schedule=UPSTREAM_SCHEDULE,
                )
            tokens = sample_hmar(ours, tok, labels, seed=args.seed,
                                 options=HMAROptions(cfg=args.cfg, top_k=top_k, top_p=top_p))
        if len(rec.theirs) != len(rec.ours):
            print(f"  {mode}: {len(rec.theirs)} upstream passes against {len(rec.ours)}")
            failed = True
            continue
        logits = max(rel(a, b) for a, b in zip(rec.ours, rec.theirs))
        codebook_VC = vae.quantize.embedding.weight
        idx_theirs = [(h[:, :, None] - codebook_VC).square().sum(-1).argmin(-1) for h in rec.code_maps]
        same = [bool(torch.equal(a, b.reshape(a.shape))) for a, b in zip(idx_theirs, tokens.indices)]
        img_ours = VAR.decode(tok, tokens).add(1).mul(0.5)
        img_diff = float((img_ours.double() - img_theirs.double()).abs().max())
        print(f"  {mode} (top-k {top_k}, top-p {top_p}, cfg {args.cfg}): {len(rec.ours)} passes, logits max rel diff "
              f"{logits:.2e}; tokens equal at {sum(same)} of {len(same)} scales; image max |diff| {img_diff:.2e}")
        failed |= not all(same) or img_diff > 1e-3
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
