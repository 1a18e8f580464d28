"""Train a multi-scale residual VQ-VAE (the tokenizer) on the synthetic set or an image folder.

Loss: ``L1 + MSE + edge * L1(image gradients)`` on the reconstruction, plus the quantiser's VQ loss
(``beta * commitment + codebook``, averaged over scales; straight-through estimator from
``MultiScaleQuantizer.forward``). Codes no scale has used for a while are restarted on residual
vectors of the current batch (tiny data leaves many codes dead otherwise). The code-usage statistic
is kept in the model's own ``quantize.ema_vocab_hit_SV`` buffer, as upstream.

Examples (from the repository root)::

    python3 -m training.train_tokenizer --run-dir runs/tokenizer --steps 3000
    python3 -m training.train_tokenizer --run-dir runs/tokenizer --steps 6000      # resumes, trains further
    python3 -m training.train_tokenizer --data path/to/folders --resolution 64 --run-dir runs/my_tok

Resuming is automatic (``--resume auto`` reads ``<run-dir>/last.pt``). The final weights go to ``--out``
(safetensors with the config under the metadata key ``nextscale_config``).
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

from training import common, data, distributed

common.import_pack()
from nextscale.models.var.tokenizer import MultiScaleVQVAE, TokenizerConfig  # noqa: E402


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(" ", "").split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train NextScale's multi-scale VQ-VAE tokenizer")
    ap.add_argument("--data", default="synthetic", help="'synthetic' or a folder of class subfolders")
    ap.add_argument("--resolution", type=int, default=data.DEFAULT_RESOLUTION)
    ap.add_argument("--train-count", type=int, default=20000, help="synthetic images to train on")
    ap.add_argument("--heldout-count", type=int, default=2000)
    ap.add_argument("--cache-dir", default=os.path.join(common.repo_root(), "data"))
    # architecture
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--z-channels", type=int, default=16)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--ch-mult", type=_ints, default=(1, 1, 2, 4))
    ap.add_argument("--num-res-blocks", type=int, default=1)
    ap.add_argument("--share-quant-resi", type=int, default=4)
    ap.add_argument("--quant-resi", type=float, default=0.5)
    ap.add_argument("--patch-nums", type=_ints, default=(1, 2, 3, 4, 6, 8))
    ap.add_argument("--attn", action="store_true", help="self-attention at the lowest level and mid (VAR's layout)")
    # optimisation
    common.add_schedule_args(ap, steps=3000, batch_size=32, lr=4e-4, warmup=100)
    ap.add_argument("--beta", type=float, default=0.25, help="commitment weight")
    ap.add_argument("--vq-weight", type=float, default=1.0)
    ap.add_argument("--edge-weight", type=float, default=0.5, help="L1 on image gradients (sharper edges)")
    ap.add_argument("--restart-every", type=int, default=50, help="dead-code restart period (0: off)")
    ap.add_argument("--restart-until", type=float, default=0.7, help="stop restarting after this share of steps")
    ap.add_argument("--dead-threshold", type=float, default=0.03, help="usage EMA below which a code is dead")
    ap.add_argument("--decoder-only", action="store_true",
                    help="train only post_quant_conv + decoder on the frozen codes of --init (keeps the tokens, and so "
                         "a generator trained on them, valid)")
    ap.add_argument("--init", default=None, help="start from this tokenizer file (.safetensors) instead of scratch")
    ap.add_argument("--seed", type=int, default=0)
    # bookkeeping
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-count", type=int, default=500, help="held-out images for the periodic PSNR")
    ap.add_argument("--out", default=None, help="export the final model here (safetensors)")
    ap.add_argument("--export-dtype", default="float32", choices=("float32", "float16"))
    common.add_run_args(ap, "tokenizer")
    return ap


def config_from_args(args) -> TokenizerConfig:
    return TokenizerConfig(
        vocab_size=args.vocab_size, z_channels=args.z_channels, ch=args.ch, ch_mult=tuple(args.ch_mult),
        num_res_blocks=args.num_res_blocks, share_quant_resi=args.share_quant_resi, quant_resi=args.quant_resi,
        patch_nums=tuple(args.patch_nums), using_sa=args.attn, using_mid_sa=args.attn,
    )


def init_weights(model: torch.nn.Module, vocab_size: int) -> None:
    """Kaiming-like init of the convs (the model code leaves init to torch's defaults) and a small codebook."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            m.weight.data.mul_(0.7)
            if m.bias is not None:
                m.bias.data.zero_()
    emb = model.quantize.embedding.weight
    emb.data.uniform_(-1.0 / vocab_size, 1.0 / vocab_size)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, edge_weight: float) -> tuple[torch.Tensor, dict]:
    l1 = (y - x).abs().mean()
    l2 = F.mse_loss(y, x)
    loss = l1 + l2
    out = {"l1": l1.item(), "mse": l2.item()}
    if edge_weight > 0:
        (ygx, ygy), (xgx, xgy) = image_gradients(y), image_gradients(x)
        le = (ygx - xgx).abs().mean() + (ygy - xgy).abs().mean()
        loss = loss + edge_weight * le
        out["edge"] = le.item()
    return loss, out


