"""Train an Infinity BSQ tokenizer (``models/infinity/bsq.py``) on the text-to-image set (training/t2i_data.py).

The trained module is :class:`BSQTokenizer` itself, so the file it exports is what the loaders read. Training
quantises as its inference path (:meth:`BSQTokenizer.quantize_latent`: at each scale of the schedule the residual
goes down by area, its L2-normalised d-vectors take the sign code ``+-1/sqrt(d)``, the code map goes back up
trilinearly and is taken from the residual) with a straight-through estimator per scale: the decoder sees
``x + (code - x).detach()``, and the residual subtracts the code without gradient, as upstream's
``MultiScaleBSQ``. Loss: ``L1 + MSE + edge * L1(image gradients)`` on the reconstruction plus ``commit *`` the
mean squared distance of the normalised vectors to their codes.

Examples (from the repository root)::

    python -m training.train_bsq --data-dir runs/t2i/data --run-dir runs/t2i/tokenizer --steps 6000
    python -m training.train_bsq ... --steps 8000       # resumes from runs/t2i/tokenizer/last.pt, trains further

Batches are a pure function of ``(seed, step)``; ``--precision auto`` (the default) is bf16 autocast where
:func:`training.common.fast_bf16` says the device computes it fast, fp32 elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from training import common, data, distributed, t2i_data
from training.train_tokenizer import psnr, reconstruction_loss

common.import_pack()
from nextscale.models.infinity.bsq import BSQConfig, BSQTokenizer  # noqa: E402
from nextscale.models.infinity.schedule import InfinitySchedule  # noqa: E402

# The generator's schedule: template 1:1 at '0.06M', seven scales up to 16 x 16 tokens. With a tokenizer of 4 px
# cells that is a 64 px image, one latent cell per token.
SCHEDULE = InfinitySchedule.from_template(1.0, "0.06M")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train an Infinity BSQ tokenizer on the text-to-image set")
    t2i_data.add_data_args(ap)
    ap.add_argument("--codebook-dim", type=int, default=16, help="bits per latent cell")
    ap.add_argument("--base-ch", type=int, default=32)
    ap.add_argument("--ch-mult", type=_ints, default=(1, 1, 2), help="one level per entry; 2**(n-1) px cells")
    ap.add_argument("--num-res-blocks", type=int, default=1)
    common.add_schedule_args(ap, steps=6000, batch_size=8, lr=5e-4, warmup=200)
    ap.add_argument("--commit", type=float, default=0.25, help="weight of the commitment term")
    ap.add_argument("--edge-weight", type=float, default=0.5, help="L1 on image gradients (sharper edges)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-count", type=int, default=400, help="held-out images for the periodic PSNR")
    ap.add_argument("--out", default=None, help="export the final model here (safetensors)")
    common.add_run_args(ap, "t2i_tokenizer")
    common.allow_auto_precision(ap)
    return ap


def config_from_args(args) -> BSQConfig:
    return BSQConfig(codebook_dim=args.codebook_dim, base_ch=args.base_ch, ch_mult=tuple(args.ch_mult),
                     num_res_blocks=args.num_res_blocks)


def quantize_train(tok: BSQTokenizer, h_BdHW: torch.Tensor, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed codes with straight-through gradients, commitment term)`` of an fp32 latent."""
    H, W = h_BdHW.shape[-2:]
    s = 1.0 / math.sqrt(tok.codebook_dim)
    residual, summed, commit = h_BdHW, torch.zeros_like(h_BdHW), h_BdHW.new_zeros(())
    for hw in scales:
        x = residual if tuple(hw) == (H, W) else F.interpolate(residual.unsqueeze(2), size=(1, *hw),
                                                               mode="area").squeeze(2)
        x = F.normalize(x, dim=1)
        code = torch.where(x > 0, s, -s).to(x.dtype)
        commit = commit + (x - code).pow(2).sum(1).mean()
        up = tok.upsample_codes(x + (code - x).detach(), (H, W))
        residual = residual - up.detach()
        summed = summed + up
    return summed, commit / len(scales)


