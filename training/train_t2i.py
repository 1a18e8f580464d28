"""Train the embedded text-to-image model: a small T5 encoder (training/t2i_text.py) and an Infinity transformer
(``models/infinity/model.py``) together, on the bits of a trained BSQ tokenizer (training/train_bsq.py).

- Tokens: every image of the rendered set (training/t2i_data.py) is encoded once with the frozen tokenizer on the
  schedule :data:`training.train_bsq.SCHEDULE`; the bits are cached, packed, in ``<run-dir>/tokens_<tag>.npz``.
- A step: each caption is augmented (:func:`augment_caption`), tokenised as ComfyUI's T5 tokenizer does, and encoded
  by the T5 encoder; a row's text is replaced by the generator's ``cfg_uncond`` (its padded length kept) with
  probability ``--text-drop``, which trains the unconditional branch of classifier-free guidance as upstream. The
  transformer then predicts every scale's bits at once under teacher forcing (``Infinity.forward_teacher``: scale
  ``k`` sees the summed codes of scales ``< k`` resampled to its grid, as the sampler gives them); the loss is the
  mean cross-entropy over bits.
- Held-out: the teacher-forced loss and bit accuracy on held-out images, and a grid of images sampled from held-out
  captions (``<run-dir>/samples_<step>.png``), every ``--eval-every`` steps.
- Exports (EMA weights, fp16): ``--out`` the generator, ``--text-encoder-out`` the T5 encoder.

Example (from the repository root)::

    python -m training.train_t2i --data-dir runs/t2i/data --tokenizer runs/t2i/tokenizer.safetensors \\
        --run-dir runs/t2i/generator --out runs/t2i/generator.safetensors \\
        --text-encoder-out runs/t2i/text_encoder.safetensors

Resuming is automatic (``<run-dir>/last.pt``); batches and caption augmentations are pure functions of
``(seed, step)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import common, data, distributed, t2i_data, t2i_text
from training.train_bsq import SCHEDULE

common.import_pack()
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity, InfinityConfig  # noqa: E402
from nextscale.models.infinity.sampler import InfinityOptions, TextCondition, sample_infinity  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train the embedded text-to-image model (T5 encoder + Infinity)")
    t2i_data.add_data_args(ap)
    ap.add_argument("--tokenizer", required=True, help="the BSQ tokenizer (training/train_bsq.py's export)")
    ap.add_argument("--t5-tokenizer", default=None, help="ComfyUI's t5_tokenizer/tokenizer.json (default: found)")
    # text encoder
    ap.add_argument("--t5-width", type=int, default=128)
    ap.add_argument("--t5-layers", type=int, default=2)
    ap.add_argument("--t5-heads", type=int, default=4)
    ap.add_argument("--t5-ff", type=int, default=256)
    ap.add_argument("--text-maxlen", type=int, default=128, help="longest prompt without a negative prompt (tokens)")
    # generator
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--num-heads", type=int, default=3)
    ap.add_argument("--mlp-ratio", type=float, default=3.0)
    # optimisation
    common.add_schedule_args(ap, steps=8000, batch_size=8, lr=6e-4, warmup=500)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--text-drop", type=float, default=0.1, help="share of rows trained unconditionally")
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-count", type=int, default=256, help="held-out images for the periodic loss")
    ap.add_argument("--out", default=None, help="export the generator here (safetensors, fp16, EMA weights)")
    ap.add_argument("--text-encoder-out", default=None, help="export the T5 encoder here (safetensors, fp16, EMA)")
    common.add_run_args(ap, "t2i_generator")
    common.allow_auto_precision(ap)
    return ap


def configs_from_args(args, token_dim: int) -> tuple[t2i_text.T5Config, InfinityConfig]:
    t5 = t2i_text.T5Config(d_model=args.t5_width, num_layers=args.t5_layers, num_heads=args.t5_heads,
                           d_kv=args.t5_width // args.t5_heads, d_ff=args.t5_ff)
    gen = InfinityConfig(depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads,
                         hidden_dim=round(args.embed_dim * args.mlp_ratio), token_dim=token_dim,
                         text_dim=args.t5_width, text_maxlen=args.text_maxlen, block_chunks=1,
                         pool_heads=args.num_heads, num_levels=SCHEDULE.num_scales)
    return t5, gen


class TextToImage(nn.Module):
    """The two trained models under one module (``text.*``, ``generator.*``) for the optimiser and checkpoints."""

    def __init__(self, t5: t2i_text.T5Config, gen: InfinityConfig):
        super().__init__()
        self.text = t2i_text.T5Encoder(t5)
        self.generator = Infinity(gen)

    def features(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, drop_B: torch.Tensor | None = None):
        """T5 features of the prompts; rows in ``drop_B`` take the unconditional embedding instead (always in the
        graph, so that every parameter has a gradient at every step, as DDP requires)."""
        text_BTC = self.text(ids_BT, mask_BT)
        if drop_B is not None:
            T = text_BTC.shape[1]
            uncond_BTC = self.generator.cfg_uncond[:T][None].to(text_BTC.dtype) * mask_BT[..., None]
            text_BTC = torch.where(drop_B[:, None, None], uncond_BTC, text_BTC)
        return text_BTC


# ---------------------------------------------------------------------------------------------
# tokens


def scale_slices() -> list[slice]:
    out, start = [], 0
    for n in SCHEDULE.token_counts:
        out.append(slice(start, start + n))
        start += n
    return out


@torch.no_grad()
def encode_images(tokenizer: BSQTokenizer, images_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 ``(N, L, ceil(d / 8))``: every image's bits on :data:`SCHEDULE`, scale after scale, packed along d
    (encoded on the tokenizer's device)."""
    device = tokenizer.decoder.conv_out.conv.weight.device
    out = []
    for i in range(0, len(images_uint8), batch_size):
        bits = tokenizer.encode_bits(data.to_tensor(images_uint8[i:i + batch_size]).to(device), SCHEDULE.scales)
        flat = torch.cat([b.flatten(1, 2) for b in bits], 1)  # (B, L, d)
        out.append(np.packbits(flat.cpu().numpy(), axis=-1))
    return np.concatenate(out)


