"""Model families: the protocol every family implements, and the registry that lists them.

A *family* is one kind of scale-wise model (VAR, Infinity, ...) with everything the node layer needs to use it:
which files are its own and what each is (:meth:`Family.detect`), how each is built, how its sampler, encoder and
decoder are called, the shape of its KV cache and how much memory a run needs. A file plays one *role* in its
family (:class:`Role`: the generator, its tokenizer, a control model), and each role names the node that loads it.

The registry (:data:`FAMILIES`) lists the families. Identifying a file (:func:`identify`), the loaders and the nodes
all go through it, so that a family lives in one place: its package under ``models/`` with a ``family.py``, and one
entry in :data:`BUILTIN_FAMILIES` (docs/architecture.md, "Adding a family").

Conventions of the protocol:

- Modules are the family's own ``nn.Module`` classes, built by :meth:`Family.build`; the node layer never looks
  inside them, it only hands them back to their family.
- Images are ``(B, 3, H, W)`` in -1..1 on the tokenizer's device; tokens are the family's token type
  (:class:`~.tokens.NextScaleTokens`, :class:`~.tokens.NextScaleBitTokens`, ...).
- Every sampler has the entry signature ``sample(generator, tokenizer, condition, *, seed, options, hooks,
  device)``; a hook outside :attr:`Family.hooks` is refused (:func:`~.hooks.refuse_unsupported`), never ignored.
- A capability a family lacks (class names of a text-conditioned family, collaborative decoding, ...) is refused
  with a :class:`~.errors.NextScaleError` that says what to use instead.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NextScaleError
from .hooks import SamplerHooks
from .kv_cache import KVPolicy
from .memory import MemoryNeed

# Sub-packages of models/ whose family.py defines FAMILY. Adding a family is one entry here. The first family whose
# detect claims a file wins, so a family whose files hold another's keys and more comes first: "dd" before "var" (a
# Distilled Decoding file holds every key of a VAR one), "flexvar" before "var" (FlexVAE holds the keys of VAR's
# tokenizer detection), "nsarm" before "infinity".
BUILTIN_FAMILIES = ("dd", "flexvar", "var", "nsarm", "infinity", "switti", "hmar")


@dataclass(frozen=True)
class Role:
    """One part a file plays in its family.

    ``name`` is what it is to a run ("generator", "tokenizer", "control"); ``what`` a short noun for messages;
    ``description`` says what a file of this role is; ``loader`` is the display name of the node that loads it.
    ``dtypes`` are the storage dtypes the loaders' ``auto`` may choose, preferred first, and ``auto`` which of
    ComfyUI's rules chooses among them: "unet" (``unet_dtype``: the ``--*-unet`` flags, then what the device runs
    well) or "vae" (``vae_dtype``: float32 unless ``--fp16-vae`` / ``--bf16-vae`` say otherwise).
    """

    name: str
    what: str
    description: str
    loader: str
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
    auto: str = "unet"


@dataclass(frozen=True)
class Kind:
    """What a file is: a role of a family. ``str(kind)`` is its name, e.g. ``var-generator``."""

    family: Family
    role: Role

    def __str__(self) -> str:
        return f"{self.family.name}-{self.role.name}"

    def describe(self) -> str:
        return f"{self.role.description}, loaded by '{self.role.loader}'"


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a generator's KV cache over one schedule: per token, ``layers`` x ``heads`` keys and values of
    ``head_dim`` channels. ``scales`` are square sides (VAR) or ``(h, w)`` grids (Infinity)."""

    layers: int
    heads: int
    head_dim: int
    scales: tuple

    @property
    def areas(self) -> list[int]:
        return [s * s if isinstance(s, int) else int(s[0]) * int(s[1]) for s in self.scales]

    @property
    def num_tokens(self) -> int:
        return sum(self.areas)

    def cache_bytes(self, rows: int, itemsize: int, policy: KVPolicy | None = None) -> int:
        """The most bytes a :class:`~.kv_cache.KVCache` holds over this geometry for ``rows`` rows (the CFG rows
        included) with keys and values of ``itemsize`` bytes: :meth:`~.kv_cache.KVPolicy.cache_bytes` of ``policy``
        (the full cache without one)."""
        return (policy or KVPolicy()).cache_bytes(self, rows, itemsize)