def forward_train(model: MultiScaleVQVAE, x: torch.Tensor, beta: float):
    """``(reconstruction (unclamped), vq_loss, indices, f)`` with the straight-through estimator."""
    f = model.encode_latent(x)
    with torch.autocast(x.device.type, enabled=False):  # code lookup in fp32 under --precision bf16 as well
        f = f.float()
        f_hat, vq_loss, idx_list = model.quantize(f, model.patch_nums, beta=beta)
    y = model.decoder(model.post_quant_conv(f_hat))
    return y, vq_loss, idx_list, f


@torch.no_grad()
def update_usage(model: MultiScaleVQVAE, idx_list, decay: float = 0.97) -> None:
    """EMA of per-scale code hits (fraction of the scale's tokens) into ``quantize.ema_vocab_hit_SV``."""
    ema = model.quantize.ema_vocab_hit_SV
    V = ema.shape[1]
    for si, idx in enumerate(idx_list):
        hits = torch.bincount(idx.flatten(), minlength=V).float()
        ema[si].mul_(decay).add_(hits * (V / idx.numel()), alpha=1 - decay)  # 1.0 = uniform usage


@torch.no_grad()
def restart_dead_codes(model: MultiScaleVQVAE, f: torch.Tensor, idx_list, threshold: float,
                       gen: torch.Generator) -> int:
    """Move codes whose usage (summed over scales) is below ``threshold`` onto residual vectors of this batch."""
    q = model.quantize
    usage = q.ema_vocab_hit_SV.sum(0)
    dead = torch.nonzero(usage < threshold).flatten()
    if len(dead) == 0:
        return 0
    pn = model.patch_nums
    K = len(pn)
    cands = []
    f = f.detach().float()
    for si in range(K):
        # residual that scale si has to quantise: f minus what the first si scales rebuild, at pn_si
        f_hat = q.indices_to_fhat(idx_list[:si], pn) if si > 0 else torch.zeros_like(f)
        r = f - f_hat
        r = r if si == K - 1 else F.interpolate(r, size=(pn[si], pn[si]), mode="area")
        cands.append(r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]))
    cands = torch.cat(cands)
    pick = torch.randint(0, len(cands), (len(dead),), generator=gen)
    noise = torch.randn(len(dead), cands.shape[1], generator=gen) * 0.01
    q.embedding.weight.data[dead.to(q.embedding.weight.device)] = (cands[pick].cpu() + noise).to(q.embedding.weight)
    q.ema_vocab_hit_SV[:, dead] = threshold * 2 / K  # grace period before they may be judged again
    return len(dead)


