"""Train a class-conditional VAR generator on the token pyramids of a trained tokenizer.

Teacher forcing: the images are encoded once into per-scale indices (cached in the run folder); each step
builds the transformer input with ``quantize.teacher_forcing_input`` and minimises the cross-entropy of
all ``L`` tokens. Labels are replaced by the null class (``num_classes``) with probability
``--label-drop`` so that classifier-free guidance works. AdamW with linear warm-up and cosine decay; an
EMA of the weights is kept and exported.

Examples (from the repository root)::

    python3 -m training.train_generator --tokenizer weights/nextscale_tokenizer.safetensors \\
        --run-dir runs/generator --steps 4000 --out weights/nextscale_generator.safetensors
    python3 -m training.train_generator --tokenizer my_tok.safetensors --data path/to/folders --run-dir runs/my_gen
    torchrun --nproc-per-node 4 -m training.train_generator --tokenizer my_tok.safetensors --run-dir runs/my_gen

Under ``torchrun`` the same options train on every process (``--batch-size`` is the global batch; DDP, or FSDP with
``--parallel fsdp``; see training/distributed.py) and the checkpoint resumes at any number of processes.
Resuming is automatic (``--resume auto`` reads ``<run-dir>/last.pt``); passing a larger ``--steps`` continues
a finished run (the cosine schedule is stretched to the new total). ``--class-weight star=3`` draws a class more
often than its share of the data (batches sampled with replacement; the label drop is rescaled per class so that the
null class keeps the data's class mix). ``--shared-aln`` trains VAR-d36's layout (one ``shared_ada_lin`` for all
blocks). ``--init FILE`` starts a new run from a
trained generator's weights instead (fine-tuning, e.g. the embedded model on your own images of as many classes):
fresh optimizer, its own warm-up and cosine, the EMA starting at those weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from training import common, data, distributed

common.import_pack()
from nextscale.models.core.schedule import scale_slices  # noqa: E402
from nextscale.models.var.model import VAR, VARConfig  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train NextScale's class-conditional VAR generator")
    ap.add_argument("--tokenizer", required=True, help="trained tokenizer (.safetensors)")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a folder of class subfolders")
    ap.add_argument("--resolution", type=int, default=data.DEFAULT_RESOLUTION)
    ap.add_argument("--train-count", type=int, default=20000)
    ap.add_argument("--heldout-count", type=int, default=2000)
    ap.add_argument("--use-count", type=int, default=0,
                    help="train on the first N images only (0: all); encoding the set once costs time on a CPU")
    ap.add_argument("--cache-dir", default=os.path.join(common.repo_root(), "data"))
    # architecture
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--embed-dim", type=int, default=256)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--shared-aln", action="store_true",
                    help="one AdaLN modulation for all blocks (VAR-d36's shared_ada_lin; each block adds its own "
                         "ada_gss) instead of one linear per block: frees a third of a small model's weights")
    # optimisation
    ap.add_argument("--init", default=None,
                    help="start from this generator's weights (.safetensors, e.g. an --out of an earlier run) "
                         "instead of random ones: a new run with its own warm-up and cosine (fine-tuning); the "
                         "architecture options must match it. Ignored when the run folder resumes")
    common.add_schedule_args(ap, steps=4000, batch_size=32, lr=1e-3, warmup=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-drop", type=float, default=0.1, help="probability of the null class (for CFG)")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--class-weight", action="append", default=[], metavar="NAME=W",
                    help="draw the images of class NAME W times as often as the others (repeatable); batches are "
                         "then sampled with replacement, and the label drop is rescaled per class so that the null "
                         "class keeps the data's class mix")
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay of the exported weights (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    # bookkeeping
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-count", type=int, default=500, help="held-out images for the teacher-forced loss")
    ap.add_argument("--out", default=None, help="export the final (EMA) model here (safetensors)")
    ap.add_argument("--export-dtype", default="float16", choices=("float32", "float16"))
    common.add_run_args(ap, "generator")
    return ap


def file_digest(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


@torch.no_grad()
def encode_indices(tokenizer: MultiScaleVQVAE, images_uint8, batch_size: int = 100, device="cpu",
                   desc: str = "encode", progress: bool = True) -> torch.Tensor:
    """All images' per-scale indices concatenated: int16/int64 ``(N, L)`` (scale by scale, row-major)."""
    out = []
    bar = common.Progress(len(images_uint8), desc=desc, enabled=progress)
    for i in range(0, len(images_uint8), batch_size):
        x = data.to_tensor(images_uint8[i:i + batch_size]).to(device)
        idx = tokenizer.img_to_indices(x)
        out.append(torch.cat(idx, dim=1).cpu())
        bar.update(len(x))
    bar.close()
    dtype = torch.int16 if tokenizer.config.vocab_size <= 32767 else torch.int64
    return torch.cat(out).to(dtype)


