"""Training in one process or many under ``torchrun``: process group, wrapping, per-rank rows, full-state checkpoints.

The same command runs on one CPU, on several CPU processes and on GPUs across machines::

    python -m training.train_generator ...                                       # one process
    torchrun --nproc-per-node 2 -m training.train_generator ...                  # two processes (gloo on CPU)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m training.train_generator ... --parallel fsdp                          # 16 GPUs (NCCL)

Rules every trainer follows (they are what makes a run's loss curve independent of the world size):

- ``--batch-size`` is the *global* batch. Step ``s``'s global batch is a pure function of ``(seed, s)``
  (:class:`training.common.StepBatches`); rank ``r`` of ``W`` takes rows ``[r B / W, (r + 1) B / W)``
  (:meth:`Distributed.rows`). Random draws that belong to rows (label drop, control drop) are made for the whole
  batch on every rank and sliced the same way. Averaged gradients then equal one process's gradient.
- ``--parallel ddp`` wraps the trained modules in PyTorch's ``DistributedDataParallel``; ``--parallel fsdp`` shards
  parameters, gradients and optimizer state with FSDP (``torch.distributed.fsdp.fully_shard``): each of the
  trainer's *units* (a transformer's attention and MLP modules) is gathered only while it runs, and
  ``--fsdp-sharding`` picks full sharding (ZeRO-3), ``grad-op`` (parameters stay gathered from forward to backward,
  ZeRO-2) or ``hybrid`` (sharded within a machine, replicated across machines). In one process both are a no-op.
- Checkpoints hold the full, unsharded state in the layout of one process: the model's ``state_dict()`` and the
  optimizer's own ``Optimizer.state_dict()``, gathered for saving and sharded again after loading, so a run
  resumes at any world size and under either strategy. Rank 0 logs and writes; every rank reads (the run folder
  must be visible to every machine).
- Mixed precision stays ``torch.autocast`` (``--precision bf16``), parameters and optimizer state fp32.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from training import common

STRATEGIES = ("ddp", "fsdp")
SHARDINGS = ("full", "grad-op", "hybrid")


def add_args(ap) -> None:
    """``--parallel`` and ``--fsdp-sharding`` (used only under ``torchrun`` with more than one process)."""
    ap.add_argument("--parallel", default="ddp", choices=STRATEGIES,
                    help="under torchrun: 'ddp' replicates the trained model on every process (small models); "
                         "'fsdp' shards its parameters, gradients and optimizer state (large models)")
    ap.add_argument("--fsdp-sharding", default="full", choices=SHARDINGS,
                    help="with --parallel fsdp: 'full' (ZeRO-3), 'grad-op' (parameters kept gathered from forward to "
                         "backward, ZeRO-2) or 'hybrid' (sharded within a machine, replicated across machines)")


class TrainStep(nn.Module):
    """One training forward as a module call, so that DDP and FSDP see the step run: ``step(*args)`` returns
    ``fn(*args)``. ``trained`` (a submodule) holds the parameters that train; ``fn`` uses it directly."""

    def __init__(self, trained: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.trained = trained
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Distributed:
    """This process's place in the run (``rank`` of ``world_size``), its device and the parallel strategy."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, local_world_size: int = 1,
                 parallel: str = "ddp", sharding: str = "full", owns_group: bool = False):
        self.device, self.rank, self.world_size = device, rank, world_size
        self.local_world_size = local_world_size
        self.parallel, self.sharding = parallel, sharding
        self.owns_group = owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives run and the trained model is wrapped."""
        return self.world_size > 1

    def describe(self) -> str:
        if not self.active:
            return "1 process"
        backend = dist.get_backend()
        how = "DDP" if self.parallel == "ddp" else f"FSDP ({self.sharding})"
        return f"{self.world_size} processes, {how}, {backend}"

    # -- wrapping ---------------------------------------------------------------------------------------------

    def wrap(self, trained: nn.Module, fn: Callable[..., Any], units: Iterable[nn.Module] = (),
             unit_methods: Iterable[tuple[nn.Module, str]] = ()) -> nn.Module:
        """``fn`` as a module call over ``trained``, wrapped for the strategy. Build the optimizer *after* this
        call (FSDP replaces the parameters by shards). ``units``: submodules FSDP gathers one at a time (each must
        run through its own ``__call__`` inside ``fn``); ``unit_methods``: ``(unit, name)`` pairs of other methods
        ``fn`` calls on a unit, which then gather it too."""
        step = TrainStep(trained, fn)
        if not self.active:
            return step
        if self.parallel == "ddp":
            if not any(p.requires_grad for p in trained.parameters()):
                raise SystemExit("nothing to train: every parameter of the model is frozen")
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(step, device_ids=ids)
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = self._mesh()
        keep = self.sharding == "grad-op"
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=not keep)
        for unit, name in unit_methods:
            register_fsdp_forward_method(unit, name)
        fully_shard(step, mesh=mesh, reshard_after_forward=not keep)
        return step

    def _mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        if self.sharding != "hybrid":
            return init_device_mesh(self.device.type, (self.world_size,))
        if self.world_size % self.local_world_size:
            raise SystemExit(f"--fsdp-sharding hybrid needs the same number of processes on every machine "
                             f"({self.world_size} processes, {self.local_world_size} on this one)")
        shape = (self.world_size // self.local_world_size, self.local_world_size)
        return init_device_mesh(self.device.type, shape, mesh_dim_names=("replicate", "shard"))

    # -- rows of a global batch --------------------------------------------------------------------------------

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise SystemExit(f"--batch-size {batch_size} is the global batch and must divide among the "
                             f"{self.world_size} processes: use a multiple of {self.world_size}")

    def rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous share of each global-batch tensor (dim 0), moved to the device."""
        out = []
        for t in tensors:
            n = t.shape[0] // self.world_size
            out.append(t[self.rank * n:(self.rank + 1) * n].to(self.device))
        return tuple(out)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``t`` (same shape on each) concatenated in rank order: the global batch's."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean over ranks of each figure (one collective); what one process would report for the whole batch
        when every rank holds as many rows."""
        if not self.active:
            return {k: float(v) for k, v in values.items()}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(values, t.tolist())}

    # -- full state ---------------------------------------------------------------------------------------------

    def full_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` with every FSDP shard gathered (a collective: every rank calls it), on the CPU."""
        from torch.distributed.tensor import DTensor

        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}

    def shard_state(self, full: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict:
        """``full`` cut into the shards of the same keys in ``like`` (a sharded model's ``state_dict()``); tensors
        ``like`` holds whole are moved to its device."""
        return {k: _cut_like(v, like[k]) for k, v in full.items()}

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """``opt.state_dict()`` with every shard gathered: the layout of one process (a collective)."""
        state = opt.state_dict()
        return {"state": {i: self.full_state(s) for i, s in state["state"].items()},
                "param_groups": state["param_groups"]}

    def load_optimizer_state(self, opt: torch.optim.Optimizer, state: Mapping) -> None:
        """Load a full optimizer state (:meth:`optimizer_state`, or a one-process ``state_dict()``) into ``opt``,
        each parameter's moments cut like the parameter (its step count stays whole)."""
        params = [p for group in opt.param_groups for p in group["params"]]
        per_param = {i: {k: (_cut_like(v, params[int(i)]) if v.shape == params[int(i)].shape else v)
                         for k, v in s.items()}
                     for i, s in state["state"].items()}
        opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})

    @property
    def sharded(self) -> bool:
        """Parameters are FSDP shards (DTensors) outside the training forward."""
        return self.active and self.parallel == "fsdp"

    def whole(self, model: nn.Module, build: Callable[[], nn.Module],
              overlay: Mapping[str, torch.Tensor] | None = None) -> nn.Module | None:
        """``model`` with whole weights on rank 0 (None on the others), for evaluation and export (a collective).
        ``model`` itself when its weights are whole (one process, DDP) and there is no ``overlay``; else a copy
        made by ``build()`` on the meta device holding the gathered weights, with the entries of ``overlay`` (an
        EMA's shadow weights) in place of the model's. In one process the copy shares the model's storage: read it,
        do not train it."""
        if not self.sharded and overlay is None:
            return model if self.is_main else None
        full = self.full_state(model.state_dict())
        full.update(self.full_state(overlay or {}))
        return self._copy(full, build) if self.is_main else None

    @contextlib.contextmanager
    def gathered(self, model: nn.Module, build: Callable[[], nn.Module]) -> Iterator[nn.Module]:
        """``model`` with whole weights on every rank, for work between steps that changes them (a codebook
        restart): ``model`` itself unless FSDP shards it, then a copy (as :meth:`whole`) whose state is cut back
        into the shards when the block ends."""
        if not self.sharded:
            yield model
            return
        copy = self._copy(self.full_state(model.state_dict()), build)
        yield copy
        model.load_state_dict(self.shard_state(copy.state_dict(), model.state_dict()))

    def _copy(self, full: Mapping[str, torch.Tensor], build: Callable[[], nn.Module]) -> nn.Module:
        with torch.device("meta"):
            copy = build()
        copy.load_state_dict(full, assign=True)
        return copy.to(self.device)

    def grad_norm(self, norm: torch.Tensor) -> float:
        """``clip_grad_norm_``'s result as a number (under FSDP it is a replicated DTensor)."""
        from torch.distributed.tensor import DTensor

        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    # -- coordination -------------------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (filling caches: rendered data, encoded tokens), then the other ranks."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def start(self, args) -> common.RunLog:
        """A trainer's opening on every rank: ``--batch-size`` checked against the processes, the run log (written by
        rank 0) made and returned, ``--seed`` set."""
        self.check_batch(args.batch_size)
        log = common.RunLog(args.run_dir, enabled=self.is_main)
        torch.manual_seed(args.seed)
        return log

    def load_resume(self, run_dir: str, resume: str | None) -> tuple[str | None, dict | None]:
        """``(path, checkpoint)`` of the run's resume point (:meth:`resume_path`), ``(None, None)`` without one."""
        path = self.resume_path(run_dir, resume)
        return path, (common.load_checkpoint(path) if path else None)

    def resume_step(self, opt: torch.optim.Optimizer, ck: Mapping, path: str, log) -> int:
        """Load the checkpoint ``ck`` (read from ``path``)'s optimizer state into ``opt``, log the resume to the
        :class:`~training.common.RunLog` ``log`` and return the checkpoint's step."""
        self.load_optimizer_state(opt, ck["optimizer"])
        step = int(ck["step"])
        log.log("resume", path=path, step=step, saved_by_processes=ck.get("world_size", 1), processes=self.world_size)
        return step

    def resume_path(self, run_dir: str, resume: str | None) -> str | None:
        """:func:`training.common.resume_path` as rank 0 sees it; a rank that cannot read that file stops with the
        reason (every machine must see the run folder)."""
        path = common.resume_path(run_dir, resume) if self.is_main else None
        if self.active:
            box = [path]
            dist.broadcast_object_list(box, src=0)
            path = box[0]
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"rank {self.rank} cannot read the checkpoint {path} that rank 0 resumes from: put the "
                             f"run folder on storage every machine sees")
        return path

    def close(self) -> None:
        """Destroy the process group if :func:`setup` made it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch, or a plain process: the one that prints a trainer's result."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def session(args) -> Iterator[Distributed]:
    """:func:`setup` from a trainer's ``--device``, ``--parallel`` and ``--fsdp-sharding``; the process group it
    made is destroyed at the end."""
    d = setup(args.device, args.parallel, args.fsdp_sharding)
    try:
        yield d
    finally:
        d.close()


def run(args, body: Callable[[Any, Distributed], dict]) -> dict:
    """A trainer's ``body(args, d)`` with its ``--threads``, inside a :func:`session`: one process, or one rank of a
    ``torchrun`` launch."""
    common.set_threads(args.threads)
    with session(args) as d:
        return body(args, d)


def cli(build_parser: Callable[[], Any], train: Callable[[Any], dict], argv=None) -> None:
    """A trainer's command line: parse ``argv``, ``train``, and print the result as JSON on the main process."""
    out = train(build_parser().parse_args(argv))
    if main_process():
        print(json.dumps(out))


def _cut_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` on ``ref``'s device and, when ``ref`` is an FSDP shard (a DTensor), cut into the same shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device)


def setup(device_name: str = "auto", parallel: str = "ddp", sharding: str = "full") -> Distributed:
    """The process's :class:`Distributed`. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it joins the
    process group, initialising it unless the caller did: NCCL when the processes use CUDA (each its
    ``LOCAL_RANK``'s GPU), gloo on CPUs. Otherwise a plain single process on :func:`training.common.pick_device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = common.pick_device(device_name)
    if world == 1:
        return Distributed(device, parallel=parallel, sharding=sharding)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise SystemExit(f"--device {device_name} ({device.type}): several processes train on CUDA GPUs or CPUs")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(device, rank, world, local_world, parallel, sharding, owns)
