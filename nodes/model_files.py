"""Model files: the ``models/nextscale`` folder, the embedded model, loading and caching.

Files live in ``ComfyUI/models/nextscale/`` (plus any ``nextscale:`` paths a user configured in
``extra_model_paths.yaml``, which are kept). The embedded model shipped in ``weights/`` is always
listed first under the name :data:`EMBEDDED`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch

from ..models.core.checkpoint import read_safetensors_metadata
from ..models.core.errors import NextScaleError
from ..models.core.identify import describe, identify

log = logging.getLogger("NextScale")

FOLDER = "nextscale"
EXTENSIONS = {".safetensors", ".pth", ".pt", ".ckpt", ".bin"}
EMBEDDED = "nextscale-embedded"
# NEXTSCALE_EMBEDDED_DIR points the embedded model at another folder holding the same three files (for
# developing a retrained embedded model without touching the pack's weights/).
WEIGHTS_DIR = os.environ.get("NEXTSCALE_EMBEDDED_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights"
)
EMBEDDED_FILES = {
    "tokenizer": os.path.join(WEIGHTS_DIR, "nextscale_tokenizer.safetensors"),
    "generator": os.path.join(WEIGHTS_DIR, "nextscale_generator.safetensors"),
}
DTYPES = ["auto", "float32", "float16", "bfloat16"]
CONFIG_METADATA_KEY = "nextscale_config"

OFFICIAL_HINT = (
    "Official VAR files (vae_ch160v4096z32.pth, var_d16.pth ... var_d36.pth) are published in the "
    "Hugging Face repository FoundationVision/var"
)


def register_model_folder() -> None:
    """Add ``models/nextscale`` without dropping paths or extensions a user already configured."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, exts = entry
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


# Registered on import as well as from the extension's get_node_list, so that the nodes work when they are
# called directly (scripts, tests) before ComfyUI has asked the extension for its node list.
register_model_folder()


def model_choices(kind: str) -> list[str]:
    """Combo options: the embedded model (when shipped) first, then the files in the folder."""
    files = folder_paths.get_filename_list(FOLDER)
    embedded = [EMBEDDED] if os.path.isfile(EMBEDDED_FILES[kind]) else []
    return embedded + [f for f in files if f != EMBEDDED]


def resolve(name: str, kind: str) -> str:
    """Full path of a combo choice; a clear error naming the folder when it is missing."""
    if name == EMBEDDED:
        path = EMBEDDED_FILES[kind]
        if not os.path.isfile(path):
            raise NextScaleError(f"the embedded {kind} is missing from the pack: expected {path}; reinstall NextScale")
        return path
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise NextScaleError(
            f"{kind} file '{name}' was not found in the NextScale model folder ({folders}). "
            f"Put the file there and refresh the node. {OFFICIAL_HINT}"
        )
    return path


def resolve_dtype(choice: str, device: torch.device, kind: str) -> torch.dtype:
    if choice == "float32":
        return torch.float32
    if choice == "float16":
        return torch.float16
    if choice == "bfloat16":
        return torch.bfloat16
    if choice != "auto":
        raise NextScaleError(f"dtype '{choice}' is not one of {DTYPES}")
    if device.type == "cpu" or kind == "tokenizer":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float16


@dataclass
class LoadedModel:
    """A loaded model as it travels on a NEXTSCALE_TOKENIZER / NEXTSCALE_GENERATOR socket.

    ComfyUI's model management owns where the weights are: call :meth:`ready` before use.
    """

    module: torch.nn.Module
    name: str
    path: str
    dtype: torch.dtype
    patcher: comfy.model_patcher.ModelPatcher

    def ready(self) -> torch.nn.Module:
        mm.load_models_gpu([self.patcher])
        return self.module

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {type(self.module).__name__}, {self.dtype})"


_cache: OrderedDict[tuple, LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 4


def load_model(
    name: str, kind: str, dtype_choice: str, build: Callable[[str], torch.nn.Module], path: str | None = None
) -> LoadedModel:
    """Load (or reuse) a model file (or a folder of shards, given as ``path``). ``build(path)`` returns the module
    on the CPU in fp32. ``path`` defaults to the combo choice ``name`` resolved in the NextScale folder."""
    path = path or resolve(name, kind)
    stat = os.stat(path)
    load_device = mm.get_torch_device()
    dtype = resolve_dtype(dtype_choice, load_device, kind)
    key = (kind, os.path.realpath(path), stat.st_mtime_ns, stat.st_size, dtype)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    module = build(path).to(dtype=dtype).eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=mm.unet_offload_device())
    loaded = LoadedModel(module=module, name=name, path=path, dtype=dtype, patcher=patcher)
    with _cache_lock:
        _cache[key] = loaded
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    log.info("NextScale: loaded %s '%s' (%s)", kind, name, dtype)
    return loaded


def check_kind(state_dict, path: str, expected: str) -> None:
    """Raise a clear error when a file is of another kind than the loader expects."""
    found = identify(state_dict)
    if found != expected:
        raise NextScaleError(
            f"'{os.path.basename(path)}' is {describe(found)}; this node expects {describe(expected)}. "
            f"{OFFICIAL_HINT}"
        )


def file_class_names(kind: str = "generator") -> list[str]:
    """Class names stored in the ``nextscale_config`` metadata of safetensors files in the model folder
    (user-trained generators), so that their classes can be picked in the sampler's combo."""
    names: list[str] = []
    for name in folder_paths.get_filename_list(FOLDER):
        if not name.endswith(".safetensors"):
            continue
        path = folder_paths.get_full_path(FOLDER, name)
        key = (path, os.path.getmtime(path)) if path else None
        if key is None:
            continue
        if key not in _class_name_cache:
            try:
                config = json.loads(read_safetensors_metadata(path).get(CONFIG_METADATA_KEY, "{}"))
                _class_name_cache[key] = [str(n) for n in (config.get("class_names") or [])]
            except (ValueError, AttributeError):
                _class_name_cache[key] = []
        names.extend(n for n in _class_name_cache[key] if n not in names)
    return names


_class_name_cache: dict[tuple, list[str]] = {}


def read_embedded_card() -> dict:
    """The embedded model's JSON card (class names, schedule, metrics); {} when absent."""
    path = os.path.join(WEIGHTS_DIR, "nextscale_embedded.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
