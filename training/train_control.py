"""Train a NextScale control adapter (``models/control/adapters.py``) on a frozen generator.

Pairs are made from the data itself: each image's control map comes from the pack's torch preprocessors
(``edges``: Canny-like edges, ``silhouette``: soft foreground mask). Teacher forcing: the images are encoded once
into per-scale indices (cached in the run folder, as ``train_generator`` does); each step runs the frozen generator
with the adapter injected (``models.control.teacher_logits``) and minimises the cross-entropy of all tokens. Only
the adapter trains. Labels are replaced by the null class with probability ``--label-drop`` (the null rows also
get the control at sampling time), and the control is dropped (strength 0) with probability ``--control-drop`` so
that the adapter learns what the control adds over the class. AdamW with warm-up and cosine decay.

Examples (from the repository root)::

    python3 -m training.train_control --generator weights/nextscale_generator.safetensors \\
        --tokenizer weights/nextscale_tokenizer.safetensors --run-dir runs/control_edges --steps 2000 \\
        --out weights/nextscale_control_edges.safetensors

Resuming is automatic (``--resume auto`` reads ``<run-dir>/last.pt``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from training import common, data, distributed
from training.train_generator import _load_indices, cached_indices, split_scales

common.import_pack()
from nextscale.models.control.adapters import AdapterConfig, ControlAdapter, teacher_logits  # noqa: E402
from nextscale.models.control.maps import canny_edges, soft_silhouette  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

CONTROL_TYPES = ("edges", "silhouette")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train a NextScale control adapter on a frozen generator")
    ap.add_argument("--generator", required=True, help="frozen generator (.safetensors or .pth)")
    ap.add_argument("--tokenizer", required=True, help="its tokenizer (.safetensors or .pth)")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a folder of class subfolders")
    ap.add_argument("--resolution", type=int, default=data.DEFAULT_RESOLUTION)
    ap.add_argument("--train-count", type=int, default=20000)
    ap.add_argument("--heldout-count", type=int, default=2000)
    ap.add_argument("--use-count", type=int, default=0, help="train on the first N images only (0: all)")
    ap.add_argument("--cache-dir", default=os.path.join(common.repo_root(), "data"))
    ap.add_argument("--control", default="edges", choices=CONTROL_TYPES)
    ap.add_argument("--edge-low", type=float, default=0.1)
    ap.add_argument("--edge-high", type=float, default=0.2)
    # adapter
    ap.add_argument("--kind", default="add", choices=("add", "reference"))
    ap.add_argument("--layers", default="", help="injection blocks, e.g. '0,2,4' (default: 0, depth/3, 2 depth/3)")
    ap.add_argument("--channels", default="32,64,128", help="control encoder channels (stride 2 per step)")
    ap.add_argument("--feat-dim", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=0, help="control image side for the encoder (0: resolution)")
    # optimisation
    common.add_schedule_args(ap, steps=2000, batch_size=32, lr=1e-3, warmup=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--label-drop", type=float, default=0.1)
    ap.add_argument("--control-drop", type=float, default=0.0, help="probability of training a row without control")
    ap.add_argument("--seed", type=int, default=0)
    # bookkeeping
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-count", type=int, default=256, help="held-out images for the teacher-forced loss")
    ap.add_argument("--out", default=None, help="export the adapter here (safetensors)")
    common.add_run_args(ap, "control")
    return ap


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.replace(" ", "").split(",") if t)


@torch.no_grad()
def control_maps(images_uint8, kind: str, low: float, high: float, batch_size: int = 256) -> torch.Tensor:
    """Control images ``(N, 3, H, W)`` in -1..1 (white map on black), computed by the pack's preprocessors."""
    out = []
    for i in range(0, len(images_uint8), batch_size):
        img = data.to_tensor(images_uint8[i : i + batch_size]).add(1).mul(0.5)
        m = canny_edges(img, low, high) if kind == "edges" else soft_silhouette(img)
        out.append(m.expand(-1, 3, -1, -1).mul(2).sub(1).to(torch.float16))
    return torch.cat(out)


def control_loss(var, adapter, tokenizer, idx_BL, labels_B, ctrl_B3HW, strength_B=None):
    """``(mean cross-entropy over all tokens, logits)`` with the adapter injected; ``strength_B`` per row (0 = off)."""
    pn = var.patch_nums
    with torch.no_grad():
        x_BLCv = tokenizer.quantize.teacher_forcing_input(split_scales(idx_BL, pn), pn)
    strength = 1.0 if strength_B is None else strength_B.view(-1, 1, 1).to(x_BLCv.dtype)
    logits = teacher_logits(var, adapter, labels_B, x_BLCv, ctrl_B3HW.float(), strength)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx_BL.reshape(-1).long())
    return loss, logits


