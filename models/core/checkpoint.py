"""Safe checkpoint reading and strict state-dict validation, shared by every loader.

Rules:
- The format is decided from the file's first bytes, not its extension.
- ``.safetensors`` is read with safetensors; pickles (``.pth``/``.pt``/``.ckpt``/``.bin``) only with
  ``torch.load(weights_only=True)``, which refuses any pickle that would construct arbitrary Python
  objects, so nothing in a file ever runs code.
- Published files nest their weights in different places (``['trainer']['var_wo_ddp']``, the EMA weights
  ``['trainer']['ema_parameters']`` first where a file holds both (Distilled Decoding samples with those),
  ``['vae']``, ``['ema']``, ``['state_dict']``, ...); :func:`read_state_dict` unwraps them.
- Every problem becomes a :class:`NextScaleError` that names the file, what was expected and what
  was found.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from typing import ClassVar

import torch

from .errors import NextScaleError

# Where published checkpoints keep their state dict, tried in order.
NESTING_KEYS = (
    "trainer", "ema_parameters", "var_wo_ddp", "gpt_fsdp", "model", "state_dict", "module", "vae", "ema", "net",
    "params",
)

_ZIP_MAGIC = b"PK\x03\x04"
_HTML_STARTS = (b"<", b"\xef\xbb\xbf<")


def _sniff(path: str) -> str:
    """Return 'safetensors', 'zip-pickle', 'pickle', 'html' or 'unknown' from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        return "empty"
    stripped = head.lstrip()
    if any(stripped.startswith(s) for s in _HTML_STARTS):
        return "html"
    if head.startswith(_ZIP_MAGIC):
        return "zip-pickle"
    if len(head) >= 9:  # before the pickle check: a header length of 128 + 256 k also starts with 0x80
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100 * 1024 * 1024 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def _describe(path: str) -> str:
    return f"'{path}'"


def read_state_dict(path: str, what: str = "model") -> dict[str, torch.Tensor]:
    """Read a flat ``{key: tensor}`` state dict from ``path`` safely.

    ``what`` names the expected content in error messages (e.g. "VAR tokenizer").
    """
    if not os.path.exists(path):
        raise NextScaleError(f"{what} file {_describe(path)} does not exist")
    if os.path.isdir(path):
        raise NextScaleError(f"{what} path {_describe(path)} is a folder; choose a .safetensors or .pth file inside it")
    kind = _sniff(path)
    if kind == "empty":
        raise NextScaleError(f"{what} file {_describe(path)} is empty (0 bytes); the download did not complete")
    if kind == "html":
        raise NextScaleError(
            f"{what} file {_describe(path)} is a web page, not weights: it was saved from a page link. "
            f"Download the file itself (on Hugging Face use the 'resolve/' link, not 'blob/')"
        )
    if kind == "safetensors":
        obj = _read_safetensors(path, what)
    elif kind in ("zip-pickle", "pickle"):
        obj = _read_pickle(path, what)
    else:
        raise NextScaleError(
            f"{what} file {_describe(path)} is neither safetensors nor a PyTorch checkpoint "
            f"(unrecognised first bytes); it may be truncated or of another format"
        )
    return _flatten(obj, path, what)


WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def shard_files(folder: str) -> list[str]:
    """The weight files of a sharded checkpoint folder: those its ``*.index.json`` maps keys to (Hugging Face
    layout), else every weight file in it; sorted. Empty when the folder holds none."""
    names = sorted(os.listdir(folder))
    for index in (n for n in names if n.endswith(".index.json")):
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as f:
                mapped = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise NextScaleError(f"shard index '{os.path.join(folder, index)}' is damaged; download it again") from None
        return [os.path.join(folder, n) for n in mapped]
    return [os.path.join(folder, n) for n in names if n.endswith(WEIGHT_EXTENSIONS)]


def read_sharded_state_dict(folder: str, what: str = "model") -> dict[str, torch.Tensor]:
    """One state dict from every shard of ``folder`` (each read as :func:`read_state_dict` reads a file); a key
    found in two shards, or a shard named by the index but absent, is an error."""
    files = shard_files(folder)
    if not files:
        raise NextScaleError(
            f"{what} folder {_describe(folder)} holds no weight files ({', '.join(WEIGHT_EXTENSIONS)})"
        )
    out: dict[str, torch.Tensor] = {}
    for path in files:
        if not os.path.isfile(path):
            raise NextScaleError(f"{what} shard {_describe(path)} named by the folder's index is missing; download it")
        part = read_state_dict(path, what)
        twice = sorted(set(part) & set(out))
        if twice:
            raise NextScaleError(f"{what} shard {_describe(path)} repeats keys of another shard: {_first(twice)}")
        out.update(part)
    return out