def cached_indices(tokenizer, tokenizer_path, images_uint8, run_dir, tag, device, progress=True) -> torch.Tensor:
    """:func:`encode_indices`, cached as ``<run>/tokens_<tag>_<tokenizer digest>_<N>.pt``."""
    path = os.path.join(run_dir, f"tokens_{tag}_{file_digest(tokenizer_path)}_{len(images_uint8)}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    idx = encode_indices(tokenizer, images_uint8, device=device, desc=f"encode {tag}", progress=progress)
    common.save_checkpoint(path, {"indices": idx})
    return idx


def _load_indices(obj):
    return obj["indices"] if isinstance(obj, dict) else obj


def split_scales(idx_BL: torch.Tensor, patch_nums) -> list[torch.Tensor]:
    return [idx_BL[:, s].long() for s in scale_slices(patch_nums)]


def teacher_forced_loss(var: VAR, tokenizer: MultiScaleVQVAE, idx_BL: torch.Tensor, labels_B: torch.Tensor,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean cross-entropy over all L tokens, logits)`` for ground-truth indices ``(B, L)``."""
    pn = var.patch_nums
    with torch.no_grad():
        x_BLCv = tokenizer.quantize.teacher_forcing_input(split_scales(idx_BL, pn), pn)
    logits_BLV = var.forward_teacher(labels_B, x_BLCv)
    loss = F.cross_entropy(logits_BLV.float().reshape(-1, logits_BLV.shape[-1]), idx_BL.reshape(-1).long(),
                           label_smoothing=label_smoothing)
    return loss, logits_BLV


@torch.no_grad()
def evaluate_teacher(var: VAR, tokenizer, idx_NL: torch.Tensor, labels_N: torch.Tensor, batch_size: int = 100,
                     device="cpu") -> dict:
    """Held-out teacher-forced cross-entropy and top-1 token accuracy, overall and per scale."""
    was = var.training
    var.eval()
    K = len(var.patch_nums)
    slices = scale_slices(var.patch_nums)
    ce_sum = torch.zeros(K, dtype=torch.float64)
    acc_sum = torch.zeros(K, dtype=torch.float64)
    n = 0
    for i in range(0, len(idx_NL), batch_size):
        idx = idx_NL[i:i + batch_size].to(device).long()
        lab = labels_N[i:i + batch_size].to(device)
        _, logits = teacher_forced_loss(var, tokenizer, idx, lab)
        ce = F.cross_entropy(logits.transpose(1, 2), idx, reduction="none")  # (B, L)
        hit = (logits.argmax(-1) == idx).double()
        for si, s in enumerate(slices):
            ce_sum[si] += ce[:, s].double().mean(1).sum().cpu()
            acc_sum[si] += hit[:, s].mean(1).sum().cpu()
        n += len(idx)
    var.train(was)
    L = idx_NL.shape[1]
    weights = torch.tensor([s.stop - s.start for s in slices], dtype=torch.float64) / L
    return {
        "heldout_ce": float((ce_sum / n * weights).sum()),
        "heldout_token_acc": float((acc_sum / n * weights).sum()),
        "ce_per_scale": [round(float(v), 3) for v in ce_sum / n],
        "acc_per_scale": [round(float(v), 3) for v in acc_sum / n],
    }


def block_units(var: VAR) -> list[torch.nn.Module]:
    """What FSDP gathers one at a time: each block's attention and MLP (the AdaLN linears, called from
    ``VAR.condition`` outside the blocks, stay with the rest of the model)."""
    return [m for block in var.blocks for m in (block.attn, block.ffn)]


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    tokenizer = MultiScaleVQVAE.from_file(args.tokenizer).to(device)
    tcfg = tokenizer.config
    if tcfg.image_size != args.resolution:
        raise SystemExit(f"the tokenizer works on {tcfg.image_size} px images but --resolution is {args.resolution}")
    with d.main_first():
        train_ds, held_ds = data.load_datasets(args.data, args.resolution, args.seed, args.train_count,
                                               args.heldout_count, args.cache_dir)
    if args.use_count and args.use_count < len(train_ds):
        train_ds = data.ArrayDataset(train_ds.images[: args.use_count], train_ds.labels[: args.use_count],
                                     train_ds.class_names)
    lab_train = torch.from_numpy(train_ds.labels)
    # checked before the (slow) token encoding
    item_weights = common.class_item_weights(lab_train, train_ds.class_names, args.class_weight)
    cfg = VARConfig(depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                    num_classes=len(train_ds.class_names), vocab_size=tcfg.vocab_size, cvae=tcfg.z_channels,
                    patch_nums=tcfg.patch_nums, mlp_ratio=args.mlp_ratio, shared_aln=args.shared_aln,
                    class_names=tuple(train_ds.class_names))
    var = VAR(cfg).to(device).train().requires_grad_(True)
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    if ck is not None:
        if ck["config"] != cfg.to_dict():
            raise SystemExit(f"{ckpt_path} was trained with another architecture ({ck['config']}); "
                             f"use the same arguments or another --run-dir")
        var.load_state_dict(ck["model"])
    elif args.init:
        init_weights(var, args.init)
        log.log("init", path=os.path.abspath(args.init))
    train_step = d.wrap(var, lambda idx, lab: teacher_forced_loss(var, tokenizer, idx, lab, args.label_smoothing),
                        units=block_units(var))
    opt = common.adamw(var, args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    ema = common.EMA(var, args.ema) if args.ema > 0 else None
    gen = torch.Generator().manual_seed(args.seed + 11)
    step = 0
    if ck is not None:
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
            ema.shadow = d.shard_state(ema.shadow, var.state_dict())
        step = d.resume_step(opt, ck, ckpt_path, log)
        gen.set_state(ck["gen_state"])
    n_params = sum(p.numel() for p in var.parameters())
    log.log("start", device=str(device), params=n_params, config=cfg.to_dict(), args=vars(args),
            train=len(train_ds), heldout=len(held_ds), tokens=cfg.num_tokens, processes=d.describe())

    os.makedirs(args.run_dir, exist_ok=True)
    progress = not args.no_progress and d.is_main
    with d.main_first():
        idx_train = _load_indices(cached_indices(tokenizer, args.tokenizer, train_ds.images, args.run_dir, "train",
                                                 device, progress))
        held_imgs = held_ds.images[: args.eval_count]
        idx_held = _load_indices(cached_indices(tokenizer, args.tokenizer, held_imgs, args.run_dir, "heldout",
                                                device, progress))
    lab_held = torch.from_numpy(held_ds.labels[: args.eval_count])
    batches = common.StepBatches((idx_train, lab_train), args.batch_size, args.seed, weights=item_weights)
    drop_p = common.label_drop_per_class(args.label_drop, lab_train, item_weights, cfg.num_classes)

    def save():
        state = {"model": d.full_state(var.state_dict()), "optimizer": d.optimizer_state(opt), "step": step,
                 "config": cfg.to_dict(), "ema": {"decay": ema.decay, "shadow": d.full_state(ema.shadow)}
                 if ema else None, "gen_state": gen.get_state(), "tokenizer": os.path.abspath(args.tokenizer),
                 "args": json.dumps(vars(args)), "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    def held_out() -> dict | None:
        """The teacher-forced held-out figures of the whole model (EMA weights where kept) on rank 0 (None on the
        others; a collective)."""
        model = d.whole(var, lambda: VAR(cfg), ema.shadow if ema else None)
        return None if model is None else evaluate_teacher(model, tokenizer, idx_held, lab_held, device=device)

    bar = common.Progress(args.steps, start=step, desc="generator", enabled=progress)
    t0 = time.time()
    metrics = {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        idx, lab = batches.batch(step)
        drop = torch.rand(lab.shape, generator=gen) < drop_p[lab]
        lab = torch.where(drop, torch.full_like(lab, cfg.num_classes), lab)
        idx, lab = d.rows(idx, lab)
        with common.autocast(device, args.precision):
            loss, logits = train_step(idx, lab)
        gnorm = d.grad_norm(common.optimizer_step(opt, loss, var.parameters(), 2.0))
        if ema is not None:
            ema.update(var, step)
        step += 1
        logged = common.log_due(step, args)
        figures = {"loss": loss.item()}
        if logged:
            figures["token_acc"] = float((logits.detach().argmax(-1) == idx.long()).float().mean())
        figures = d.mean(figures)
        bar.update(loss=figures["loss"])
        if logged:
            log.log("train", step=step, loss=figures["loss"], token_acc=figures["token_acc"], grad_norm=gnorm,
                    lr=opt.param_groups[0]["lr"], sec=round(time.time() - t0, 1))
        metrics = common.after_step(step, args, held_out, save, log) or metrics
    bar.close()
    save()
    model = d.whole(var, lambda: VAR(cfg), ema.shadow if ema else None) if args.out else None
    if model is not None:
        export(model, args.out, args.export_dtype)
        log.log("export", out=args.out, bytes=os.path.getsize(args.out))
    return {"step": step, **metrics}


def init_weights(var: VAR, path: str) -> None:
    """Copy the weights of the generator file ``path`` into ``var`` (fp32), after checking they fit."""
    if not os.path.isfile(path):
        raise SystemExit(f"--init {path}: no such file (give a generator .safetensors, e.g. "
                         f"weights/nextscale_generator.safetensors)")
    src = VAR.from_file(path)
    # every field that shapes the weights (the class names and the norm epsilon do not)
    arch = [f.name for f in dataclasses.fields(VARConfig) if f.name not in ("class_names", "norm_eps")]
    have, want = src.config.to_dict(), var.config.to_dict()
    differ = [f"{k}: file {have.get(k)} vs run {want.get(k)}" for k in arch if have.get(k) != want.get(k)]
    if differ:
        raise SystemExit(f"--init {path} does not fit this run's architecture ({'; '.join(differ)}); pass the "
                         f"file's --depth/--embed-dim/--num-heads/--mlp-ratio/--shared-aln, the same tokenizer and "
                         f"as many classes")
    var.load_state_dict({k: v.float() for k, v in src.state_dict().items()})


def export(var: VAR, path: str, dtype: str = "float16") -> None:
    """Safetensors with the VAR config (class names included) under ``nextscale_config``; the rebuilt buffers
    (``lvl_1L``, the mask, ``zero_k_bias``) are left out, the loader rebuilds them."""
    skip = set(VAR.rebuilt_buffers(var.config))
    sd = {k: v for k, v in var.state_dict().items() if k not in skip}
    if dtype == "float16":
        sd = {k: (v.half() if v.dtype.is_floating_point else v) for k, v in sd.items()}
    common.export_safetensors(path, sd, var.config.to_dict())


def load_run_model(run_dir: str, use_ema: bool = True) -> VAR:
    """The (EMA) model of ``<run_dir>/last.pt``, for evaluation of a run in progress."""
    ck = common.load_checkpoint(os.path.join(run_dir, "last.pt"))
    cfg = VARConfig.from_dict(ck["config"])
    var = VAR(cfg)
    var.load_state_dict(ck["model"])
    if use_ema and ck.get("ema"):
        ema = common.EMA(var)
        ema.load_state_dict(ck["ema"])
        ema.copy_to(var)
    return var.eval().requires_grad_(False)


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