def cached_tokens(run_dir: str, tokenizer_path: str, tokenizer: BSQTokenizer, ds: t2i_data.T2IData,
                  log: common.RunLog) -> np.ndarray:
    """:func:`encode_images` of the whole set, cached in ``<run_dir>/tokens_<key>.npz``, the key a hash of the
    tokenizer file's bytes and of the data set's description: a changed tokenizer or data set encodes anew and
    replaces the cache of the old one."""
    with open(tokenizer_path, "rb") as f:
        digest = hashlib.sha1(f.read())
    digest.update(json.dumps(ds.meta, sort_keys=True).encode())
    name = f"tokens_{digest.hexdigest()[:10]}.npz"
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
        with np.load(path) as f:
            return f["bits"]
    t0 = time.time()
    packed = encode_images(tokenizer, ds.images)
    os.makedirs(run_dir, exist_ok=True)
    np.savez(path + ".tmp.npz", bits=packed)
    os.replace(path + ".tmp.npz", path)
    for stale in os.listdir(run_dir):
        if stale.startswith("tokens_") and stale.endswith(".npz") and stale != name:
            os.remove(os.path.join(run_dir, stale))
    log.log("tokens", path=path, images=len(packed), sec=round(time.time() - t0, 1))
    return packed


def unpack_bits(packed: np.ndarray, d: int) -> torch.Tensor:
    """bool ``(B, L, d)`` of packed rows."""
    return torch.from_numpy(np.unpackbits(packed, axis=-1, count=d).astype(bool))


def teacher_inputs(tokenizer: BSQTokenizer, bits_BLd: torch.Tensor) -> torch.Tensor:
    """fp32 ``(B, L - 1, d)``: the input of every scale after the first, as the sampler builds it (the summed codes
    of the earlier scales at the latent size, resampled to the scale's grid)."""
    B, _, d = bits_BLd.shape
    full = SCHEDULE.scales[-1]
    summed = torch.zeros(B, d, *full)
    inputs = []
    for si, (sl, (h, w)) in enumerate(zip(scale_slices(), SCHEDULE.scales, strict=True)):
        if si > 0:
            inputs.append(tokenizer.downsample_codes(summed, (h, w)).flatten(2).transpose(1, 2))
        codes = tokenizer.bits_to_codes(bits_BLd[:, sl].reshape(B, h, w, d))
        summed = summed + tokenizer.upsample_codes(codes, full)
    return torch.cat(inputs, 1)


def token_data(args, d: distributed.Distributed,
               log: common.RunLog) -> tuple[BSQTokenizer, t2i_data.T2IData, np.ndarray]:
    """``(tokenizer, data set, packed bits of every image)`` of a trainer on the frozen ``--tokenizer``'s bits (the
    set and the token cache made by rank 0 first)."""
    tokenizer = BSQTokenizer.from_file(args.tokenizer).to(d.device)
    with d.main_first():
        ds = t2i_data.load_from_args(args)
        packed = cached_tokens(args.run_dir, args.tokenizer, tokenizer, ds, log)
    return tokenizer, ds, packed


