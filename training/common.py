"""Utilities shared by every trainer: device, batches, LR schedule, EMA, checkpoints, logging, progress.

Checkpoints (``<run>/last.pt``) hold plain state dicts, numbers and strings only, so they load with
``torch.load(weights_only=True)``. Batches are a pure function of ``(seed, step)`` (one permutation
per epoch), so a resumed run sees exactly the batches an uninterrupted run would have seen.
Exported weights are safetensors whose metadata key ``nextscale_config`` holds the model's JSON config.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

CONFIG_KEY = "nextscale_config"


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_pack():
    """Register the repository as the package ``nextscale`` (see scripts/packbootstrap.py) and return it."""
    scripts = os.path.join(repo_root(), "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from packbootstrap import register_pack

    return register_pack()


def add_run_args(ap, run_name: str) -> None:
    """The bookkeeping options every trainer shares: run folder and resuming, checkpoint and log periods, device,
    threads, progress bar, the test-only early stop, precision and the strategy under ``torchrun``."""
    ap.add_argument("--run-dir", default=os.path.join(repo_root(), "runs", run_name))
    ap.add_argument("--resume", default="auto", help="'auto' (<run-dir>/last.pt), a checkpoint path, or 'none'")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=50, help="log the training figures every this many steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stop-after", type=int, default=0, help="stop (as if interrupted) after this step; for tests")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="forward/backward under autocast in this dtype (weights and optimiser stay fp32); bf16 is "
                         "2x faster on CPUs with AMX/AVX512-BF16 and on recent GPUs")
    from training import distributed

    distributed.add_args(ap)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else MPS, else CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed-precision context for a training step: ``fp32`` is a no-op; ``bf16``/``fp16`` run matmuls and
    convolutions under ``torch.autocast`` on ``device`` while parameters, gradients and the optimiser stay fp32
    (losses are computed on ``.float()`` outputs). fp16 is meant for CUDA, where it also needs loss scaling:
    prefer bf16 there too."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {PRECISIONS}")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def fast_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ``device`` computes bf16 matmuls and convolutions faster than fp32: a CUDA GPU that supports bf16, or
    a CPU with AMX or AVX512-BF16 (the ``flags`` of ``cpuinfo``; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def allow_auto_precision(ap) -> None:
    """Give a trainer's ``--precision`` (from :func:`add_run_args`) the choice ``auto``, as its default; the trainer
    resolves it with :func:`resolve_precision`."""
    for action in ap._actions:  # argparse has no public way to extend an argument's choices
        if action.dest == "precision":
            action.choices = ("auto", *PRECISIONS)
            action.default = "auto"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``--precision auto``: ``bf16`` where :func:`fast_bf16`, else ``fp32``; any other value unchanged."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def set_threads(n: int) -> None:
    if n and n > 0:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# batches


class StepBatches:
    """Deterministic batches over an in-memory dataset: batch ``step`` is a pure function of (seed, step).

    ``tensors`` are indexed together along dim 0 (e.g. images and labels). Epoch ``e`` visits the items in
    ``randperm(N, seed + e)`` order; a batch may straddle two epochs. With ``weights`` (one non-negative number per
    item) each batch is instead drawn with replacement in proportion to them, from a generator seeded by
    (seed, step): e.g. a class seen more often than its share of the data (:func:`class_item_weights`).
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int = 0,
                 weights: torch.Tensor | None = None):
        self.tensors = tensors
        self.n = int(tensors[0].shape[0])
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._perm_epoch, self._perm = -1, None
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if weights.numel() != self.n or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(f"weights must be {self.n} non-negative numbers, not all zero")
        self.weights = weights

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        if self.weights is not None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * step + 1)
            return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g)
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, pos = divmod(start + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - pos)
            out.extend(self._order(epoch)[pos:pos + take].tolist())
        return torch.tensor(out, dtype=torch.long)

    def batch(self, step: int, device=None) -> tuple[torch.Tensor, ...]:
        idx = self.indices(step)
        return tuple(t[idx].to(device) if device is not None else t[idx] for t in self.tensors)

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n


