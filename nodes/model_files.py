"""Model files: the ``models/nextscale`` folder, the embedded models, combo choices and file metadata.

Files live in ``ComfyUI/models/nextscale/`` (plus any ``nextscale:`` paths a user configured in
``extra_model_paths.yaml``, which are kept). The embedded models shipped in ``weights/`` are listed first, each in
the inputs of its own loader node only (:data:`EMBEDDED_FILES`, keyed by loader and role): :data:`EMBEDDED` (the VAR
generator and tokenizer), :data:`EMBEDDED_CONTROL` (the edge adapter) and :data:`EMBEDDED_T2I` (the text-to-image
model: Infinity generator and BSQ tokenizer, and its T5 text encoder). A choice is listed only while its file is
there. Loading is the service's (:mod:`.service`).
"""

from __future__ import annotations

import json
import os

import folder_paths

from ..models.core.checkpoint import read_safetensors_metadata, shard_files
from ..models.core.errors import NextScaleError
from ..models.infinity import family as infinity
from ..models.var import family as var

FOLDER = "nextscale"
EXTENSIONS = {".safetensors", ".pth", ".pt", ".ckpt", ".bin"}
EMBEDDED = "nextscale-embedded"
EMBEDDED_CONTROL = "nextscale-embedded-edges"
EMBEDDED_T2I = "nextscale-embedded-t2i"
# NEXTSCALE_EMBEDDED_DIR points the embedded models at another folder holding the same files (for developing a
# retrained embedded model without touching the pack's weights/).
WEIGHTS_DIR = os.environ.get("NEXTSCALE_EMBEDDED_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights"
)
TEXT_ENCODE_NODE = "NextScale Text Encode (T5)"
# (loader node, role) -> (choice, file) of the embedded models: a loader lists and resolves only its own, so the
# VAR loaders never reach the text-to-image files and NextScale Load Infinity never reaches VAR's.
EMBEDDED_FILES = {
    (var.TOKENIZER.loader, "tokenizer"): (EMBEDDED, os.path.join(WEIGHTS_DIR, "nextscale_tokenizer.safetensors")),
    (var.GENERATOR.loader, "generator"): (EMBEDDED, os.path.join(WEIGHTS_DIR, "nextscale_generator.safetensors")),
    (var.CAR.loader, "control"): (EMBEDDED_CONTROL, os.path.join(WEIGHTS_DIR, "nextscale_control_edges.safetensors")),
    (infinity.TOKENIZER.loader, "tokenizer"): (
        EMBEDDED_T2I, os.path.join(WEIGHTS_DIR, "nextscale_t2i_tokenizer.safetensors")),
    (infinity.GENERATOR.loader, "generator"): (
        EMBEDDED_T2I, os.path.join(WEIGHTS_DIR, "nextscale_t2i_generator.safetensors")),
    (TEXT_ENCODE_NODE, "text_encoder"): (
        EMBEDDED_T2I, os.path.join(WEIGHTS_DIR, "nextscale_t2i_text_encoder.safetensors")),
}
# choice -> the embedded model's JSON card (written by its recipe's evaluation)
EMBEDDED_CARDS = {
    EMBEDDED: os.path.join(WEIGHTS_DIR, "nextscale_embedded.json"),
    EMBEDDED_T2I: os.path.join(WEIGHTS_DIR, "nextscale_t2i.json"),
}
CONFIG_METADATA_KEY = "nextscale_config"


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


def embedded_file(loader: str, role: str, name: str) -> str | None:
    """The file of the embedded model ``name`` for the ``role`` input of the node ``loader``; None when ``name`` is
    no embedded choice there."""
    choice, path = EMBEDDED_FILES.get((loader, role), (None, None))
    return path if name == choice else None


def embedded_choices(loader: str | None, role: str | None) -> list[str]:
    """The embedded choice of the ``role`` input of the node ``loader`` while its file is there, else none."""
    choice, path = EMBEDDED_FILES.get((loader, role), (None, None))
    return [choice] if path is not None and os.path.isfile(path) else []


def embedded_missing(loader: str, role: str, name: str) -> str | None:
    """The message for ``name`` when it is the embedded choice of the ``role`` input of the node ``loader`` (its
    file is not in the pack); None otherwise."""
    path = embedded_file(loader, role, name)
    if path is None:
        return None
    return (
        f"the embedded model '{name}' is not installed: {path} is missing. Update or reinstall NextScale (or point "
        f"NEXTSCALE_EMBEDDED_DIR at a folder holding its files)"
    )


def resolve_embedded(loader: str, role: str, name: str) -> str | None:
    """The file of the embedded choice ``name`` of the ``role`` input of the node ``loader``, refused when it is not
    in the pack; None when ``name`` is no embedded choice there."""
    path = embedded_file(loader, role, name)
    if path is not None and not os.path.isfile(path):
        raise NextScaleError(embedded_missing(loader, role, name))
    return path


def model_choices(loader: str | None = None, role: str | None = None, shards: bool = False) -> list[str]:
    """Combo options: the embedded model of the ``role`` input of the node ``loader`` first (when shipped; None: no
    embedded model), then the files in the folder and, with ``shards``, its sub-folders holding a sharded
    checkpoint."""
    embedded = embedded_choices(loader, role)
    files = [f for f in folder_paths.get_filename_list(FOLDER) if f not in embedded]
    folders = []
    if shards:
        for base in folder_paths.get_folder_paths(FOLDER):
            if os.path.isdir(base):
                folders += [n for n in sorted(os.listdir(base))
                            if os.path.isdir(os.path.join(base, n)) and shard_files(os.path.join(base, n))]
    return embedded + files + [f for f in folders if f not in files]


def file_class_names(kind: str = "generator") -> list[str]:
    """Class names stored in the ``nextscale_config`` metadata of safetensors files in the model folder
    (user-trained generators), so that their classes can be picked in the sampler's combo."""
    names: list[str] = []
    for name in folder_paths.get_filename_list(FOLDER):
        path = folder_paths.get_full_path(FOLDER, name) if name.endswith(".safetensors") else None
        if path:
            names.extend(n for n in _metadata_class_names(path) if n not in names)
    return names


def generator_class_names(name: str) -> list[str] | None:
    """The classes of the generator choice ``name`` as far as they are known without loading it: the embedded
    model's card or a safetensors file's metadata. None otherwise (e.g. an official checkpoint, ImageNet-1k's)."""
    if name == EMBEDDED:
        return list(read_embedded_card().get("class_names", [])) or None
    if not name.endswith(".safetensors") or name not in folder_paths.get_filename_list(FOLDER):
        return None
    path = folder_paths.get_full_path(FOLDER, name)
    return (_metadata_class_names(path) or None) if path else None


def _metadata_class_names(path: str) -> list[str]:
    """``class_names`` of a safetensors file's ``nextscale_config`` metadata (cached by path and mtime)."""
    key = (path, os.path.getmtime(path))
    if key not in _class_name_cache:
        try:
            config = json.loads(read_safetensors_metadata(path).get(CONFIG_METADATA_KEY, "{}"))
            _class_name_cache[key] = [str(n) for n in (config.get("class_names") or [])]
        except (ValueError, AttributeError):
            _class_name_cache[key] = []
    return _class_name_cache[key]


_class_name_cache: dict[tuple, list[str]] = {}


def read_embedded_card(choice: str = EMBEDDED) -> dict:
    """The JSON card of the embedded model ``choice`` (class names or recommended sampling, schedule, metrics); {}
    when absent."""
    try:
        with open(EMBEDDED_CARDS[choice], encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}