@torch.no_grad()
def evaluate_bsq(tok: BSQTokenizer, images_uint8, scales, batch_size: int = 100, device="cpu") -> dict:
    """Held-out round trip through the inference path (image -> bits -> summed codes -> image) on ``device`` (where
    ``tok`` is): PSNR (mean of per-image, of the mean MSE, worst image)."""
    was_training = tok.training
    tok.eval()
    ps, mses = [], []
    for i in range(0, len(images_uint8), batch_size):
        x = data.to_tensor(images_uint8[i:i + batch_size]).to(device)
        y = tok.decode(tok.bits_to_summed_codes(tok.encode_bits(x, scales)))
        ps.append(psnr(y, x).cpu())
        mses.append(((y - x) / 2).pow(2).flatten(1).mean(1).cpu())
    tok.train(was_training)
    ps, mses = torch.cat(ps), torch.cat(mses)
    return {"psnr": float(ps.mean()), "psnr_of_mean_mse": float(10 * math.log10(1.0 / float(mses.mean()))),
            "psnr_min": float(ps.min())}


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    precision = common.resolve_precision(args.precision, device)
    with d.main_first():
        ds = t2i_data.load_from_args(args)
    train_idx, held_idx = ds.split_indices("train"), ds.split_indices("heldout")
    cfg = config_from_args(args)
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    cfg = common.checkpoint_config(ck, "config", cfg, log)
    scales = list(SCHEDULE.scales)
    if SCHEDULE.scales[-1][0] * cfg.downsample != t2i_data.RESOLUTION:
        raise SystemExit(f"--ch-mult {cfg.ch_mult} gives {cfg.downsample} px cells: the schedule's last "
                         f"{SCHEDULE.scales[-1]} grid needs {t2i_data.RESOLUTION // SCHEDULE.scales[-1][0]} px cells")
    tok = BSQTokenizer(cfg)
    if ck is not None:
        tok.load_state_dict(ck["model"])
    tok.to(device).train().requires_grad_(True)

    def forward(x: torch.Tensor):
        with common.autocast(device, precision):
            h = tok.encoder(x)
        summed, commit = quantize_train(tok, h.float(), scales)
        with common.autocast(device, precision):
            y = tok.decoder(summed)
        return y.float(), commit

    train_step = d.wrap(tok, forward, units=(tok.encoder, tok.decoder))
    opt = common.adamw(tok, args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    step, best = 0, None
    if ck is not None:
        step, best = d.resume_step(opt, ck, ckpt_path, log), ck.get("best")
    log.log("start", device=str(device), precision=precision, params=sum(p.numel() for p in tok.parameters()),
            config=cfg.to_dict(), scales=scales, args=vars(args), data=ds.meta, train=len(train_idx),
            heldout=len(held_idx), processes=d.describe())

    batches = common.StepBatches((torch.from_numpy(ds.images[train_idx]),), args.batch_size, args.seed)
    held_eval = ds.images[common.spread(held_idx, args.eval_count)]

    def build() -> BSQTokenizer:
        return BSQTokenizer(cfg)

    def save():
        state = {"model": d.full_state(tok.state_dict()), "optimizer": d.optimizer_state(opt), "step": step,
                 "config": cfg.to_dict(), "best": best, "args": json.dumps(vars(args)), "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    def held_out() -> dict | None:
        """The held-out figures of the whole tokenizer on rank 0 (None on the others; a collective)."""
        nonlocal best
        whole = d.whole(tok, build)
        if whole is None:
            return None
        metrics = evaluate_bsq(whole, held_eval, scales, device=device)
        best = max(best or 0.0, metrics["psnr"])
        return metrics

    bar = common.Progress(args.steps, start=step, desc="bsq", enabled=not args.no_progress and d.is_main)
    t0, metrics = time.time(), {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        (xb,) = batches.batch(step)
        (x,) = d.rows(data.to_tensor(xb.numpy()))
        y, commit = train_step(x)
        rec, parts = reconstruction_loss(y, x, args.edge_weight)
        loss = rec + args.commit * commit
        common.optimizer_step(opt, loss, tok.parameters(), 2.0)
        step += 1
        figures = d.mean({"loss": loss.item(), "commit": commit.item(), "psnr": float(psnr(y.detach(), x).mean()),
                          **parts})
        bar.update(loss=figures["loss"], psnr=figures["psnr"])
        if common.log_due(step, args):
            log.log("train", step=step, loss=figures["loss"], commit=figures["commit"], batch_psnr=figures["psnr"],
                    lr=opt.param_groups[0]["lr"], sec=round(time.time() - t0, 1),
                    **{k: figures[k] for k in parts})
        metrics = common.after_step(step, args, held_out, save, log) or metrics
    bar.close()
    save()
    whole = d.whole(tok, build) if args.out else None
    if whole is not None:
        whole.save(args.out)
        log.log("export", out=args.out, bytes=os.path.getsize(args.out))
    return {"step": step, **metrics}


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