@torch.no_grad()
def evaluate(var, adapter, tokenizer, idx_NL, lab_N, ctrl_N, device, batch_size: int = 64) -> dict:
    """Held-out cross-entropy with the control and without it (strength 0): the gap is what the control explains."""
    was = adapter.training
    adapter.eval()
    sums, n = {"ce_control": 0.0, "ce_none": 0.0}, 0
    for i in range(0, len(idx_NL), batch_size):
        idx, lab = idx_NL[i : i + batch_size].to(device).long(), lab_N[i : i + batch_size].to(device)
        ctrl = ctrl_N[i : i + batch_size].to(device)
        sums["ce_control"] += control_loss(var, adapter, tokenizer, idx, lab, ctrl)[0].item() * len(idx)
        zero = torch.zeros(len(idx), device=device)
        sums["ce_none"] += control_loss(var, adapter, tokenizer, idx, lab, ctrl, zero)[0].item() * len(idx)
        n += len(idx)
    adapter.train(was)
    return {k: v / max(n, 1) for k, v in sums.items()}


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    tokenizer = MultiScaleVQVAE.from_file(args.tokenizer).to(device).eval().requires_grad_(False)
    var = VAR.from_file(args.generator).to(device).eval().requires_grad_(False)
    if tokenizer.config.image_size != args.resolution:
        raise SystemExit(f"the tokenizer works on {tokenizer.config.image_size} px images "
                         f"but --resolution is {args.resolution}")
    cfg = AdapterConfig.for_generator(
        var.config, layers=_ints(args.layers) or None, kind=args.kind, channels=_ints(args.channels),
        feat_dim=args.feat_dim, image_size=args.image_size or args.resolution, control_type=args.control,
    )
    adapter = ControlAdapter(cfg).to(device).train()
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    if ck is not None:
        if ck["config"] != cfg.to_dict():
            raise SystemExit(f"{ckpt_path} was trained with another adapter ({ck['config']}); "
                             "use the same arguments or another --run-dir")
        adapter.load_state_dict(ck["model"])
    train_step = d.wrap(adapter, lambda idx, lab, ctrl, keep: control_loss(var, adapter, tokenizer, idx, lab, ctrl,
                                                                           keep))
    opt = common.adamw(adapter, args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 17)
    step = 0
    if ck is not None:
        step = d.resume_step(opt, ck, ckpt_path, log)
        gen.set_state(ck["gen_state"])

    with d.main_first():
        train_ds, held_ds = data.load_datasets(args.data, args.resolution, args.seed, args.train_count,
                                               args.heldout_count, args.cache_dir)
    if args.use_count and args.use_count < len(train_ds):
        train_ds = data.ArrayDataset(train_ds.images[: args.use_count], train_ds.labels[: args.use_count],
                                     train_ds.class_names)
    if len(train_ds.class_names) != var.num_classes:
        raise SystemExit(f"the data has {len(train_ds.class_names)} classes but the generator {var.num_classes}")
    progress = not args.no_progress and d.is_main
    os.makedirs(args.run_dir, exist_ok=True)
    held_imgs = held_ds.images[: args.eval_count]
    with d.main_first():
        idx_train = _load_indices(cached_indices(tokenizer, args.tokenizer, train_ds.images, args.run_dir, "train",
                                                 device, progress))
        idx_held = _load_indices(cached_indices(tokenizer, args.tokenizer, held_imgs, args.run_dir, "heldout",
                                                device, progress))
    ctrl_train = control_maps(train_ds.images, args.control, args.edge_low, args.edge_high)
    ctrl_held = control_maps(held_imgs, args.control, args.edge_low, args.edge_high)
    lab_train, lab_held = torch.from_numpy(train_ds.labels), torch.from_numpy(held_ds.labels[: args.eval_count])
    batches = common.StepBatches((idx_train, lab_train, ctrl_train), args.batch_size, args.seed)
    n_params = sum(p.numel() for p in adapter.parameters())
    log.log("start", device=str(device), params=n_params, config=cfg.to_dict(), args=vars(args), train=len(train_ds),
            processes=d.describe())

    def build() -> ControlAdapter:
        return ControlAdapter(cfg)

    def save():
        state = {"model": d.full_state(adapter.state_dict()), "optimizer": d.optimizer_state(opt), "step": step,
                 "config": cfg.to_dict(), "gen_state": gen.get_state(), "generator": os.path.abspath(args.generator),
                 "args": json.dumps(vars(args)), "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    def held_out() -> dict | None:
        """The held-out figures of the whole adapter on rank 0 (None on the others; a collective)."""
        whole = d.whole(adapter, build)
        return None if whole is None else evaluate(var, whole, tokenizer, idx_held, lab_held, ctrl_held, device)

    bar = common.Progress(args.steps, start=step, desc="control", enabled=progress)
    t0, metrics = time.time(), {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        idx, lab, ctrl = batches.batch(step)
        drop = torch.rand(lab.shape, generator=gen) < args.label_drop
        lab = torch.where(drop, torch.full_like(lab, var.num_classes), lab)
        keep = (torch.rand(lab.shape, generator=gen) >= args.control_drop).float()
        idx, lab, ctrl, keep = d.rows(idx, lab, ctrl, keep)
        with common.autocast(device, args.precision):
            loss, logits = train_step(idx, lab, ctrl, keep)
        gnorm = d.grad_norm(common.optimizer_step(opt, loss, adapter.parameters(), 2.0))
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
    whole = d.whole(adapter, build) if args.out else None
    if whole is not None:
        whole.eval().save(args.out)
        log.log("export", out=args.out, bytes=os.path.getsize(args.out))
    return {"step": step, **metrics}


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
