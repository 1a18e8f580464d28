"""Autotuning shared by the Triton kernel modules: version-safe ``autotune``, configs pruned by shared memory.

Imported only by :mod:`.triton_attention` and :mod:`.triton_quantize`.

- :func:`autotune` is ``triton.autotune`` given only the keyword arguments the installed Triton accepts (read from
  its signature: ``cache_results`` arrived in 3.4; without it tunings are redone in each process).
- :func:`keep_fitting` is the last step of every pruning function: it keeps the configs whose shared memory fits
  the device the kernel runs on. The shared memory of a config is what Triton's compiler reports for it
  (:func:`shared_memory`: a compile without a launch, cached by Triton and reused by the launch), the limit is
  the device's opt-in maximum per block (:func:`shared_memory_limit`). Triton launches a lone remaining config
  without benchmarking it, so a config that does not fit must never reach the autotuner; the config lists are
  built so that one always fits (checked for sm_80, sm_86, sm_89 and sm_90 by ``tests/test_triton_compile.py``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import triton
import triton.testing


def autotune(**kwargs):
    """``triton.autotune(**kwargs)`` without the keywords this Triton does not accept."""
    accepted = inspect.signature(triton.autotune).parameters
    return triton.autotune(**{name: value for name, value in kwargs.items() if name in accepted})


def bench(kernel_call, quantiles):
    """Short timing runs: tuning happens once per autotune key (and is cached on disk from Triton 3.4 on)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


@functools.lru_cache(maxsize=16)
def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on ``device`` (the opt-in maximum); ``None`` off CUDA (the
    interpreter has no shared memory)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def shared_memory(kernel, config: triton.Config, named_args: dict, meta: dict) -> int:
    """Bytes of shared memory ``kernel`` needs with ``config`` for the positional arguments ``named_args`` and the
    keyword arguments ``meta`` of a launch (the autotuner's own ``grid`` and ``warmup`` are left out): compiled
    for the current device without a launch, and the launch then finds it in Triton's cache."""
    args = [named_args[name] for name in kernel.arg_names if name in named_args]
    constexprs = {name: value for name, value in meta.items() if name not in ("grid", "warmup")}
    return kernel.warmup(*args, grid=(1,), **constexprs, **config.all_kwargs()).metadata.shared


def keep_fitting(kernel, configs: Sequence[triton.Config], named_args: dict, meta: dict) -> list[triton.Config]:
    """The ``configs`` whose shared memory fits the device of the first tensor argument; raises ``RuntimeError``
    when none does (the config lists are built so that this cannot happen on compute capability 8.0+)."""
    device = next(v.device for v in named_args.values() if isinstance(v, torch.Tensor))
    limit = shared_memory_limit(device)
    if limit is None:
        return list(configs)
    needs = {config: shared_memory(kernel, config, named_args, meta) for config in configs}
    fitting = [config for config in configs if needs[config] <= limit]
    if not fitting:
        least = min(needs.values())
        raise RuntimeError(
            f"no Triton config of {kernel.fn.__name__} fits the {limit} bytes of shared memory per block of {device} "
            f"(the smallest needs {least}); the PyTorch paths run everywhere (NEXTSCALE_ATTENTION_BACKEND=sdpa)"
        )
    return fitting