def read_weights(path: str, what: str = "model") -> dict[str, torch.Tensor]:
    """:func:`read_sharded_state_dict` for a folder, :func:`read_state_dict` for a file."""
    return read_sharded_state_dict(path, what) if os.path.isdir(path) else read_state_dict(path, what)


def _read_safetensors(path: str, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NextScaleError(
            f"{what} file {_describe(path)} is a damaged safetensors file ({e}); download it again"
        ) from None


def _read_pickle(path: str, what: str):
    try:
        if zipfile.is_zipfile(path):  # torch's own reader skips the CRC32s: damaged tensor bytes would load silently
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise NextScaleError(
                    f"{what} file {_describe(path)} is damaged: its part '{bad}' fails its checksum; download it again"
                )
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except NextScaleError:
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "global" in msg.lower():  # the restricted unpickler met a reference to Python code (any torch version)
            raise NextScaleError(
                f"{what} file {_describe(path)} was refused: it contains Python objects that could run code "
                f"when loaded, and NextScale only loads plain tensors. Use a .safetensors file, or a .pth that "
                f"holds only a state dict"
            ) from None
        detail = msg.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].strip() or msg
        raise NextScaleError(
            f"{what} file {_describe(path)} is not a plain PyTorch state dict or is damaged ({detail[:200]}); "
            f"download it again"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error, AttributeError, KeyError,
            IndexError, TypeError) as e:
        raise NextScaleError(
            f"{what} file {_describe(path)} could not be read as a PyTorch checkpoint "
            f"({type(e).__name__}: {str(e)[:200]}); it is probably truncated or damaged: download it again"
        ) from None


def _flatten(obj, path: str, what: str) -> dict[str, torch.Tensor]:
    """Unwrap nested checkpoints until a mapping of tensors remains."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise NextScaleError(
                f"{what} file {_describe(path)} holds a {type(obj).__name__}, not a state dict of tensors"
            )
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for key in NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                obj = tensors
                break
            raise NextScaleError(
                f"{what} file {_describe(path)} holds no tensors at its top level nor under any of "
                f"{', '.join(NESTING_KEYS)} (found keys: {', '.join(map(str, list(obj)[:8])) or 'none'})"
            )
    if not obj:
        raise NextScaleError(f"{what} file {_describe(path)} holds an empty state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise NextScaleError(f"{what} file {_describe(path)} has a non-tensor entry {k!r}")
        out[k] = v
    return out


def _first(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    path: str,
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Strict key and shape check. ``expected`` maps every key to its shape; keys in ``optional``
    (rebuildable buffers) may be absent, but are shape-checked when present."""
    optional = set(optional)
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} is {list(state_dict[k].shape)}, expected {list(expected[k])}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} key(s) with the wrong shape: {_first(misshaped, 3)}")
    raise NextScaleError(f"{what} file {_describe(path)} does not match the expected layout: " + "; ".join(parts))


def key_shape(
    state_dict: Mapping[str, torch.Tensor], key: str, ndim: int, path: str, what: str, if_missing: str
) -> tuple[int, ...]:
    """The shape of ``state_dict[key]``, for a loader's ``infer_config``. A missing key raises "<what> file
    '<path>' has no key '<key>'" followed by ``if_missing`` (what the file is not, and a hint), a tensor with
    another number of dimensions raises with its shape."""
    if key not in state_dict:
        raise NextScaleError(f"{what} file '{path}' has no key '{key}'{if_missing}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise NextScaleError(f"{what} file '{path}': key '{key}' has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def check_tensors(
    state_dict: Mapping[str, torch.Tensor], path: str, what: str, integer_keys: Iterable[str] = ()
) -> None:
    """Every tensor holds floating-point values (``integer_keys`` integers) and is not empty: what a damaged or
    hand-edited file would otherwise turn into a torch error deep inside the loader."""
    integer_keys = set(integer_keys)
    for k, v in state_dict.items():
        if v.numel() == 0:
            raise NextScaleError(
                f"{what} file {_describe(path)}: key '{k}' is empty (shape {list(v.shape)}); expected weights"
            )
        want_int = k in integer_keys
        if (v.is_floating_point() == want_int) or v.is_complex():
            kind = "integers" if want_int else "floating-point weights"
            raise NextScaleError(f"{what} file {_describe(path)}: key '{k}' holds {v.dtype} values; expected {kind}")


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, object] | None = None
) -> None:
    """Save contiguous copies of ``state_dict``; ``metadata`` values are JSON-encoded strings."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    save_file(tensors, path, metadata=meta)


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other formats)."""
    try:
        if _sniff(path) != "safetensors":
            return {}
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # metadata is advisory; read_state_dict reports real damage
        return {}