@dataclass(frozen=True)
class Workload:
    """What one node execution asks of a family's models, for :meth:`Family.working_memory`.

    ``batch_size`` images sampled (with ``guided``, the transformer runs twice as many rows); ``schedule`` the
    family's schedule (None: the generator's own); ``kv_policy`` the bound policy (None: the full cache);
    ``dtype`` the transformer's compute dtype (its cache and activations); ``step_tokens`` the most tokens the
    transformer runs at once (None: the largest scale); ``controls`` the control modules bound to the run;
    ``decode_batch`` images encoded or decoded at once at the schedule's full size, in ``decode_dtype``;
    ``text_tokens`` the prompt's tokens of a text-conditioned family (None: the most its generator takes);
    ``decode_bands`` the bands of rows one image is decoded in (1: whole; more only where ``Family.banded_decode``).
    """

    batch_size: int = 1
    guided: bool = True
    schedule: object | None = None
    kv_policy: KVPolicy | None = None
    dtype: torch.dtype = torch.float32
    step_tokens: int | None = None
    controls: tuple[nn.Module, ...] = ()
    decode_batch: int = 0
    decode_dtype: torch.dtype = torch.float32
    text_tokens: int | None = None
    decode_bands: int = 1

    @property
    def rows(self) -> int:
        return self.batch_size * (2 if self.guided else 1)