def spread(indices: np.ndarray, count: int) -> np.ndarray:
    """At most ``count`` of ``indices``, evenly spaced from the first: a fixed held-out subset."""
    return indices[:: max(1, len(indices) // count)][:count]


def class_item_weights(labels: torch.Tensor, class_names, specs) -> torch.Tensor | None:
    """Per-item sampling weights from ``NAME=W`` strings (``--class-weight``): items of class ``NAME`` are drawn
    ``W`` times as often as the others (weight 1). ``None`` when ``specs`` is empty (plain epochs)."""
    if not specs:
        return None
    names = list(class_names)
    per_class = torch.ones(len(names), dtype=torch.float64)
    for spec in specs:
        name, sep, value = str(spec).partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise SystemExit(f"--class-weight {spec!r}: expected NAME=WEIGHT with NAME one of {', '.join(names)}")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not w >= 0:
            raise SystemExit(f"--class-weight {spec!r}: the weight must be a number >= 0 (1 is the data's own share)")
        per_class[names.index(name)] = w
    weights = per_class[labels.long()]
    if float(weights.sum()) <= 0:
        raise SystemExit("--class-weight: every class present in the data has weight 0")
    return weights


def label_drop_per_class(label_drop: float, labels: torch.Tensor, item_weights: torch.Tensor | None,
                         num_classes: int) -> torch.Tensor:
    """Probability that an item of each class has its label replaced by the null class (classifier-free guidance).

    Plain epochs: ``label_drop`` for every class. With class weights, a class drawn ``w`` times as often is dropped
    ``1 / w`` times as often (scaled so that ``label_drop`` stays the overall rate): the null class keeps seeing the
    data's own class mix, so the unconditional branch of guidance is not skewed towards the weighted classes
    (a class whose probability would exceed 1 is clamped there).
    """
    if item_weights is None:
        return torch.full((num_classes,), float(label_drop))
    labels = labels.long()
    count = torch.bincount(labels, minlength=num_classes).double()
    w_sum = torch.bincount(labels, weights=item_weights.double(), minlength=num_classes)
    w_class = torch.where(count > 0, w_sum / count.clamp(min=1), torch.ones_like(count))
    scale = float(label_drop) * float(item_weights.double().mean())
    q = torch.where(w_class > 0, scale / w_class.clamp(min=1e-12), torch.zeros_like(w_class))
    return q.clamp(max=1.0).float()


# ---------------------------------------------------------------------------------------------
# optimisation


def lr_at(step: int, total: int, base: float, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine down to ``base * min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def add_schedule_args(ap, steps: int, batch_size: int, lr: float, warmup: int, min_lr_ratio: float = 0.05) -> None:
    """``--steps``, ``--batch-size``, ``--lr``, ``--warmup`` and ``--min-lr-ratio`` with a trainer's defaults: the
    options :func:`schedule_lr` reads."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--min-lr-ratio", type=float, default=min_lr_ratio)


def schedule_lr(optimizer: torch.optim.Optimizer, step: int, args) -> None:
    """Set the learning rate of ``step`` (:func:`lr_at`) from a trainer's ``--lr``, ``--warmup``, ``--min-lr-ratio``
    and ``--steps``."""
    set_lr(optimizer, lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio))


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Iterable[torch.nn.Parameter],
                   max_norm: float) -> torch.Tensor:
    """Back-propagate ``loss`` into cleared gradients, clip their norm to ``max_norm`` and step; returns
    ``clip_grad_norm_``'s result (the norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return norm


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms, embeddings of size < 2-D and gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith("bias") or "scale_mul" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        d = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        self.decay = float(state["decay"])
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, model: torch.nn.Module) -> None:
        sd = model.state_dict()
        sd.update({k: v.to(sd[k].dtype) for k, v in self.shadow.items()})
        model.load_state_dict(sd)


def resume_weights(model: torch.nn.Module, ck: Mapping | None, device: torch.device, decay: float) -> EMA:
    """``model`` with the checkpoint ``ck``'s weights where resuming, trainable on ``device``, and its EMA (the
    checkpoint's where resuming)."""
    if ck is not None:
        model.load_state_dict(ck["model"])
    model.to(device).train().requires_grad_(True)
    ema = EMA(model, decay)
    if ck is not None:
        ema.load_state_dict(ck["ema"])
    return ema


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema: EMA) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with the EMA weights inside the block, its live weights and train mode after it."""
    live = {k: v.clone() for k, v in model.state_dict().items()}
    ema.copy_to(model)
    model.eval()
    try:
        yield model
    finally:
        model.load_state_dict(live)
        model.train()


# ---------------------------------------------------------------------------------------------
# checkpoints and exports


def save_checkpoint(path: str, state: Mapping[str, Any]) -> None:
    """Atomic ``torch.save`` (write to a temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_config(ck: Mapping | None, key: str, cfg, log: RunLog):
    """``cfg``, or the config the checkpoint ``ck`` holds under ``key`` where the two differ (a resumed run keeps its
    architecture; the difference is logged as a warning)."""
    if ck is None or ck[key] == cfg.to_dict():
        return cfg
    log.log("warn", message=f"{key} of the checkpoint differs from the arguments; the checkpoint's wins")
    return type(cfg).from_dict(ck[key])


def resume_path(run_dir: str, resume: str | None) -> str | None:
    """``--resume auto``: ``<run>/last.pt`` when it exists; a path: that file; ``none``/None: no resume."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        p = os.path.join(run_dir, "last.pt")
        return p if os.path.exists(p) else None
    if not os.path.exists(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    return resume


def export_safetensors(path: str, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                       dtype: torch.dtype | None = None) -> int:
    """Write ``state_dict`` as safetensors with ``config`` as JSON under metadata ``nextscale_config``.

    Returns the file size in bytes. ``dtype`` casts floating-point tensors (e.g. fp16 to halve the size).
    """
    from safetensors.torch import save_file

    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.dtype.is_floating_point:
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={CONFIG_KEY: json.dumps(dict(config), sort_keys=True)})
    return os.path.getsize(path)


def install(outputs: Mapping[str, str], shipped: Mapping[str, str], recipe: str,
            weights_dir: str | None = None) -> list[str]:
    """Copies a recipe's outputs (``outputs[key]``) over the shipped files (``<weights_dir>/shipped[key]``, default
    the pack's ``weights/``); ``shipped["card"]`` is the card, whose ``files`` then name the shipped files instead of
    the run folder's. ``recipe``: the command that makes a missing output. Returns the paths written."""
    weights_dir = weights_dir or os.path.join(repo_root(), "weights")
    for key in shipped:
        if not os.path.isfile(outputs[key]):
            raise SystemExit(f"--install: {outputs[key]} is missing; run `{recipe}` to the end first")
    written = []
    for key, name in shipped.items():
        written.append(os.path.join(weights_dir, name))
        shutil.copyfile(outputs[key], written[-1])
    card_path = os.path.join(weights_dir, shipped["card"])
    with open(card_path, encoding="utf-8") as f:
        card = json.load(f)
    card["files"].update({key: name for key, name in shipped.items() if key != "card"})
    write_json(card_path, card)
    return written


def write_json(path: str, value: Any) -> None:
    """``value`` as JSON indented by one space at ``path`` (its folder made), ending in a newline."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, config)`` of a file written by :func:`export_safetensors`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    return sd, json.loads(meta.get(CONFIG_KEY, "{}"))


# ---------------------------------------------------------------------------------------------
# logging and progress


class RunLog:
    """Prints one line per record and appends it as JSON to ``<run>/log.jsonl``. A disabled log (every rank but
    rank 0 of a distributed run) writes nothing."""

    def __init__(self, run_dir: str, quiet: bool = False, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "log.jsonl")
        self.quiet = quiet
        self.t0 = time.time()

    def log(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "time": round(time.time() - self.t0, 2), **fields}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if not self.quiet:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
            Progress.clear_line()
            print(f"[{kind}] {shown}", flush=True)


def log_due(step: int, args) -> bool:
    """A trainer logs after its first step, every ``--log-every`` steps and after its last (``--steps``)."""
    return step % args.log_every == 0 or step == args.steps or step == 1


def stop_due(step: int, args) -> bool:
    """``--stop-after`` is reached: the trainer saves and returns as if interrupted (how the tests resume)."""
    return bool(args.stop_after) and step >= args.stop_after


def eval_due(step: int, args) -> bool:
    """A trainer evaluates and saves every ``--eval-every`` steps and after its last (``--steps``)."""
    return step % args.eval_every == 0 or step == args.steps


def after_step(step: int, args, evaluate: Callable[[], dict | None], save: Callable[[], None],
               log: RunLog) -> dict | None:
    """The end of a trainer's step ``step`` (counted from 1): at an evaluation step (:func:`eval_due`) the figures of
    ``evaluate()`` (None on a rank that does not evaluate) are logged and returned, then ``save()`` writes
    ``last.pt``; otherwise ``save()`` runs every ``--save-every`` steps and None is returned."""
    if eval_due(step, args):
        metrics = evaluate()
        if metrics is not None:
            log.log("eval", step=step, **metrics)
        save()
        return metrics
    if step % args.save_every == 0:
        save()
    return None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Progress:
    """Minimal progress bar (no dependency): ``step/total``, rate, ETA and a few figures, on stderr.

    On a terminal it redraws one line; otherwise it prints a line every ``every`` percent.
    """

    _active_tty = False

    def __init__(self, total: int, start: int = 0, desc: str = "", every: float = 5.0, enabled: bool = True):
        self.total, self.n, self.desc = int(total), int(start), desc
        self.start_n, self.t0 = int(start), time.time()
        self.tty = sys.stderr.isatty()
        self.every, self.last_pct = every, -1e9
        self.enabled = enabled
        self.fields: dict = {}

    @classmethod
    def clear_line(cls):
        if cls._active_tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        self.fields.update(fields)
        if not self.enabled:
            return
        pct = 100.0 * self.n / max(1, self.total)
        if not self.tty and pct - self.last_pct < self.every and self.n < self.total:
            return
        self.last_pct = pct
        el = time.time() - self.t0
        rate = (self.n - self.start_n) / max(el, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        width = 24
        fill = int(width * self.n / max(1, self.total))
        bar = "#" * fill + "-" * (width - fill)
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        line = (f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.2f}it/s "
                f"elapsed {_hms(el)} eta {_hms(eta)} {extra}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
            Progress._active_tty = True
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
        Progress._active_tty = False


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:d}:{s % 60:02d}"


def timer_iter(it, total: int) -> Iterator:
    """Wrap an iterable with a :class:`Progress` bar."""
    bar = Progress(total)
    for x in it:
        yield x
        bar.update()
    bar.close()