def psnr(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (computed on the [0, 1] scale)."""
    mse = ((y.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_tokenizer(model: MultiScaleVQVAE, images_uint8, batch_size: int = 100, device="cpu") -> dict:
    """Held-out round trip image -> indices -> image: PSNR (mean of per-image, and of the mean MSE), code usage."""
    was_training = model.training
    model.eval()
    ps, mses, used = [], [], set()
    per_scale_used = [set() for _ in model.patch_nums]
    for i in range(0, len(images_uint8), batch_size):
        x = data.to_tensor(images_uint8[i:i + batch_size]).to(device)
        idx = model.img_to_indices(x)
        y = model.indices_to_img(idx)
        ps.append(psnr(y, x).cpu())
        mses.append(((y - x) / 2).pow(2).flatten(1).mean(1).cpu())
        for si, t in enumerate(idx):
            u = set(t.unique().tolist())
            per_scale_used[si] |= u
            used |= u
    model.train(was_training)
    ps, mses = torch.cat(ps), torch.cat(mses)
    return {
        "psnr": float(ps.mean()),
        "psnr_of_mean_mse": float(10 * math.log10(1.0 / float(mses.mean()))),
        "psnr_min": float(ps.min()),
        "codes_used": len(used),
        "codes_used_per_scale": [len(s) for s in per_scale_used],
    }


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    with d.main_first():
        train_ds, held_ds = data.load_datasets(args.data, args.resolution, args.seed, args.train_count,
                                               args.heldout_count, args.cache_dir)
    if args.init:
        init_model = MultiScaleVQVAE.from_file(args.init)
        cfg = init_model.config
    else:
        init_model, cfg = None, config_from_args(args)
    if args.decoder_only and init_model is None:
        raise SystemExit("--decoder-only needs --init <tokenizer.safetensors> (the frozen encoder and codebook)")
    if cfg.image_size != args.resolution:
        raise SystemExit(f"schedule {cfg.patch_nums} with downsampling {cfg.downsample} gives {cfg.image_size} px "
                         f"images, but --resolution is {args.resolution}")
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    cfg = common.checkpoint_config(ck, "config", cfg, log)
    model = MultiScaleVQVAE(cfg)
    if ck is not None:
        model.load_state_dict(ck["model"])
    elif init_model is not None:
        model.load_state_dict(init_model.state_dict())
    else:
        init_weights(model, cfg.vocab_size)
    model.to(device).train().requires_grad_(True)
    if args.decoder_only:
        for part in (model.encoder, model.quant_conv, model.quantize):
            part.requires_grad_(False)

    def forward(x: torch.Tensor):
        """``(reconstruction, vq_loss, indices, f)``; ``f`` is None with ``--decoder-only`` (no codebook to train)."""
        if args.decoder_only:
            with torch.no_grad():
                idx_list, f_hat = model.quantize.f_to_indices_and_fhat(model.encode_latent(x), model.patch_nums)
            with common.autocast(device, args.precision):
                y = model.decoder(model.post_quant_conv(f_hat))
            return y, torch.zeros(()), idx_list, None
        with common.autocast(device, args.precision):
            return forward_train(model, x, args.beta)

    train_step = d.wrap(model, forward, units=(model.encoder, model.decoder))
    opt = common.adamw(model, args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed + 7)
    step, best = 0, None
    if ck is not None:
        step, best = d.resume_step(opt, ck, ckpt_path, log), ck.get("best")
        gen.set_state(ck["gen_state"])
    n_params = sum(p.numel() for p in model.parameters())
    log.log("start", device=str(device), params=n_params, config=cfg.to_dict(), args=vars(args),
            train=len(train_ds), heldout=len(held_ds), processes=d.describe())

    images = torch.from_numpy(train_ds.images)
    batches = common.StepBatches((images,), args.batch_size, args.seed)
    held_eval = held_ds.images[: args.eval_count]

    def build() -> MultiScaleVQVAE:
        return MultiScaleVQVAE(cfg)

    def save():
        state = {"model": d.full_state(model.state_dict()), "optimizer": d.optimizer_state(opt), "step": step,
                 "config": cfg.to_dict(), "best": best, "gen_state": gen.get_state(), "args": json.dumps(vars(args)),
                 "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    def held_out() -> dict | None:
        """The held-out figures of the whole tokenizer on rank 0 (None on the others; a collective)."""
        nonlocal best
        whole = d.whole(model, build)
        if whole is None:
            return None
        metrics = evaluate_tokenizer(whole, held_eval, device=device)
        best = max(best or 0.0, metrics["psnr"])
        return metrics

    bar = common.Progress(args.steps, start=step, desc="tokenizer", enabled=not args.no_progress and d.is_main)
    t0, restarts = time.time(), 0
    metrics = {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        (xb,) = batches.batch(step)
        (x,) = d.rows(data.to_tensor(xb.numpy()))
        y, vq_loss, idx_list, f = train_step(x)
        y, vq_loss = y.float(), vq_loss.float()
        rec, parts = reconstruction_loss(y, x, args.edge_weight)
        loss = rec + args.vq_weight * vq_loss
        common.optimizer_step(opt, loss, model.parameters(), 2.0)
        step += 1
        if not args.decoder_only:  # code usage and restarts see the whole global batch on every rank
            idx_list = [d.gather_rows(idx) for idx in idx_list]
            update_usage(model, idx_list)
            if args.restart_every and step % args.restart_every == 0 and step < args.restart_until * args.steps:
                f = d.gather_rows(f.detach())
                with d.gathered(model, build) as whole:
                    restarts += restart_dead_codes(whole, f, idx_list, args.dead_threshold, gen)
        figures = d.mean({"loss": loss.item(), "vq": vq_loss.item(), "psnr": float(psnr(y.detach(), x).mean()),
                          **parts})
        bar.update(loss=figures["loss"], psnr=figures["psnr"])
        if common.log_due(step, args):
            log.log("train", step=step, loss=figures["loss"], vq=figures["vq"], batch_psnr=figures["psnr"],
                    restarts=restarts, lr=opt.param_groups[0]["lr"], sec=round(time.time() - t0, 1),
                    **{k: figures[k] for k in parts})
            restarts = 0
        metrics = common.after_step(step, args, held_out, save, log) or metrics
    bar.close()
    save()
    whole = d.whole(model, build) if args.out else None
    if whole is not None:
        export(whole, args.out, args.export_dtype)
        log.log("export", out=args.out, bytes=os.path.getsize(args.out))
    return {"step": step, **metrics}


def export(model: MultiScaleVQVAE, path: str, dtype: str = "float32") -> None:
    """Safetensors with the config under ``nextscale_config`` (what ``MultiScaleVQVAE.from_file`` reads)."""
    sd = model.state_dict()
    if dtype == "float16":
        sd = {k: (v.half() if v.dtype.is_floating_point else v) for k, v in sd.items()}
    common.export_safetensors(path, sd, model.config.to_dict())


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