class Family(abc.ABC):
    """The protocol of a model family (see the module docstring). Subclass it, define the class attributes, and
    implement the abstract methods; the others refuse a capability the family lacks."""

    name: str  # registry key and the first half of kind names: "var" -> "var-generator"
    title: str  # in messages: "VAR"
    roles: tuple[Role, ...]
    hooks: frozenset[str]  # the SamplerHooks fields the sampler honours; any other hook is refused
    files_hint: str  # where the official files are published, for "file not found" messages
    decode_chunk: int = 8  # images the nodes decode at once
    # its ``decode(..., bands=n)`` decodes an image n bands of rows at a time, for less memory (the same images)
    banded_decode: bool = False

    # -- files ----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def detect(self, keys: AbstractSet[str]) -> Role | None:
        """The role of a state dict with these keys in this family, or None when it is not this family's."""

    @abc.abstractmethod
    def build(
        self, role: Role, state_dict: Mapping[str, torch.Tensor], path: str, *, dtype: torch.dtype, operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> nn.Module:
        """A frozen module in eval mode holding ``state_dict`` (strictly checked), its weights in ``dtype``.
        ``operations`` is the layer set to build it with (ComfyUI's ``comfy.ops`` classes in the node layer, so a
        partial load can leave weights on the offload device); ``compute_dtype`` what it computes in (None: its
        weights' dtype; fp8 storage needs bf16/fp16 here and a manual-cast op set; :mod:`.ops`)."""

    # -- a run ----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def check_pair(self, generator: nn.Module, tokenizer: nn.Module) -> None:
        """Raise :class:`NextScaleError` unless ``generator`` and ``tokenizer`` work together."""

    @abc.abstractmethod
    def sample(
        self, generator: nn.Module, tokenizer: nn.Module, condition, *, seed: int, options=None,
        hooks: SamplerHooks | None = None, device: torch.device | None = None,
    ):
        """Tokens of one image per condition row (class labels, text features, ...), drawn with ``hooks``."""

    @abc.abstractmethod
    def encode(self, tokenizer: nn.Module, images_B3HW: torch.Tensor, schedule=None, resize: str = "center crop"):
        """Tokens of ``images_B3HW`` (-1..1, any size) on ``schedule`` (None: the tokenizer's own, where it has
        one), the images fitted to its size by ``resize`` (one of ``imageops.RESIZE_MODES``). A family whose tokens
        have ``extra`` records the fit there as ``extra["fit"]`` (an ``imageops.ImageFit``) for the guides and the
        composite."""

    @abc.abstractmethod
    def check_tokens(self, tokenizer: nn.Module, tokens) -> None:
        """Raise :class:`NextScaleError` unless ``tokens`` are this family's and ``tokenizer`` can decode them."""

    @abc.abstractmethod
    def decode(self, tokenizer: nn.Module, tokens, upto: int | None = None) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in -1..1 of the first ``upto`` scales of ``tokens`` (None: all of them), checked
        by :meth:`check_tokens`; the tokens are on the tokenizer's device."""

    @abc.abstractmethod
    def preview(self, tokenizer: nn.Module, latent: torch.Tensor) -> torch.Tensor:
        """A small image ``(1, 3, h, w)`` in -1..1 of the first batch item of the latent the sampler's callback
        receives."""

    @abc.abstractmethod
    def kv_geometry(self, generator: nn.Module, schedule=None) -> KVGeometry:
        """The KV cache's shape for ``schedule`` (None: the generator's own)."""

    @abc.abstractmethod
    def memory(self, generator: nn.Module | None, tokenizer: nn.Module | None, workload: Workload) -> MemoryNeed:
        """What a run holds on the device, by part (:class:`~.memory.MemoryNeed`): the weights of both models in
        their storage dtype, the KV cache at the workload's policy and rows, the activations of its largest step,
        the previews while sampling and ``decode_batch`` full images. ``generator`` None: the decoding alone.
        Works on ``meta`` modules (official sizes from their configs)."""

    def working_memory(self, generator: nn.Module | None, tokenizer: nn.Module | None, workload: Workload) -> int:
        """Bytes a run needs beyond the weights (``memory(...).working``): what the nodes declare to ComfyUI."""
        return self.memory(generator, tokenizer, workload).working

    # -- capabilities some families lack ---------------------------------------------------------------------------

    def class_names(self, generator: nn.Module) -> tuple[str, ...]:
        """The classes a class-conditional generator draws, by index."""
        raise NextScaleError(f"{self.title} models are not class-conditional: they have no class names")

    def parse_schedule(self, text: str):
        """The family's schedule written as text (NextScale Encode's ``schedule`` input)."""
        raise NextScaleError(f"{self.title} schedules cannot be written as text")

    def guide_schedule(self, generator: nn.Module, tokenizer: nn.Module, schedule=None):
        """The schedule a reference that will guide ``generator`` is encoded on, for ``schedule`` as NextScale
        Encode reads it (None: the tokenizer's own): the same, unless the generator's tokens span several latent
        cells (Infinity-8B's)."""
        return schedule

    def sample_collaborative(
        self, drafter: nn.Module, refiner: nn.Module, tokenizer: nn.Module, condition, *, draft_scales: int,
        seed: int, options=None, hooks: SamplerHooks | None = None, drafter_hooks: SamplerHooks | None = None,
        device: torch.device | None = None,
    ):
        """Tokens whose first ``draft_scales`` scales ``drafter`` samples and the rest ``refiner``; ``hooks``
        belong to the refiner (guide and callback act on every scale), ``drafter_hooks`` to the drafter."""
        raise NextScaleError(f"{self.title} has no collaborative decoding: use one generator with NextScale Sampler")

    def check_collaborators(self, drafter: nn.Module, refiner: nn.Module, tokenizer: nn.Module, draft_scales: int):
        """Raise :class:`NextScaleError` unless ``drafter`` and ``refiner`` can share a run."""
        raise NextScaleError(f"{self.title} has no collaborative decoding: use one generator with NextScale Sampler")

    def __repr__(self) -> str:
        return f"<{self.title} family>"


class Registry:
    """The families, in order: the first whose :meth:`Family.detect` claims a file identifies it."""

    def __init__(self, builtin: Sequence[str]):
        self._builtin = tuple(builtin)
        self._families: list[Family] | None = None

    @property
    def families(self) -> tuple[Family, ...]:
        if self._families is None:  # imported on first use: each family's modules import this one
            self._families = [importlib.import_module(f"..{p}.family", __package__).FAMILY for p in self._builtin]
        return tuple(self._families)

    def register(self, family: Family) -> Family:
        """Add a family after the built-in ones (its name must be new)."""
        if any(f.name == family.name for f in self.families):
            raise NextScaleError(f"a model family named '{family.name}' is already registered")
        self._families.append(family)
        return family

    def get(self, name: str) -> Family:
        for family in self.families:
            if family.name == name:
                return family
        raise NextScaleError(f"no model family named '{name}' (known: {', '.join(f.name for f in self.families)})")

    def identify(self, state_dict: Mapping[str, object]) -> Kind | None:
        """What a state dict is, from its keys alone; None when no family claims it."""
        keys = frozenset(state_dict)
        for family in self.families:
            role = family.detect(keys)
            if role is not None:
                return Kind(family, role)
        return None

    def kinds(self, loader: str | None = None, role: str | None = None) -> list[Kind]:
        """Every family's roles, or those loaded by the node ``loader`` and named ``role``."""
        return [
            Kind(f, r)
            for f in self.families
            for r in f.roles
            if (loader is None or r.loader == loader) and (role is None or r.name == role)
        ]

    def kind(self, name: str) -> Kind:
        """The kind called ``name`` (``str(kind)``, e.g. ``var-tokenizer``)."""
        for kind in self.kinds():
            if str(kind) == name:
                return kind
        raise NextScaleError(f"no model family has a kind named '{name}'")


FAMILIES = Registry(BUILTIN_FAMILIES)
UNKNOWN = "not a checkpoint NextScale recognises"


def identify(state_dict: Mapping[str, object]) -> Kind | None:
    """:meth:`Registry.identify` of :data:`FAMILIES`."""
    return FAMILIES.identify(state_dict)


def describe(kind: Kind | None) -> str:
    return UNKNOWN if kind is None else kind.describe()


def expect_kind(state_dict: Mapping[str, object], path: str, expected: str, what: str) -> None:
    """Raise a clear :class:`NextScaleError` when ``state_dict`` is recognisably another kind of checkpoint than the
    one named ``expected`` (an unrecognised one is left to the strict key check, whose message lists the keys)."""
    found = identify(state_dict)
    if found is not None and str(found) != expected:
        raise NextScaleError(
            f"{what} file '{path}' is {found.describe()}; expected {FAMILIES.kind(expected).describe()}"
        )