def step_batch(tokenizer: BSQTokenizer, prompt_tokenizer, packed_rows: np.ndarray, captions: list[str],
               drop: torch.Tensor, text_maxlen: int) -> tuple[torch.Tensor, ...]:
    """``(ids, mask, drop, x, bits)`` of a step: the T5 tokens of ``captions``, the teacher inputs and the int64 bit
    labels ``(B, L, d)`` of the images whose bits are ``packed_rows`` (rows of :func:`encode_images`)."""
    bits = unpack_bits(packed_rows, tokenizer.codebook_dim)
    ids, mask = prompt_tokenizer.batch(captions, text_maxlen)
    return ids, mask, drop, teacher_inputs(tokenizer, bits), bits.long()


def teacher_logits(model: TextToImage, ids_BT: torch.Tensor, mask_BT: torch.Tensor, drop_B: torch.Tensor | None,
                   x_BLCv: torch.Tensor) -> torch.Tensor:
    """fp32 ``(B, L, 2 d)``: the logits of every scale's bits under teacher forcing, the trainer's forward."""
    text_BTC = model.features(ids_BT, mask_BT, drop_B)
    ctx = model.generator.condition(text_BTC, mask_BT, guided=False)
    return model.generator.forward_teacher(ctx, x_BLCv, SCHEDULE).float()


