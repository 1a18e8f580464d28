"""The loading service: every model a node uses is resolved, loaded and made ready here, through the family
registry (:mod:`..models.core.family`).

- :func:`resolve`: a combo choice to a path (the pack's embedded file of that loader and role, a file in the
  NextScale folder, or a folder of shards there).
- :func:`load`: a file to a :class:`NextScaleModel`: identified by its family, stored and computed in the
  precision ComfyUI's rules choose (:func:`precision`), built by its family with ComfyUI's op set, and wrapped in a
  ``comfy.model_patcher.ModelPatcher`` (load device ``get_torch_device()``, offload device
  ``unet_offload_device()``).
- :func:`ready`: one ``comfy.model_management.load_models_gpu`` call for everything a node execution uses, with
  the run's working memory (its family's estimate: KV cache, activations, decoding) as ``memory_required``, so that
  ComfyUI makes room for the weights and the run together, unloading other models first.
- :func:`ready_batch`: the planner of the sampler nodes: :func:`ready` with the whole batch's need, then the
  images per sub-batch that fit the device's free memory (all of them when they fit), or one error before anything
  is allocated that says what one image needs, what is free, and which KV settings would fit.

Nothing is cached here: ComfyUI caches node outputs (a loader runs again only when its inputs change) and owns
where the weights are.

Precision: ``auto`` is ``unet_dtype(device, parameters, role.dtypes)`` for transformers and control models
(``--force-fp32``, ``--fp32-unet``, ``--bf16-unet``, ``--fp16-unet``, ``--fp8_e4m3fn-unet``, then what the device
runs well) and ``vae_dtype`` for tokenizers (float32 unless ``--fp16-vae`` / ``--bf16-vae``: they are small and
precision-sensitive). The compute dtype is ``unet_manual_cast``'s (bf16/fp16/fp32 for fp8 storage or a dtype the
device does not compute well), except that an explicit float16/bfloat16 on the CPU computes as chosen (bf16 is
several times faster on CPUs with AMX or AVX512-BF16). The op set is ``comfy.ops.pick_operations(weight, compute)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch
from torch import nn

from ..models.core.checkpoint import read_sharded_state_dict, read_state_dict, shard_files
from ..models.core.errors import NextScaleError
from ..models.core.family import FAMILIES, Family, Kind, Role, describe, identify
from ..models.core.memory import MemoryNeed, largest_batch, size
from ..models.kv.policies import KVPolicySpec
from .model_files import FOLDER, embedded_missing, resolve_embedded

log = logging.getLogger("NextScale")

# The KV settings an out-of-memory message tries, the largest budget first: (policy, its name in NextScale KV Policy).
FITTING_POLICIES = (("scalekv", "ScaleKV"), ("hack", "HACK"))
FITTING_BUDGETS = (0.5, 0.25, 0.1)

DTYPES = ["auto", "float32", "float16", "bfloat16"]
# The transformers' and control models' loaders offer fp8 storage too (appended: saved workflows keep their choice).
TRANSFORMER_DTYPES = [*DTYPES, "fp8_e4m3fn"]
CHOSEN = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class Precision:
    """How a model's weights are stored and what they compute in, and the ``comfy.ops`` layer set for the pair."""

    weight_dtype: torch.dtype
    compute_dtype: torch.dtype
    operations: type


def precision(role: Role, choice: str, device: torch.device, parameters: int) -> Precision:
    """The loaders' ``dtype`` option resolved for a model of ``role`` with ``parameters`` weights on ``device``
    (the module docstring)."""
    supported = list(role.dtypes)
    if choice == "auto":
        weight = mm.vae_dtype(device, supported) if role.auto == "vae" else mm.unet_dtype(device, parameters, supported)
    elif choice in CHOSEN:
        weight = CHOSEN[choice]
    else:
        raise NextScaleError(f"dtype '{choice}' is not one of {', '.join(TRANSFORMER_DTYPES)}")
    if weight in FP8 and role.auto == "vae":
        raise NextScaleError(
            f"dtype '{choice}': {role.what}s are not stored in fp8 (they are small and precision-sensitive); "
            f"choose auto, float32, float16 or bfloat16"
        )
    if choice != "auto" and mm.is_device_cpu(device) and weight not in FP8:
        compute = weight
    else:
        compute = mm.unet_manual_cast(weight, device, supported) or weight
    return Precision(weight, compute, comfy.ops.pick_operations(weight, compute, load_device=device))


@dataclass(eq=False)
class NextScaleModel:
    """A loaded model as it travels on the pack's model sockets: the module, the family and role it plays, its
    precision, and the ``ModelPatcher`` through which ComfyUI owns where its weights are. Compute on :attr:`device`
    after :func:`ready`."""

    module: nn.Module
    kind: Kind
    name: str
    path: str
    precision: Precision
    patcher: comfy.model_patcher.ModelPatcher

    @property
    def family(self) -> Family:
        return self.kind.family

    @property
    def role(self) -> Role:
        return self.kind.role

    @property
    def device(self) -> torch.device:
        """The compute device: the patcher's load device (the weights may be partly elsewhere)."""
        return self.patcher.load_device

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.weight_dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.precision.compute_dtype

    def __repr__(self) -> str:
        return f"NextScaleModel({self.name!r}, {self.kind}, {self.dtype})"


