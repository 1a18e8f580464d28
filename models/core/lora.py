"""Low-rank adapters (LoRA) of the transformers' weights: the file format, its checks, and LoRA on a plain torch model.

A LoRA changes a base weight ``W (out, in)``, named by the base model's own state-dict key (the official checkpoint
key, e.g. ``blocks.3.attn.mat_qkv.weight``), into ``W + strength * (alpha / rank) * up @ down`` with ``up (out, rank)``
and ``down (rank, in)``: the formula of ComfyUI's ``comfy.weight_adapter.LoRAAdapter``, computed in fp32 and cast back
to ``W``'s dtype as ComfyUI does.

File layout (safetensors), per adapted weight ``<module>.weight``: ``<module>.lora_up.weight``,
``<module>.lora_down.weight`` and the scalar ``<module>.alpha``, the layout ComfyUI's LoRA loader reads. The metadata
key ``nextscale_config`` holds JSON with ``kind: "nextscale-lora"``, the base model's ``family`` (``var`` or
``infinity``) and config, ``rank``, ``alpha``, the layer ``groups`` and ``blocks`` it adapts.

Layer groups (:data:`GROUPS`), each a set of weight names inside a transformer block (VAR ``blocks.{i}.``, Infinity
``blocks.{i}.`` or ``block_chunks.{c}.module.{j}.``) or of the whole model: ``attn`` (self-attention qkv and output),
``cross`` (Infinity's cross-attention), ``ffn`` (the MLP), ``ada`` (AdaLN modulation), ``class`` (VAR's class
embedding), ``head``.

On a plain torch model a LoRA is a ``torch.nn.utils.parametrize`` parametrization of each adapted weight
(:class:`LoRADelta`): reading ``module.weight`` gives the adapted weight, the original stays untouched and
:func:`remove_lora` puts it back exactly. Training (:func:`add_lora`) makes ``up`` and ``down`` the only trainable
parameters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import CONFIG_METADATA_KEY, read_safetensors_metadata, read_state_dict, save_safetensors
from .errors import NextScaleError
from .family import describe, identify

WHAT = "LoRA"
LORA_KIND = "nextscale-lora"
UP, DOWN, ALPHA = ".lora_up.weight", ".lora_down.weight", ".alpha"
# weight names (without ".weight") inside a block, and of the whole model, per layer group
BLOCK_GROUPS = {
    "attn": ("attn.mat_qkv", "attn.proj", "sa.mat_qkv", "sa.proj"),
    "cross": ("ca.mat_q", "ca.mat_kv", "ca.proj"),
    "ffn": ("ffn.fc1", "ffn.fc2"),
    "ada": ("ada_lin.1",),
}
MODEL_GROUPS = {"ada": ("shared_ada_lin.1",), "class": ("class_emb",), "head": ("head",)}
GROUPS = ("attn", "cross", "ffn", "ada", "class", "head")
_BLOCK = re.compile(r"^(?:blocks\.(\d+)|block_chunks\.(\d+)\.module\.(\d+))\.(.+)\.weight$")
# the parameter names a parametrized weight's LoRA gets in the model's state dict
_PARAM = re.compile(r"^(.+)\.parametrizations\.weight\.0\.(up|down)$")


@dataclass(frozen=True)
class LoRAWeight:
    """One adapted weight: ``up (out, rank)``, ``down (rank, in)`` and ``alpha``."""

    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight it adapts."""
        return int(self.up.shape[0]), int(self.down.shape[1])

    def scale(self, strength: float = 1.0) -> float:
        return strength * (self.alpha / self.rank)

    def apply_to(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``weight + strength * alpha / rank * up @ down`` in fp32, in ``weight``'s dtype."""
        delta = torch.mm(self.up.to(weight.device, torch.float32), self.down.to(weight.device, torch.float32))
        return (weight.float() + self.scale(strength) * delta).to(weight.dtype)


@dataclass
class LoRA:
    """The weights of a LoRA file by the base model's key they adapt, and its config."""

    weights: dict[str, LoRAWeight]
    config: dict

    def describe(self) -> str:
        base = self.config.get("base") or {}
        arch = ", ".join(f"{k} {base[k]}" for k in ("depth", "embed_dim") if k in base)
        family = {"var": "a VAR", "infinity": "an Infinity"}.get(self.config.get("family"), "an unknown")
        return f"a rank-{self.config.get('rank', '?')} LoRA of {family} transformer" + (f" ({arch})" if arch else "")


# -- choosing weights --------------------------------------------------------------------------------------------


def parse_blocks(text: str) -> tuple[int, ...]:
    """``"0-3,6"`` -> ``(0, 1, 2, 3, 6)``; ``""`` -> ``()`` (every block)."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise NextScaleError(f"blocks '{text}': expected block numbers and ranges such as '0-3,6'")
        out.extend(range(int(first), int(last if sep else first) + 1))
    return tuple(sorted(set(out)))


def target_keys(shapes: Mapping[str, Sequence[int]], groups: Iterable[str], blocks: Iterable[int] = ()) -> list[str]:
    """The 2-D weight keys of a model (``shapes``: its state-dict keys and shapes) that the layer ``groups`` name,
    in the blocks ``blocks`` (empty: every block; the model-level groups ``ada``, ``class`` and ``head`` are
    outside blocks and always included when named), in state-dict order."""
    groups = list(dict.fromkeys(groups))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise NextScaleError(f"layer groups {groups}: choose from {', '.join(GROUPS)}")
    chunked = {(int(m.group(2)), int(m.group(3))) for k in shapes if (m := _BLOCK.match(k)) and m.group(2)}
    per_chunk = 1 + max((j for _, j in chunked), default=0)
    wanted = set(blocks)
    keys = []
    for key, shape in shapes.items():
        if len(shape) != 2 or not key.endswith(".weight"):
            continue
        m = _BLOCK.match(key)
        if m:
            index = int(m.group(1)) if m.group(1) else int(m.group(2)) * per_chunk + int(m.group(3))
            if (not wanted or index in wanted) and any(m.group(4) in BLOCK_GROUPS.get(g, ()) for g in groups):
                keys.append(key)
        elif any(key[: -len(".weight")] in MODEL_GROUPS.get(g, ()) for g in groups):
            keys.append(key)
    if not keys:
        where = f" in blocks {sorted(wanted)}" if wanted else ""
        raise NextScaleError(f"the layer groups {', '.join(groups)}{where} name no weight of this model: VAR has "
                             f"attn, ffn, ada, class, head; Infinity has attn, cross, ffn, ada, head")
    return keys


# -- files -------------------------------------------------------------------------------------------------------


def lora_state_dict(weights: Mapping[str, LoRAWeight]) -> dict[str, torch.Tensor]:
    """The file's tensors (see the module docstring) of ``weights`` keyed by the base weight they adapt."""
    out = {}
    for key, w in weights.items():
        module = key[: -len(".weight")]
        out[module + UP] = w.up.detach().float().cpu().contiguous()
        out[module + DOWN] = w.down.detach().float().cpu().contiguous()
        out[module + ALPHA] = torch.tensor(float(w.alpha))
    return out


def save_lora(path: str, weights: Mapping[str, LoRAWeight], config: Mapping) -> None:
    save_safetensors(lora_state_dict(weights), path, {CONFIG_METADATA_KEY: {**config, "kind": LORA_KIND}})


def read_lora(path: str) -> LoRA:
    """The LoRA in ``path``; a :class:`NextScaleError` names what is wrong with a file of another kind or a damaged
    one."""
    state_dict = read_state_dict(path, WHAT)
    ups = {k[: -len(UP)] for k in state_dict if k.endswith(UP)}
    if not ups:
        found = identify(state_dict)
        what = describe(found) if found is not None else "no LoRA (no '*.lora_up.weight' keys)"
        raise NextScaleError(f"'{path}' is {what}: NextScale Load LoRA takes LoRA files written by "
                             f"training/train_lora.py (keys '<layer>.lora_up.weight', '<layer>.lora_down.weight', "
                             f"'<layer>.alpha')")
    known = {m + suffix for m in ups for suffix in (UP, DOWN, ALPHA)}
    stray = sorted(set(state_dict) - known)
    if stray:
        raise NextScaleError(f"LoRA file '{path}' has keys that belong to no '<layer>.lora_up.weight': "
                             f"{', '.join(stray[:5])}; it is damaged or of another LoRA layout")
    weights = {}
    for module in sorted(ups):
        up, down = state_dict[module + UP], state_dict.get(module + DOWN)
        if down is None:
            raise NextScaleError(f"LoRA file '{path}' has '{module}{UP}' without '{module}{DOWN}'")
        if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0] or not up.is_floating_point():
            raise NextScaleError(f"LoRA file '{path}': layer '{module}' has up {list(up.shape)} and down "
                                 f"{list(down.shape)}; expected up (out, rank) and down (rank, in) weights")
        alpha_t = state_dict.get(module + ALPHA)
        alpha = float(alpha_t.reshape(-1)[0]) if alpha_t is not None and alpha_t.numel() == 1 else float(up.shape[1])
        if alpha_t is not None and (alpha_t.numel() != 1 or not math.isfinite(alpha)):
            raise NextScaleError(f"LoRA file '{path}': '{module}{ALPHA}' must be one finite number")
        weights[module + ".weight"] = LoRAWeight(up.float(), down.float(), alpha)
    try:
        config = json.loads(read_safetensors_metadata(path).get(CONFIG_METADATA_KEY, "{}"))
    except ValueError:
        raise NextScaleError(f"LoRA file '{path}' has an invalid '{CONFIG_METADATA_KEY}' metadata entry") from None
    return LoRA(weights, config if isinstance(config, dict) else {})


