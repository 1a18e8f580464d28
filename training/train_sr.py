"""Train the embedded super-resolution model: a small NSARM (``models/nsarm/``: an Infinity transformer and the
transformation network) on the text-to-image set's images and their degraded inputs (training/sr_data.py), on the
frozen BSQ tokenizer of the embedded text-to-image model (training/train_bsq.py).

The model upscales 2x: a 32 px input (an 8 x 8 latent of the 4 px tokenizer) to a 64 px image, on the tokenizer's
schedule :data:`training.train_bsq.SCHEDULE` (sides 1, 2, 4, 6, 8, 12, 16). The network maps the first five scales
(sides 1..8, every side the 8 x 8 input grid holds), the transformer predicts 12 and 16, as the released NSARM maps
7 of its 13 scales. Prompts: none. The model is trained and run on the empty-prompt path (upstream's cfg 1): the
text is the first row of its learned ``cfg_uncond``, which :meth:`NSARM.empty_prompt` gives at sampling time.

A step, both parts trained together on the same batch:

- Tokens: every high-quality image's bits on the schedule, encoded once by the frozen tokenizer and cached
  (training/train_t2i.py's ``cached_tokens``).
- Network: the degraded inputs are encoded to latents; each mapped scale's output, read as the sampler reads it
  (``--map-reading``, :meth:`ScaleMapper.code_map`: ``tokens``, the default, makes token ``t`` cell ``t``;
  ``reshape`` is upstream's memory-order reading, which a small network learns slowly), bit ``j`` set where channel
  ``j`` is positive, is trained to those bits with a logistic loss on the channel values (``--map-weight``).
- Transformer: the cross-entropy over every scale's bits under teacher forcing, with the summed codes brought down
  to each grid by ``area`` as NSARM's sampler does (:class:`~nextscale.models.nsarm.sampler.AreaNextInput`).

Held-out (every ``--eval-every`` steps): the teacher-forced loss and bit accuracy, the network's bit accuracy, and
the PSNR of upscales (``--eval-count`` held-out images, tau 0.5) against bicubic. Export (EMA weights, fp16): one
safetensors in NSARM.pth's key layout with the architecture in its metadata, which NextScale Load NSARM reads
strictly.

Example (from the repository root)::

    python -m training.train_sr --data-dir runs/t2i/data --tokenizer runs/t2i/tokenizer.safetensors \\
        --run-dir runs/sr/model --out runs/sr/nextscale_sr.safetensors

Resuming is automatic (``<run-dir>/last.pt``); batches and degradations are pure functions of ``(seed, step)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from training import common, data, distributed, sr_data, t2i_data
from training.train_bsq import SCHEDULE
from training.train_t2i import scale_slices, teacher_inputs, token_data, unpack_bits
from training.train_tokenizer import psnr

common.import_pack()
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import InfinityConfig  # noqa: E402
from nextscale.models.nsarm.mapper import READINGS, MapperConfig, ScaleMapper  # noqa: E402
from nextscale.models.nsarm.model import NSARM, NSARMConfig  # noqa: E402
from nextscale.models.nsarm.sampler import AreaNextInput, UpscaleCondition, UpscaleOptions, sample_nsarm  # noqa: E402

RESOLUTION = "0.06M"  # the schedule's template name (:data:`SCHEDULE`)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train the embedded super-resolution model (a small NSARM)")
    t2i_data.add_data_args(ap)
    ap.add_argument("--tokenizer", required=True, help="the BSQ tokenizer (training/train_bsq.py's export)")
    # transformer
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--mlp-ratio", type=float, default=3.0)
    ap.add_argument("--text-dim", type=int, default=64, help="width of the (empty) prompt row")
    # transformation network
    ap.add_argument("--map-width", type=int, default=96, help="width of every branch")
    ap.add_argument("--map-layers", type=int, default=2, help="encoder layers of every branch")
    ap.add_argument("--map-heads", type=int, default=4)
    ap.add_argument("--map-stem", type=int, default=64, help="hidden widths of the feature extractor")
    ap.add_argument("--map-reading", choices=READINGS, default="tokens",
                    help="how a branch's tokens become a code map: 'tokens' (token t is cell t; a small network "
                    "learns it quickly) or 'reshape' (upstream's memory-order reading, the released NSARM's)")
    ap.add_argument("--map-weight", type=float, default=1.0, help="weight of the network's loss")
    # optimisation
    common.add_schedule_args(ap, steps=8000, batch_size=16, lr=6e-4, warmup=300)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-count", type=int, default=128, help="held-out images of the periodic evaluation")
    ap.add_argument("--out", default=None, help="export the model here (safetensors, fp16, EMA weights)")
    common.add_run_args(ap, "sr_model")
    common.allow_auto_precision(ap)
    return ap


def config_from_args(args, tokenizer: BSQTokenizer) -> NSARMConfig:
    """The transformer on the tokenizer's bits and a network mapping every scale the input's latent grid holds."""
    grid = SCHEDULE.scales[-1][0] // sr_data.SCALE
    sides = tuple(h for h, _ in SCHEDULE.scales if h <= grid)
    d = tokenizer.codebook_dim
    infinity = InfinityConfig(depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                              hidden_dim=round(args.embed_dim * args.mlp_ratio), token_dim=d, text_dim=args.text_dim,
                              text_maxlen=1, block_chunks=1, pool_heads=args.num_heads, num_levels=SCHEDULE.num_scales)
    n = len(sides)
    mapper = MapperConfig(channels=d, grid=grid, sides=sides, widths=(args.map_width,) * n,
                          layers=(args.map_layers,) * n, heads=(args.map_heads,) * n,
                          stem=(args.map_stem, args.map_stem), resolution=RESOLUTION, reading=args.map_reading)
    return NSARMConfig(infinity, mapper)


def mapper_loss(mapper: ScaleMapper, codes: list[torch.Tensor], bits_BLd: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logistic loss, bit accuracy)`` of the network's outputs, read as the sampler reads them
    (:meth:`ScaleMapper.code_map`), against the bits of the scales they map."""
    losses, hits, total = [], 0.0, 0
    for out_BLd, sl in zip(codes, scale_slices(), strict=False):
        logits = mapper.code_map(out_BLd)
        B, d, side, _ = logits.shape
        target = bits_BLd[:, sl].reshape(B, side, side, d).permute(0, 3, 1, 2).float()
        losses.append(F.binary_cross_entropy_with_logits(logits, target, reduction="sum"))
        hits += float(((logits > 0) == target.bool()).sum())
        total += target.numel()
    return torch.stack(losses).sum() / total, torch.tensor(hits / total)