def expected(loader: str, role: str) -> list[Kind]:
    """The kinds a loader node's input takes: the roles named ``role`` loaded by the node ``loader``."""
    kinds = FAMILIES.kinds(loader, role)
    if not kinds:
        raise NextScaleError(f"no model family has a {role} loaded by '{loader}'")
    return kinds


def _what(kinds: list[Kind]) -> str:
    return " or ".join(dict.fromkeys(k.role.what for k in kinds))


def _hint(kinds: list[Kind]) -> str:
    return " ".join(dict.fromkeys(k.family.files_hint for k in kinds))


def not_found(name: str, loader: str, role: str) -> str:
    """The message for a choice that is not in the NextScale folder: which folder, and where the files come from
    (for an embedded choice of ``loader``: which file of the pack is missing)."""
    missing = embedded_missing(loader, role, name)
    if missing is not None:
        return missing
    kinds = expected(loader, role)
    folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
    return (
        f"model not found: {_what(kinds)} '{name}' is not in the NextScale model folder ({folders}). Put it there "
        f"and refresh the node. {_hint(kinds)}"
    )


def resolve(name: str, loader: str, role: str) -> str:
    """The path of a combo choice: the pack's embedded file, a file in the NextScale folder, or a folder of shards
    there."""
    embedded = resolve_embedded(loader, role, name)
    if embedded is not None:
        return embedded
    path = folder_paths.get_full_path(FOLDER, name)
    if path is not None:
        return path
    for base in folder_paths.get_folder_paths(FOLDER):
        folder = os.path.join(base, name)
        if os.path.isdir(folder) and shard_files(folder):
            return folder
    raise NextScaleError(not_found(name, loader, role))


def _read(path: str, what: str) -> dict[str, torch.Tensor]:
    if os.path.isdir(path) and shard_files(path):
        return read_sharded_state_dict(path, what)
    return read_state_dict(path, what)


def load(name: str, loader: str, role: str, dtype: str = "auto", path: str | None = None) -> NextScaleModel:
    """Load the choice ``name`` (or the file or folder ``path``) for the ``role`` input of the node ``loader``:
    refused with a message naming what the file is and which node loads it when it is something else."""
    kinds = expected(loader, role)
    if dtype not in TRANSFORMER_DTYPES:  # the loaders validate only their file input (nodes/validation.py)
        raise NextScaleError(f"dtype = {dtype!r} is not one of the choices: {', '.join(TRANSFORMER_DTYPES)}")
    path = path or resolve(name, loader, role)
    state_dict = _read(path, _what(kinds))
    kind = identify(state_dict)
    if kind not in kinds:
        raise NextScaleError(
            f"'{os.path.basename(os.path.normpath(path))}' is {describe(kind)}; this node expects "
            f"{' or '.join(k.role.description for k in kinds)}. {_hint(kinds)}"
        )
    device = mm.get_torch_device()
    parameters = sum(t.numel() for t in state_dict.values() if t.is_floating_point())
    chosen = precision(kind.role, dtype, device, parameters)
    scaled = chosen.weight_dtype in FP8  # built in the compute dtype, then its matrices stored in fp8 with scales
    module = kind.family.build(
        kind.role, state_dict, path, dtype=chosen.compute_dtype if scaled else chosen.weight_dtype,
        operations=chosen.operations, compute_dtype=chosen.compute_dtype,
    )
    if scaled:
        store_scaled_fp8(module, chosen.weight_dtype)
    log.info("NextScale: loaded %s '%s' (%s)", role, name, chosen.weight_dtype)
    return _wrap(module, kind, name, path, chosen, device)