def check_fits(lora: LoRA, shapes: Mapping[str, Sequence[int]], name: str = "the LoRA") -> None:
    """Every weight ``lora`` adapts exists in the model (``shapes``: its state-dict keys and shapes) with the shape
    the LoRA was made for; else a :class:`NextScaleError` that says which base the LoRA (``name``) was made for."""
    missing = [k for k in lora.weights if k not in shapes]
    misshaped = [f"{k} is {list(shapes[k])} in the model, {list(w.shape)} in the LoRA"
                 for k, w in lora.weights.items() if k in shapes and tuple(shapes[k]) != w.shape]
    if not (missing or misshaped):
        return
    problem = (f"adapts {len(missing)} weight(s) the model lacks ({', '.join(missing[:3])})" if missing
               else f"has weights of other shapes ({'; '.join(misshaped[:2])})")
    raise NextScaleError(f"{name} is {lora.describe()} and does not fit the model: it {problem}. Use the LoRA with "
                         f"the model it was trained on")


# -- on a plain torch model ------------------------------------------------------------------------------------


class LoRADelta(nn.Module):
    """Parametrization ``W -> W + strength * alpha / rank * up @ down`` (:meth:`LoRAWeight.apply_to`)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, alpha: float, strength: float = 1.0,
                 trainable: bool = False):
        super().__init__()
        self.up = nn.Parameter(up, requires_grad=trainable)
        self.down = nn.Parameter(down, requires_grad=trainable)
        self.alpha, self.strength = float(alpha), float(strength)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.mm(self.up.float(), self.down.float())
        return (weight.float() + self.strength * (self.alpha / self.up.shape[1]) * delta).to(weight.dtype)


def _parametrize(model: nn.Module, key: str, make) -> None:
    """Register ``make(weight)`` (a :class:`LoRADelta`) as the parametrization of the weight ``key``."""
    module = model.get_submodule(key[: -len(".weight")])
    if parametrize.is_parametrized(module, "weight"):
        raise NextScaleError(f"'{key}' already carries a LoRA: remove_lora(model) first")
    parametrize.register_parametrization(module, "weight", make(module.weight))


def apply_lora(model: nn.Module, lora: LoRA, strength: float = 1.0) -> None:
    """Adapt ``model``'s weights by ``lora`` at ``strength`` (frozen; for evaluation), after checking the fit. One
    LoRA at a time: :func:`remove_lora` takes it off."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise NextScaleError("the model already carries a LoRA: remove_lora(model) first")
    check_fits(lora, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    for key, w in lora.weights.items():
        _parametrize(model, key, lambda weight, w=w: LoRADelta(w.up.to(weight.device), w.down.to(weight.device),
                                                               w.alpha, strength))


def add_lora(model: nn.Module, keys: Iterable[str], rank: int, alpha: float, generator: torch.Generator) -> None:
    """New trainable LoRA on ``keys`` of ``model``: ``down`` uniform in ``+-1/sqrt(in)`` (loralib's and PEFT's
    Kaiming init), ``up`` zero, so the model starts unchanged. ``up`` and ``down`` become the model's only
    trainable parameters."""
    if rank < 1:
        raise NextScaleError(f"LoRA rank must be at least 1, got {rank}")
    model.requires_grad_(False)

    def make(weight: torch.Tensor) -> LoRADelta:
        out_dim, in_dim = weight.shape
        down = (torch.rand(rank, in_dim, generator=generator) * 2 - 1) / math.sqrt(in_dim)
        return LoRADelta(torch.zeros(out_dim, rank).to(weight.device), down.to(weight.device), alpha, trainable=True)

    for key in keys:
        _parametrize(model, key, make)


def is_lora_parameter(name: str) -> bool:
    """Whether a state-dict key of a model is a LoRA parameter added by :func:`add_lora` or :func:`apply_lora`."""
    return _PARAM.match(name) is not None


def lora_weights(state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, LoRAWeight]:
    """The LoRA of a parametrized model from (a part of) its state dict holding the LoRA parameters, keyed by the
    base weight they adapt."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        m = _PARAM.match(name)
        if m:
            parts.setdefault(m.group(1) + ".weight", {})[m.group(2)] = tensor
    return {key: LoRAWeight(p["up"].detach().float().cpu(), p["down"].detach().float().cpu(), alpha)
            for key, p in parts.items()}


def remove_lora(model: nn.Module) -> None:
    """Take every LoRA off ``model``: each adapted weight is again its original tensor, unchanged."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