@torch.no_grad()
def upscale(model: NSARM, tokenizer: BSQTokenizer, lr_B3hw: torch.Tensor, seed: int, tau: float = 0.5,
            batch_size: int = 64) -> torch.Tensor:
    """Upscales ``(N, 3, 64, 64)`` in -1..1 on the CPU of inputs ``(N, 3, 32, 32)``, with the empty prompt, cfg 1
    and ``tau``; batch ``j`` uses seed ``seed + j`` (image ``i`` seed ``seed + i``)."""
    device = model.pos_start.device
    out = []
    for j in range(0, len(lr_B3hw), batch_size):
        tokens = sample_nsarm(model, tokenizer, UpscaleCondition(lr_B3hw[j:j + batch_size].to(device)),
                              seed=seed + j, options=UpscaleOptions(tau=tau))
        out.append(tokenizer.decode(tokens.summed_codes).clamp(-1, 1).cpu())
    return torch.cat(out)


def export(model: NSARM, path: str) -> int:
    """The model as one fp16 safetensors in NSARM.pth's key layout, its architecture in the metadata."""
    return common.export_safetensors(path, model.state_dict(), model.setup.to_dict(), dtype=torch.float16)


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    precision = common.resolve_precision(args.precision, device)
    tokenizer, ds, packed = token_data(args, d, log)
    train_idx, held_idx = ds.split_indices("train"), ds.split_indices("heldout")
    cfg = config_from_args(args, tokenizer)
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    cfg = common.checkpoint_config(ck, "config", cfg, log)
    model = NSARM(cfg)
    ema = common.resume_weights(model, ck, device, args.ema)
    d_bits = tokenizer.codebook_dim
    area = AreaNextInput(tokenizer)

    def forward(lr_B3hw, x_BLCv):
        with common.autocast(device, precision):
            with torch.no_grad():
                latent = tokenizer.encode_latent(lr_B3hw)
            codes = model.map_transformer(latent)
            text, mask = model.empty_prompt(lr_B3hw.shape[0], device)
            ctx = model.condition(text, mask, guided=False)
            logits = model.forward_teacher(ctx, x_BLCv, SCHEDULE)
        return [c.float() for c in codes], logits.float()

    train_step = d.wrap(model, forward)
    opt = common.adamw(model, args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step = d.resume_step(opt, ck, ckpt_path, log) if ck is not None else 0
    log.log("start", device=str(device), precision=precision, params=sum(p.numel() for p in model.parameters()),
            network_params=sum(p.numel() for p in model.map_transformer.parameters()), config=cfg.to_dict(),
            args=vars(args), data=ds.meta, train=len(train_idx), heldout=len(held_idx), processes=d.describe())
    batches = common.StepBatches((torch.from_numpy(train_idx),), args.batch_size, args.seed)
    held_eval = common.spread(held_idx, args.eval_count)

    def batch_of(indices: np.ndarray, variant: int):
        bits = unpack_bits(packed[indices], d_bits)
        lr = data.to_tensor(sr_data.degrade_batch(ds.images, indices, args.seed, variant))
        return lr, teacher_inputs(area, bits), bits

    def losses_of(codes, logits_BLV, bits_BLd):
        logits = logits_BLV.view(*bits_BLd.shape, 2)
        target = bits_BLd.long()
        ar = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1))
        mapped, map_acc = mapper_loss(model.map_transformer, codes, bits_BLd)
        return ar, mapped, (logits.argmax(-1) == target).float().mean(), map_acc

    @torch.no_grad()
    def evaluate() -> dict | None:
        """Held-out teacher-forced figures and upscale PSNR of the EMA weights, on rank 0 (None on the others)."""
        if not d.is_main:
            return None
        with common.ema_weights(model, ema):
            sums = np.zeros(4)
            for i in range(0, len(held_eval), 64):
                idx = held_eval[i:i + 64]
                lr, x, bits = (t.to(device) for t in batch_of(idx, sr_data.HELDOUT_VARIANT))
                figures = losses_of(*forward(lr, x), bits)
                sums += np.array([float(f) for f in figures]) * len(idx)
            lr = data.to_tensor(sr_data.degrade_batch(ds.images, held_eval, args.seed, sr_data.HELDOUT_VARIANT))
            hr = data.to_tensor(ds.images[held_eval])
            up = upscale(model, tokenizer, lr, seed=args.seed)
        loss, map_loss, acc, map_acc = sums / len(held_eval)
        return {"heldout_loss": loss, "heldout_map_loss": map_loss, "heldout_bit_accuracy": acc,
                "heldout_map_bit_accuracy": map_acc, "psnr": float(psnr(up, hr).mean()),
                "bicubic_psnr": float(psnr(sr_data.bicubic(lr), hr).mean())}

    def save():
        state = {"model": d.full_state(model.state_dict()), "optimizer": d.optimizer_state(opt), "step": step,
                 "ema": ema.state_dict(), "config": cfg.to_dict(), "args": json.dumps(vars(args)),
                 "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    bar = common.Progress(args.steps, start=step, desc="sr", enabled=not args.no_progress and d.is_main)
    t0, metrics = time.time(), {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        (idx,) = batches.batch(step)
        lr, x, bits = d.rows(*batch_of(idx.numpy(), step))
        ar, mapped, acc, map_acc = losses_of(*train_step(lr, x), bits)
        loss = ar + args.map_weight * mapped
        common.optimizer_step(opt, loss, model.parameters(), 2.0)
        ema.update(model, step)
        step += 1
        figures = d.mean({"loss": loss.item(), "ar_loss": ar.item(), "map_loss": mapped.item(),
                          "bit_accuracy": acc.item(), "map_bit_accuracy": float(map_acc)})
        bar.update(loss=figures["loss"], map_acc=figures["map_bit_accuracy"])
        if common.log_due(step, args):
            log.log("train", step=step, **figures, lr=opt.param_groups[0]["lr"], sec=round(time.time() - t0, 1))
        metrics = common.after_step(step, args, evaluate, save, log) or metrics
    bar.close()
    save()
    if d.is_main and args.out:
        ema.copy_to(model)
        log.log("export", out=args.out, bytes=export(model, args.out))
    return {"step": step, **metrics}


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