def store_scaled_fp8(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every manual-cast ``Linear`` of ``module`` (its matrices: almost all of a transformer's weights) in the
    fp8 ``dtype`` as ComfyUI's scaled fp8 checkpoints are: the weight divided by a per-tensor fp32 ``scale_weight``
    (its largest magnitude over the format's largest value, so that no weight saturates and small ones keep their
    precision) and rounded. The layer becomes ComfyUI's scaled-fp8 ``Linear``, which multiplies the scale back on
    every call (its LoRA and low-VRAM patches included); functional calls read it through ``ops.weight_and_bias``.
    The other layers (norms, embeddings, biases) keep the compute dtype."""
    linear = _scaled_fp8_linear()
    for layer in module.modules():
        if type(layer) is comfy.ops.manual_cast.Linear:
            weight = layer.weight.float()
            scale = weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny) / torch.finfo(dtype).max
            layer.__class__ = linear  # a subclass of manual_cast.Linear: same state, plus the scales below
            layer.weight = nn.Parameter((weight / scale).to(dtype), requires_grad=False)
            layer.scale_weight = nn.Parameter(scale, requires_grad=False)
            layer.scale_input = None
    return module


_SCALED_FP8: list[type] = []


def _scaled_fp8_linear() -> type:
    """ComfyUI's scaled-fp8 ``Linear`` (``comfy.ops.scaled_fp8_ops``), made once."""
    if not _SCALED_FP8:
        _SCALED_FP8.append(comfy.ops.scaled_fp8_ops().Linear)
    return _SCALED_FP8[0]


def adopt(module: nn.Module, name: str = "in memory") -> NextScaleModel:
    """A module built in memory (by a script or a test) as a loaded model: identified by its keys, stored and
    computed in its parameters' dtype, with ComfyUI's load device."""
    kind = identify(module.state_dict())
    if kind is None:
        raise NextScaleError(f"{type(module).__name__} '{name}' is {describe(None)}")
    dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
    device = mm.get_torch_device()
    chosen = Precision(dtype, dtype, comfy.ops.pick_operations(dtype, dtype, load_device=device))
    return _wrap(module.eval().requires_grad_(False), kind, name, "", chosen, device)


def _wrap(module: nn.Module, kind: Kind, name: str, path: str, chosen: Precision, device) -> NextScaleModel:
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=device, offload_device=mm.unet_offload_device())
    return NextScaleModel(module=module, kind=kind, name=name, path=path, precision=chosen, patcher=patcher)


def ready(*models: NextScaleModel | None, memory: int = 0) -> None:
    """Load every model a node execution uses (None entries skipped) in one call of ComfyUI's loader, declaring
    ``memory`` bytes of working memory as ``memory_required``: ComfyUI frees room for the weights and that much
    (unloading other models), then loads what fits."""
    patchers = {id(m.module): m.patcher for m in models if m is not None}
    mm.load_models_gpu(list(patchers.values()), memory_required=memory)


def ready_batch(
    *models: NextScaleModel | None, batch: int, need: Callable[..., MemoryNeed], what: str, kv_settings: bool = True
) -> int:
    """:func:`ready` declaring the working memory of the whole batch, then the images per sub-batch that fit the
    compute device's free memory: ``batch`` when it fits, fewer when not (the node samples the batch in sub-batches;
    each item's seed is the batch's seed plus its index, so the images are the unsplit batch's). ``need(images,
    spec=None)`` is the run's :class:`MemoryNeed` for ``images`` at a KV policy spec (None: the run's own). When
    one image does not fit, a :class:`NextScaleError` before anything is allocated says what it needs, what is free
    and which KV settings would fit (``kv_settings``; False for a run without a KV policy input, such as
    calibration or a sampler without a cache); the user's settings are never changed."""
    ready(*models, memory=need(batch).working)
    device = next(m.device for m in models if m is not None)
    free = mm.get_free_memory(device)
    images = largest_batch(lambda n: need(n).working, batch, free)
    if images == 0:
        raise NextScaleError(does_not_fit(what, need, free, device, kv_settings))
    if images < batch:
        log.info("NextScale: %s samples %d images in sub-batches of %d (%s free on %s)", what, batch, images,
                 size(free), device)
    return images


def does_not_fit(
    what: str, need: Callable[..., MemoryNeed], free: int, device, kv_settings: bool = True
) -> str:
    """The message when one image does not fit in ``free`` bytes: its need by part, and (``kv_settings``) for each
    KV policy of :data:`FITTING_POLICIES` the largest budget that fits, with its need."""
    fits = []
    for policy, title in FITTING_POLICIES if kv_settings else ():
        for budget in FITTING_BUDGETS:
            working = need(1, KVPolicySpec(policy, budget)).working
            if working <= free:
                fits.append(f"{title} at {budget:.0%} needs {size(working)}")
                break
    if fits:
        hint = (f"settings that fit: {'; '.join(fits)} (a NextScale KV Policy node on the sampler's kv_policy "
                f"input)")
    elif kv_settings:
        hint = (f"no KV budget down to {FITTING_BUDGETS[-1]:.0%} fits: choose a lower resolution, or free memory on "
                f"the device (other programs using it)")
    else:
        hint = ("choose a lower resolution, store the transformer in fp8_e4m3fn (its loader's dtype), or free memory "
                "on the device (other programs using it)")
    return (f"{what}: one image needs {need(1).describe()} beyond the weights, but {size(free)} are free on "
            f"{device}; {hint}")


def sub_batches(batch: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each sub-batch of at most ``size`` images (:func:`ready_batch`'s) of ``batch``, in order.
    A sampler run on images ``start .. stop - 1`` takes the seed ``seed + start`` and the per-image inputs of those
    images (the guides' and controls' ``images(start, stop, batch)``): item ``i`` keeps its seed and its inputs, so
    the sub-batches give the unsplit batch's images."""
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]