CONFIG_METADATA_KEY = "nextscale_config"


def config_from_metadata(path: str, from_dict, what: str):
    """The config stored as JSON under the safetensors metadata key ``nextscale_config`` (written by the models'
    ``save``), parsed by ``from_dict``; None when there is none (official files: the config is inferred)."""
    meta = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if meta is None:
        return None
    try:
        return from_dict(json.loads(meta))
    except (ValueError, TypeError) as e:  # NextScaleError is a ValueError
        raise NextScaleError(
            f"{what} file '{path}' has an invalid '{CONFIG_METADATA_KEY}' metadata entry: {e}"
        ) from None


class SavedConfig:
    """Mixin of the frozen dataclass configs a model saves in its file's metadata: :meth:`to_dict` (tuples as lists,
    for JSON) and :meth:`from_dict`, which names the model (``name``) in its refusals."""

    name: ClassVar[str]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NextScaleError(f"{cls.name} config has unknown field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:  # a required field is missing
            raise NextScaleError(f"{cls.name} config is incomplete: {e}") from None


def block_depth(
    state_dict: Mapping[str, torch.Tensor], path: str, what: str, prefix: str = "blocks", required: bool = True
) -> int:
    """The number of blocks named ``prefix``, whose keys must run ``<prefix>.0.* .. <prefix>.<n-1>.*`` without a gap
    (and hold at least one block when ``required``)."""
    pattern = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})
    if (required and not blocks) or blocks != list(range(len(blocks))):
        raise NextScaleError(
            f"{what} file '{path}' has {prefix} {blocks[:8]}...; expected {prefix}.0 ... {prefix}.<n-1>"
        )
    return len(blocks)


def shapes_on_meta(build) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the module ``build()`` makes, with its shape; built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_on_meta(build, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``build()`` on the meta device, then ``state_dict`` assigned strictly (the module takes the tensors over, so
    loading never holds two copies): a frozen fp32 module in eval mode. Check the keys and shapes first."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.float().eval().requires_grad_(False)


class SavedModel:
    """Mixin of the models read from official files and saved with their config in the safetensors metadata.

    A model class sets ``what`` (its name in refusals) and ``config_type`` (with ``from_dict``, as a
    :class:`SavedConfig`) and provides ``infer_config(state_dict, path)`` and ``rebuilt_buffers(config, device=None)``,
    the deterministic buffers a file may omit; :meth:`loadable` is where it drops or checks keys beyond those."""

    what: ClassVar[str]
    config_type: ClassVar[type]
    integer_keys: ClassVar[tuple[str, ...]] = ()  # keys that hold integers (``lvl_1L``), not floats
    anchor: ClassVar[str] = "class_emb.weight"  # the rebuilt buffers go to this tensor's device

    @classmethod
    def expected_shapes(cls, config) -> dict[str, tuple[int, ...]]:
        """Every state-dict key of a model with ``config`` and its shape, in state-dict order (meta device)."""
        return shapes_on_meta(lambda: cls(config))

    @classmethod
    def loadable(cls, state_dict: Mapping[str, torch.Tensor], config, path: str) -> Mapping[str, torch.Tensor]:
        """The part of ``state_dict`` that is checked against ``config`` and loaded (all of it by default)."""
        return state_dict

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        config=None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ):
        """A frozen fp32 model in eval mode holding ``state_dict``, checked strictly (key for key, every shape)
        against ``config`` (inferred when not given), built with ``operations`` to compute in ``compute_dtype``.
        Built on the meta device and taking the tensors over: loading never holds two copies."""
        check_tensors(state_dict, path, cls.what, integer_keys=list(cls.integer_keys))
        cfg = config or cls.infer_config(state_dict, path)
        sd = cls.loadable(state_dict, cfg, path)
        rebuildable = cls.rebuilt_buffers(cfg, device="meta").keys()  # names only: nothing allocated before the check
        check_state_dict(sd, cls.expected_shapes(cfg), path, cls.what, optional=rebuildable)
        anchor = sd.get(cls.anchor)
        rebuilt = cls.rebuilt_buffers(cfg, device=None if anchor is None else anchor.device)
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), {**sd, **rebuilt})

    @classmethod
    def config_from_file(cls, path: str):
        """The config stored under the safetensors metadata key ``nextscale_config`` (by :meth:`save`), or None."""
        return config_from_metadata(path, cls.config_type.from_dict, cls.what)

    def save(self, path: str) -> None:
        """Save as safetensors with the config in the metadata."""
        save_safetensors(self.state_dict(), path, {CONFIG_METADATA_KEY: self.config.to_dict()})