def bit_loss(logits_BLV: torch.Tensor, bits_BLd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean cross-entropy over bits and the bit accuracy."""
    logits = logits_BLV.view(*bits_BLd.shape, 2)
    loss = F.cross_entropy(logits.reshape(-1, 2), bits_BLd.reshape(-1))
    return loss, (logits.argmax(-1) == bits_BLd).float().mean()


# ---------------------------------------------------------------------------------------------
# captions


def augment_caption(caption: str, rng: random.Random) -> str:
    """Half the time the caption as it is; otherwise its first part (the title, or the folder words when there is
    no title) and each later comma-separated part with probability 1/2, in order."""
    parts = caption.split(", ")
    if len(parts) == 1 or rng.random() < 0.5:
        return caption
    return ", ".join([parts[0], *(p for p in parts[1:] if rng.random() < 0.5)])


def step_captions(captions: list[str], seed: int, step: int, text_drop: float) -> tuple[list[str], torch.Tensor]:
    """The augmented captions of a step and which rows are trained unconditionally: a pure function of
    ``(seed, step)``."""
    rng = random.Random(seed * 1_000_003 + step)
    out = [augment_caption(c, rng) for c in captions]
    drop = torch.tensor([rng.random() < text_drop for _ in captions], dtype=torch.bool)
    return out, drop


# ---------------------------------------------------------------------------------------------
# sampling


@torch.no_grad()
def generate(model: TextToImage, tokenizer: BSQTokenizer, prompts: list[str], prompt_tokenizer, seed: int,
             cfg: float = 3.0, tau: float = 1.0, batch_size: int = 32) -> torch.Tensor:
    """Images ``(N, 3, 64, 64)`` in [-1, 1] on the CPU, one per prompt, computed where the models are; batch ``j``
    uses seed ``seed + j`` (image ``i`` seed ``seed + i``, the sampler's per-item rule)."""
    options = InfinityOptions(cfg=cfg, tau=tau, schedule=SCHEDULE)
    device = model.generator.pos_start.device
    out = []
    for j in range(0, len(prompts), batch_size):
        ids, mask = prompt_tokenizer.batch(prompts[j:j + batch_size], model.generator.config.text_maxlen)
        ids, mask = ids.to(device), mask.to(device)
        text = model.text(ids, mask)
        toks = sample_infinity(model.generator, tokenizer, TextCondition(text, mask), seed=seed + j, options=options)
        out.append(tokenizer.decode(toks.summed_codes).cpu())
    return torch.cat(out)


def export(model: TextToImage, generator_path: str | None, text_path: str | None) -> dict:
    sizes = {}
    if generator_path:
        sizes["generator"] = common.export_safetensors(generator_path, model.generator.state_dict(),
                                                       model.generator.config.to_dict(), dtype=torch.float16)
    if text_path:
        sizes["text_encoder"] = model.text.export(text_path)
    return sizes


# ---------------------------------------------------------------------------------------------
# training


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    precision = common.resolve_precision(args.precision, device)
    tokenizer, ds, packed = token_data(args, d, log)
    prompt_tokenizer = t2i_text.PromptTokenizer(args.t5_tokenizer)
    train_idx, held_idx = ds.split_indices("train"), ds.split_indices("heldout")
    t5_cfg, gen_cfg = configs_from_args(args, tokenizer.codebook_dim)
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    t5_cfg = common.checkpoint_config(ck, "t5_config", t5_cfg, log)
    gen_cfg = common.checkpoint_config(ck, "generator_config", gen_cfg, log)
    model = TextToImage(t5_cfg, gen_cfg)
    ema = common.resume_weights(model, ck, device, args.ema)

    def forward(ids, mask, drop, x_BLCv):
        with common.autocast(device, precision):
            return teacher_logits(model, ids, mask, drop, x_BLCv)

    train_step = d.wrap(model, forward)
    opt = common.adamw(model, args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step = d.resume_step(opt, ck, ckpt_path, log) if ck is not None else 0
    n_text = sum(p.numel() for p in model.text.parameters())
    n_gen = sum(p.numel() for p in model.generator.parameters())
    log.log("start", device=str(device), precision=precision, text_params=n_text, generator_params=n_gen,
            t5_config=t5_cfg.to_dict(), generator_config=gen_cfg.to_dict(), args=vars(args), data=ds.meta,
            train=len(train_idx), heldout=len(held_idx), processes=d.describe())
    batches = common.StepBatches((torch.from_numpy(train_idx),), args.batch_size, args.seed)
    held_eval = common.spread(held_idx, args.eval_count)

    def batch_of(indices: np.ndarray, captions: list[str], drop: torch.Tensor):
        return step_batch(tokenizer, prompt_tokenizer, packed[indices], captions, drop, gen_cfg.text_maxlen)

    @torch.no_grad()
    def evaluate() -> dict | None:
        """Teacher-forced held-out loss and bit accuracy of the EMA weights, and a sample grid, on rank 0 (None on
        the others)."""
        if not d.is_main:
            return None
        with common.ema_weights(model, ema):
            losses, accs = [], []
            for i in range(0, len(held_eval), 64):
                idx = held_eval[i:i + 64]
                batch = batch_of(idx, ds.captions(idx), torch.zeros(len(idx), dtype=torch.bool))
                ids, mask, drop, x, bits = (t.to(device) for t in batch)
                loss, acc = bit_loss(forward(ids, mask, drop, x), bits)
                losses.append(float(loss) * len(idx))
                accs.append(float(acc) * len(idx))
            prompts = ds.captions(common.spread(held_idx, 8))
            grid = generate(model, tokenizer, prompts, prompt_tokenizer, seed=args.seed)
            data.save_grid(data.to_uint8(grid), os.path.join(args.run_dir, f"samples_{step:06d}.png"), cols=8)
        n = len(held_eval)
        return {"heldout_loss": sum(losses) / n, "heldout_bit_accuracy": sum(accs) / n, "prompts": prompts}

    def save():
        state = {"model": d.full_state(model.state_dict()), "optimizer": d.optimizer_state(opt), "step": step,
                 "ema": ema.state_dict(), "t5_config": t5_cfg.to_dict(), "generator_config": gen_cfg.to_dict(),
                 "args": json.dumps(vars(args)), "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    bar = common.Progress(args.steps, start=step, desc="t2i", enabled=not args.no_progress and d.is_main)
    t0, metrics = time.time(), {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        (idx,) = batches.batch(step)
        idx = idx.numpy()
        captions, drop = step_captions(ds.captions(idx), args.seed, step, args.text_drop)
        ids, mask, drop, x, bits = d.rows(*batch_of(idx, captions, drop))
        loss, acc = bit_loss(train_step(ids, mask, drop, x), bits)
        common.optimizer_step(opt, loss, model.parameters(), 2.0)
        ema.update(model, step)
        step += 1
        figures = d.mean({"loss": loss.item(), "bit_accuracy": acc.item()})
        bar.update(loss=figures["loss"], acc=figures["bit_accuracy"])
        if common.log_due(step, args):
            log.log("train", step=step, **figures, lr=opt.param_groups[0]["lr"], sec=round(time.time() - t0, 1))
        metrics = common.after_step(step, args, evaluate, save, log) or metrics
    bar.close()
    save()
    if d.is_main and (args.out or args.text_encoder_out):
        ema.copy_to(model)
        sizes = export(model, args.out, args.text_encoder_out)
        log.log("export", generator_path=args.out, text_encoder_path=args.text_encoder_out, bytes=sizes)
    return {"step": step, **{k: v for k, v in metrics.items() if k != "prompts"}}


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
