"""Train a LoRA of a VAR or Infinity transformer on a folder of images; NextScale Load LoRA applies it in ComfyUI.

Data (``--data FOLDER``): every image in the folder or below it, with a side-car text file of the same name
(``cat.png`` + ``cat.txt``) holding its class name (VAR: one of the base model's class names, or its index) or its
caption (Infinity); an image without one takes the name of its subfolder (``FOLDER/<class>/<image>``). Images are
centre-cropped and resized to the tokenizer's size (VAR) or the schedule's (Infinity). About one image in ten is held
out for the evaluation, chosen by a hash of its path (the same images whatever else the folder holds).

Training: the base model stays frozen; a LoRA (models/core/lora.py) adapts the weights of the layer groups
``--layers`` in the blocks ``--blocks`` with rank ``--rank`` and scale ``--alpha / --rank``. The loss is the base
model's own teacher-forced one: VAR, the cross-entropy of every token of the tokenizer's index pyramid, labels
replaced by the null class with probability ``--label-drop`` (so that guidance keeps working); Infinity, the
cross-entropy of every bit of the BSQ pyramid of ``--schedule``, captions encoded once by flan-T5 (``--text-encoder``,
a Hugging Face folder such as google/flan-t5-xl, read with ``transformers``) and replaced by the model's learned
unconditional embedding with probability ``--text-drop``. AdamW with warm-up and cosine decay, ``--precision bf16``
autocast; under ``torchrun`` DDP or FSDP (``--parallel fsdp`` shards the frozen base too; training/distributed.py).
The evaluation reports the held-out loss with the LoRA and, once, without it (``base_ce``).

Examples (from the repository root)::

    python -m training.train_lora --base weights/nextscale_generator.safetensors \\
        --tokenizer weights/nextscale_tokenizer.safetensors --data my_images --rank 8 --out my_style.safetensors
    torchrun --nproc-per-node 8 -m training.train_lora --base infinity_2b_reg.pth \\
        --tokenizer infinity_vae_d32reg.pth --text-encoder flan-t5-xl --data captioned --schedule 1M \\
        --parallel fsdp --precision bf16 --out style.safetensors

The output is safetensors in ComfyUI's LoRA layout with the config under the metadata key ``nextscale_config``.
Resuming is automatic (``--resume auto`` reads ``<run-dir>/last.pt``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

from training import common, data, distributed
from training.train_generator import block_units, encode_indices, file_digest, teacher_forced_loss

common.import_pack()
from nextscale.models.core import lora  # noqa: E402
from nextscale.models.core.checkpoint import read_weights  # noqa: E402
from nextscale.models.core.family import describe, identify  # noqa: E402
from nextscale.models.infinity.bsq import BSQTokenizer  # noqa: E402
from nextscale.models.infinity.model import Infinity  # noqa: E402
from nextscale.models.infinity.sampler import latent_scales, patch_factor, patchify  # noqa: E402
from nextscale.models.infinity.schedule import RESOLUTIONS, InfinitySchedule  # noqa: E402
from nextscale.models.var.classes import class_index, default_class_names  # noqa: E402
from nextscale.models.var.model import VAR  # noqa: E402
from nextscale.models.var.tokenizer import MultiScaleVQVAE  # noqa: E402

HELD_OUT_ONE_IN = 10  # an image is held out when the hash of its path is 0 modulo this
T5_MAX_TOKENS = 512  # Infinity's prompt limit, the end-of-sequence token included


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train a LoRA of a VAR or Infinity transformer")
    ap.add_argument("--base", required=True, help="the transformer to adapt: a VAR generator or an Infinity model "
                                                   "(.safetensors, .pth, or a folder of shards)")
    ap.add_argument("--tokenizer", required=True, help="its tokenizer (VAR: the multi-scale VQ-VAE; Infinity: BSQ)")
    ap.add_argument("--data", required=True, help="folder of images with side-car .txt files (class name or "
                                                  "caption) or in class subfolders")
    ap.add_argument("--text-encoder", default=None,
                    help="Infinity: flan-T5 as a Hugging Face folder (config.json, weights, tokenizer files)")
    ap.add_argument("--schedule", default="0.25M",
                    help="Infinity: a resolution of the templates (" + ", ".join(RESOLUTIONS) + ") or the sides of "
                         "square grids, e.g. '1,2,4,8'")
    ap.add_argument("--h-div-w", type=float, default=1.0, help="Infinity: aspect (height / width) of the template")
    # the adapter
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.0, help="scale numerator (0: the rank, a scale of 1)")
    ap.add_argument("--layers", default="attn,cross,ffn",
                    help=f"layer groups to adapt, from {', '.join(lora.GROUPS)} (groups a model lacks are skipped)")
    ap.add_argument("--blocks", default="", help="blocks to adapt, e.g. '0-3,6' (default: all)")
    # optimisation
    common.add_schedule_args(ap, steps=1000, batch_size=16, lr=5e-4, warmup=50, min_lr_ratio=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--label-drop", type=float, default=0.1, help="VAR: probability of the null class (guidance)")
    ap.add_argument("--text-drop", type=float, default=0.1, help="Infinity: probability of the unconditional text")
    ap.add_argument("--seed", type=int, default=0)
    # bookkeeping
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--out", default=None, help="write the LoRA here (safetensors)")
    common.add_run_args(ap, "lora")
    return ap


# ---------------------------------------------------------------------------------------------
# the two families


class VARTask:
    """Class-conditional VAR: targets are the tokenizer's index pyramids, conditions the class labels."""

    family = "var"

    def __init__(self, args, state_dict, device):
        self.model = VAR.from_state_dict(state_dict, args.base, VAR.config_from_file(args.base)).to(device)
        self.tokenizer = MultiScaleVQVAE.from_file(args.tokenizer).to(device).eval().requires_grad_(False)
        self.label_drop, self.device = args.label_drop, device
        self.names = tuple(self.model.class_names or default_class_names(self.model.num_classes))
        side = self.tokenizer.config.image_size
        self.size = (side, side)
        self.cache_tag = ""

    def tensors(self, images: np.ndarray, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """``(indices (N, L), labels (N,))``."""
        labels = torch.tensor([class_index(t, self.names) for t in texts])
        return encode_indices(self.tokenizer, images, device=self.device, progress=False), labels

    def conditions(self, batch: tuple[torch.Tensor, ...], gen: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """The step's inputs: labels replaced by the null class with probability ``--label-drop`` (none without
        ``gen``, for evaluation)."""
        idx, lab = batch
        if gen is None:
            return idx, lab
        drop = torch.rand(lab.shape, generator=gen) < self.label_drop
        return idx, torch.where(drop, torch.full_like(lab, self.model.num_classes), lab)

    def loss(self, idx: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean token cross-entropy, token accuracy)``."""
        loss, logits = teacher_forced_loss(self.model, self.tokenizer, idx, lab)
        return loss, (logits.detach().argmax(-1) == idx.long()).float().mean()

    def units(self):
        return block_units(self.model), ()


class InfinityTask:
    """Text-conditioned Infinity: targets are the BSQ bits of every scale, conditions the captions' T5 features."""

    family = "infinity"

    def __init__(self, args, state_dict, device):
        self.model = Infinity.from_state_dict(state_dict, args.base, Infinity.config_from_file(args.base)).to(device)
        self.tokenizer = BSQTokenizer.from_file(args.tokenizer).to(device).eval().requires_grad_(False)
        self.text_drop, self.device = args.text_drop, device
        if args.text_encoder is None:
            raise SystemExit("--text-encoder: Infinity trains on T5 features of the captions; give the folder of "
                             "google/flan-t5-xl (Hugging Face layout)")
        self.text_encoder = args.text_encoder
        self.schedule = parse_schedule(args.schedule, args.h_div_w)
        self.p = patch_factor(self.model, self.tokenizer)
        self.latent = latent_scales(self.model, self.tokenizer, self.schedule)
        h, w = self.latent[-1]
        self.size = (h * self.tokenizer.downsample, w * self.tokenizer.downsample)
        self.cache_tag = "_".join(f"{h}x{w}" for h, w in self.schedule.scales) + "_" + \
            hashlib.sha1(os.path.abspath(self.text_encoder).encode()).hexdigest()[:8]

    def tensors(self, images: np.ndarray, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """``(bits of each scale (N, h, w, d) ..., T5 features (N, T, C), token counts (N,))``."""
        bits = []
        with torch.no_grad():
            for i in range(0, len(images), 32):
                x = data.to_tensor(images[i:i + 32]).to(self.device)
                bits.append([b.cpu() for b in self.tokenizer.encode_bits(x, self.latent)])
        per_scale = [torch.cat([b[si] for b in bits]) for si in range(len(self.latent))]
        cfg = self.model.config
        feats, counts = encode_captions(texts, self.text_encoder, min(T5_MAX_TOKENS, cfg.text_maxlen), cfg.text_dim,
                                        self.device)
        return (*per_scale, feats, counts)

    def conditions(self, batch: tuple[torch.Tensor, ...], gen: torch.Generator | None) -> tuple[torch.Tensor, ...]:
        """The step's inputs: features cut to the batch's longest caption, and which rows take the unconditional
        text (probability ``--text-drop``; none without ``gen``, for evaluation)."""
        *bits, feats, counts = batch
        T = int(counts.max())
        if gen is None:
            drop = torch.zeros(counts.shape)
        else:
            drop = (torch.rand(counts.shape, generator=gen) < self.text_drop).float()
        return (*bits, feats[:, :T].float(), counts, drop)

    def loss(self, *batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean bit cross-entropy, bit accuracy)`` with the captions of ``drop`` rows replaced by
        ``cfg_uncond`` (the unconditional rows of :meth:`Infinity.condition`)."""
        *bits, text_BTC, counts_B, drop_B = batch
        m, tok = self.model, self.tokenizer
        B, T = text_BTC.shape[:2]
        mask_BT = torch.arange(T, device=text_BTC.device)[None] < counts_B[:, None]
        uncond_BTC = m.cfg_uncond[:T][None].to(text_BTC.dtype) * mask_BT[..., None]
        text_BTC = torch.where(drop_B[:, None, None] > 0, uncond_BTC, text_BTC)
        ctx = m.condition(text_BTC, mask_BT, guided=False)
        with torch.no_grad():
            summed = torch.zeros(B, tok.codebook_dim, *self.latent[-1], device=text_BTC.device)
            inputs, targets = [], []
            for si, bits_Bhwd in enumerate(bits):
                cells_BdHW = bits_Bhwd.permute(0, 3, 1, 2).float()
                targets.append(patchify(cells_BdHW, self.p).flatten(2).transpose(1, 2))
                if si < len(bits) - 1:
                    summed = summed + tok.upsample_codes(tok.bits_to_codes(bits_Bhwd), self.latent[-1])
                    nxt = patchify(tok.downsample_codes(summed, self.latent[si + 1]), self.p)
                    inputs.append(nxt.flatten(2).transpose(1, 2))
            target_BLd = torch.cat(targets, 1).long()
        logits = m.forward_teacher(ctx, torch.cat(inputs, 1), self.schedule)
        pairs = logits.float().reshape(B, -1, 2)
        loss = F.cross_entropy(pairs.reshape(-1, 2), target_BLd.reshape(-1))
        return loss, (pairs.detach().argmax(-1) == target_BLd.reshape(B, -1)).float().mean()

    def units(self):
        blocks = self.model.block_list()
        return [m for b in blocks for m in (b.sa, b.ca, b.ffn)], [(b.ca, "text_kv") for b in blocks]


def parse_schedule(text: str, h_div_w: float) -> InfinitySchedule:
    """A template resolution (``1M``) at ``h_div_w``, or the sides of square grids (``1,2,4,8``)."""
    if text in RESOLUTIONS:
        return InfinitySchedule.from_template(h_div_w, text)
    try:
        sides = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        sides = []
    if not sides:
        raise SystemExit(f"--schedule {text!r}: give one of {', '.join(RESOLUTIONS)} or square sides like '1,2,4,8'")
    return InfinitySchedule.custom([(s, s) for s in sides])


@torch.no_grad()
def encode_captions(texts: list[str], folder: str, max_tokens: int, width: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 T5 features ``(N, T, width)`` (zero beyond each caption) and token counts ``(N,)``: the encoder's last
    hidden state (after its final norm) of each caption's tokens with the end-of-sequence token, cut at
    ``max_tokens`` (what NextScale Text Encode (T5) gives the sampler)."""
    T5EncoderModel, T5TokenizerFast = _transformers_t5()
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    encoder = T5EncoderModel.from_pretrained(folder).float().eval().to(device)
    if encoder.config.d_model != width:
        raise SystemExit(f"--text-encoder {folder} gives {encoder.config.d_model}-wide features but the model reads "
                         f"{width}-wide ones (Infinity uses google/flan-t5-xl)")
    feats, counts = [], []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt").input_ids
        feats.append(encoder(input_ids=ids.to(device)).last_hidden_state[0].half().cpu())
        counts.append(ids.shape[1])
    out = torch.zeros(len(texts), max(counts), width, dtype=torch.float16)
    for i, f in enumerate(feats):
        out[i, : len(f)] = f
    return out, torch.tensor(counts)


def _transformers_t5():
    """``transformers``' T5 encoder and tokenizer classes, imported with the repository root off ``sys.path``: run
    from the root, the pack's ``kernels/`` folder would shadow the ``kernels`` distribution transformers imports."""
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != common.repo_root()]
    try:
        from transformers import T5EncoderModel, T5TokenizerFast
    finally:
        sys.path[:] = saved
    return T5EncoderModel, T5TokenizerFast


def make_task(args, device) -> VARTask | InfinityTask:
    state_dict = read_weights(args.base, "base model")
    kind = str(identify(state_dict))
    if kind == "var-generator":
        return VARTask(args, state_dict, device)
    if kind == "infinity-generator":
        return InfinityTask(args, state_dict, device)
    raise SystemExit(
        f"--base {args.base} is {describe(identify(state_dict))}: give a VAR generator or an Infinity transformer"
    )


def cached(path: str, compute) -> tuple[torch.Tensor, ...]:
    """``compute()``'s tensors, saved at ``path`` the first time and read from there afterwards."""
    if os.path.isfile(path):
        return tuple(common.load_checkpoint(path)["tensors"])
    tensors = compute()
    common.save_checkpoint(path, {"tensors": list(tensors)})
    return tensors


def data_digest(images: np.ndarray, texts: list[str]) -> str:
    h = hashlib.sha1(np.ascontiguousarray(images).tobytes())
    h.update("\n".join(texts).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# training


def train(args) -> dict:
    return distributed.run(args, _train)


def _train(args, d: distributed.Distributed) -> dict:
    device = d.device
    log = d.start(args)
    task = make_task(args, device)
    model = task.model
    images, texts, paths = data.captioned_folder(args.data, task.size)
    held = np.array([int(hashlib.sha1(p.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0 for p in paths], bool)
    digest = data_digest(images, texts)
    # the targets, encoded once by rank 0 into the run folder
    tag = f"{digest}_{file_digest(args.tokenizer)}{task.cache_tag}"
    with d.main_first():
        os.makedirs(args.run_dir, exist_ok=True)
        train_t = cached(os.path.join(args.run_dir, f"data_{tag}_train.pt"),
                         lambda: task.tensors(images[~held], [t for t, h in zip(texts, held) if not h]))
        held_t = cached(os.path.join(args.run_dir, f"data_{tag}_heldout.pt"),
                        lambda: task.tensors(images[held], [t for t, h in zip(texts, held) if h])) \
            if held.any() else None

    keys = lora.target_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, args.layers.split(","),
                            lora.parse_blocks(args.blocks))
    alpha = args.alpha or float(args.rank)
    config = {"family": task.family, "base": model.config.to_dict(), "base_file": os.path.basename(args.base),
              "rank": args.rank, "alpha": alpha, "groups": args.layers.split(","),
              "blocks": list(lora.parse_blocks(args.blocks)), "weights": len(keys)}
    gen = torch.Generator().manual_seed(args.seed + 23)
    lora.add_lora(model, keys, args.rank, alpha, torch.Generator().manual_seed(args.seed))
    ckpt_path, ck = d.load_resume(args.run_dir, args.resume)
    if ck is not None:
        if ck["config"] != config:
            raise SystemExit(f"{ckpt_path} trains another LoRA ({ck['config']}); use the same arguments or another "
                             f"--run-dir")
        if ck["data"] != digest:
            raise SystemExit(f"{ckpt_path} was trained on other images than {args.data}; use another --run-dir")
        unexpected = model.load_state_dict(ck["lora"], strict=False).unexpected_keys
        if unexpected:
            raise SystemExit(f"{ckpt_path} holds keys this LoRA lacks: {unexpected[:3]}")
    units, unit_methods = task.units()
    train_step = d.wrap(model, task.loss, units=units, unit_methods=unit_methods)
    opt = common.adamw(model, args.lr, weight_decay=args.weight_decay)
    step = 0
    if ck is not None:
        step = d.resume_step(opt, ck, ckpt_path, log)
        gen.set_state(ck["gen_state"])
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.log("start", device=str(device), family=task.family, lora_params=trained, weights=len(keys), args=vars(args),
            train=int((~held).sum()), heldout=int(held.sum()), processes=d.describe())
    batches = common.StepBatches(train_t, args.batch_size, args.seed)
    deltas = [m for m in model.modules() if isinstance(m, lora.LoRADelta)]

    def lora_state() -> dict[str, torch.Tensor]:
        return d.full_state({k: v for k, v in model.state_dict().items() if lora.is_lora_parameter(k)})

    def save():
        state = {"lora": lora_state(), "optimizer": d.optimizer_state(opt), "step": step, "config": config,
                 "data": digest, "gen_state": gen.get_state(), "args": json.dumps(vars(args)),
                 "world_size": d.world_size}
        if d.is_main:
            common.save_checkpoint(os.path.join(args.run_dir, "last.pt"), state)

    @torch.no_grad()
    def heldout_loss() -> dict[str, float]:
        """Held-out loss and accuracy, in global batches shared out like the training ones (a collective)."""
        n = len(held_t[0]) // d.world_size * d.world_size
        total = {"ce": 0.0, "acc": 0.0}
        for start in range(0, n, args.batch_size):
            rows = min(args.batch_size, n - start)
            batch = task.conditions(tuple(t[start:start + rows] for t in held_t), None)
            with common.autocast(device, args.precision):
                loss, acc = train_step(*d.rows(*batch))
            got = d.mean({"ce": loss.item(), "acc": acc.item()})
            total = {k: total[k] + got[k] * rows / n for k in total}
        return total

    base_ce: list[float] = []  # the base model's held-out loss (LoRA at strength 0), measured once

    def evaluate() -> dict:
        if held_t is None or len(held_t[0]) < d.world_size:
            return {}
        out = heldout_loss()
        if not base_ce:
            for delta in deltas:
                delta.strength = 0.0
            base_ce.append(heldout_loss()["ce"])
            for delta in deltas:
                delta.strength = 1.0
        return {"heldout_ce": out["ce"], "heldout_acc": out["acc"], "base_ce": base_ce[0]}

    bar = common.Progress(args.steps, start=step, desc="lora", enabled=not args.no_progress and d.is_main)
    t0, metrics = time.time(), {}
    while step < args.steps:
        if common.stop_due(step, args):
            save()
            return {"step": step, "stopped": True}
        common.schedule_lr(opt, step, args)
        batch = task.conditions(batches.batch(step), gen)
        with common.autocast(device, args.precision):
            loss, acc = train_step(*d.rows(*batch))
        gnorm = d.grad_norm(common.optimizer_step(opt, loss, [p for p in model.parameters() if p.requires_grad], 1.0))
        step += 1
        figures = d.mean({"loss": loss.item(), "acc": acc.item()})
        bar.update(loss=figures["loss"])
        if common.log_due(step, args):
            log.log("train", step=step, loss=figures["loss"], acc=figures["acc"], grad_norm=gnorm,
                    lr=opt.param_groups[0]["lr"], sec=round(time.time() - t0, 1))
        metrics = common.after_step(step, args, evaluate, save, log) or metrics
    bar.close()
    save()
    weights = lora.lora_weights(lora_state(), alpha) if args.out else None
    if weights is not None and d.is_main:
        trained_on = {"steps": step, "images": int((~held).sum())}
        if task.family == "var":
            trained_on["classes"] = sorted(set(texts))
        lora.save_lora(args.out, weights, {**config, "trained_on": trained_on})
        log.log("export", out=args.out, bytes=os.path.getsize(args.out))
    return {"step": step, **metrics}


def main(argv=None):
    distributed.cli(build_parser, train, argv)


if __name__ == "__main__":
    main()
