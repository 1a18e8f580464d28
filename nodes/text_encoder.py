"""flan-t5-xl, Infinity's text encoder, as a standard ComfyUI ``CLIP`` built on ComfyUI's own T5.

Infinity (text-to-image) conditions on the last hidden state of the google/flan-t5-xl encoder (after its final layer
norm; 2048 wide): prompts of at most 512 tokens with the end-of-sequence token, cut when longer. Upstream pads to 512
and keeps the real tokens through the attention mask; attention over the real tokens alone is the same thing, so here
nothing is padded.

- The model is ComfyUI's ``comfy.text_encoders.t5.T5`` inside a ``sd1_clip.SDClipModel``, configured by
  ``flan_t5_xl_config.json`` (the published flan-t5-xl config; ``dense_act_fn`` carries ComfyUI's name of the
  tanh-approximated GELU, which Hugging Face calls ``gelu_new``). Its shape fields are overridden by those read from the
  weights, so smaller T5 encoders load too; :func:`check_text_width` is what refuses a wrong width, at the sampler.
- The tokenizer is ComfyUI's ``t5_tokenizer`` (the T5 SentencePiece vocabulary flan-t5 uses; pad 0, eos 1), unpadded
  like PixArt's, cut to 512 tokens like upstream's ``truncation=True, max_length=512``.
- The result is a ``comfy.sd.CLIP``: ComfyUI's memory management, ``(word:1.2)`` weighting and the stock
  ``CLIPTextEncode`` node work with it. The CONDITIONING it gives is ``[[cond, {"pooled_output": None}]]`` with
  ``cond`` float32 ``(1, tokens, 2048)`` on ComfyUI's intermediate device; no attention mask (every token is real).

Files live in ``ComfyUI/models/text_encoders/``: a single weights file, or a Hugging Face folder (listed by its name).
The embedded text-to-image model's own T5 (``nextscale-embedded-t2i``, :mod:`.model_files`) is listed first while
its file is in the pack, and loads the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading

import comfy.sd
import comfy.supported_models_base
import comfy.text_encoders.t5
import comfy.utils
import folder_paths
import torch
from comfy import sd1_clip
from comfy_api.latest import io
from safetensors import SafetensorError, safe_open
from transformers import T5TokenizerFast

from ..models.core.checkpoint import check_state_dict, check_tensors, read_state_dict
from ..models.core.errors import NextScaleError
from ..models.core.family import describe, identify
from .model_files import TEXT_ENCODE_NODE, embedded_choices, embedded_missing, resolve_embedded
from .sockets import CATEGORY
from .validation import check_file

log = logging.getLogger("NextScale")

TEXT_CATEGORY = f"{CATEGORY}/infinity"
FOLDER = "text_encoders"
EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt")
CONFIG_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flan_t5_xl_config.json")
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.realpath(comfy.text_encoders.t5.__file__)), "t5_tokenizer")
NAME = "flan_t5_xl"  # ComfyUI's clip name: the key of the tokens dict and the prefix of tokenizer options
MAX_TOKENS = 512  # upstream's max_length, the end-of-sequence token included
INFINITY_TEXT_WIDTH = 2048
T5_VOCAB_ROWS = (32100, 32128)  # the SentencePiece vocabulary + 100 sentinels, padded to 32128 in flan-t5 files
RELATIVE_BUCKETS = 32  # fixed in ComfyUI's T5 (as is the maximum distance 128 and the layer-norm epsilon 1e-6)
# Config fields read from the weights; they override the JSON (identical for flan-t5-xl itself).
SHAPE_FIELDS = ("d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size", "is_gated_act", "dense_act_fn")
WIDTH_KEY = "nextscale_t5_width"  # tokenizer_data entry: the width of textual-inversion embeddings

HINT = (
    "Infinity uses flan-t5-xl, published in the Hugging Face repository google/flan-t5-xl: put its folder "
    "(config.json, model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json) "
    "or a single .safetensors file of its encoder into ComfyUI/models/text_encoders/, then refresh the node"
)
KNOWN_WIDTHS = {
    512: "t5-small / flan-t5-small",
    768: "t5-base / flan-t5-base",
    1024: "t5-large / flan-t5-large",
    4096: "t5-xxl / flan-t5-xxl, the encoder of Flux, SD3 and PixArt",
}

FINAL_NORM = "encoder.final_layer_norm.weight"
REL_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
ANCHORS = (FINAL_NORM, "encoder.block.0.layer.0.SelfAttention.q.weight")  # keys that place the T5 encoder in a file
SKIPPED = ("decoder.", "lm_head.")  # the decoder half of T5ForConditionalGeneration files, never read
_BLOCK = re.compile(r"encoder\.block\.(\d+)\.")
_SHARD = re.compile(r"(?P<stem>model|pytorch_model)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<ext>\.safetensors|\.bin)")


def load_config() -> dict:
    """The flan-t5-xl config ComfyUI's T5 is built from (before the shape fields read from the weights)."""
    with open(CONFIG_PATH, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------------
# Files: the combo, Hugging Face folders, resolving a choice


def _hf_layout(folder: str) -> tuple[str, str, list[str]] | None:
    """``(stem, extension, files present)`` of a Hugging Face weights layout (safetensors preferred), or None."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    for stem, ext in (("model", ".safetensors"), ("pytorch_model", ".bin")):
        shards = sorted(n for n in names if (m := _SHARD.fullmatch(n)) and m["stem"] == stem and m["ext"] == ext)
        if shards or f"{stem}{ext}.index.json" in names:
            return stem, ext, shards
        if f"{stem}{ext}" in names:
            return stem, ext, [f"{stem}{ext}"]
    return None


def _hf_folders(base: str, max_depth: int = 2) -> list[str]:
    """Sub-folders of ``base`` (up to ``max_depth`` deep, '/'-separated) holding a Hugging Face weights layout."""
    found: list[str] = []

    def visit(folder: str, rel: str, depth: int) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            if _hf_layout(entry.path) is not None:
                found.append(sub)
            elif depth < max_depth:
                visit(entry.path, sub, depth + 1)

    visit(base, "", 1)
    return found


def text_encoder_choices() -> list[str]:
    """The embedded text-to-image model's T5 (while its file is there), then the weight files in ComfyUI's
    ``text_encoders`` folder plus its Hugging Face sub-folders (by folder name); the files inside such a folder are
    represented by the folder. Of those, names containing 'flan' come first."""
    folders: list[str] = []
    for base in folder_paths.get_folder_paths(FOLDER):
        folders.extend(f for f in _hf_folders(base) if f not in folders)
    inside = tuple(f"{f}/" for f in folders)
    files = [
        f
        for f in folder_paths.get_filename_list(FOLDER)
        if f.lower().endswith(EXTENSIONS) and not f.replace(os.sep, "/").startswith(inside)
    ]
    embedded = embedded_choices(TEXT_ENCODE_NODE, "text_encoder")
    return embedded + sorted((n for n in folders + files if n not in embedded), key=lambda n: "flan" not in n.lower())


def _not_found(name: str) -> str:
    missing = embedded_missing(TEXT_ENCODE_NODE, "text_encoder", name)
    if missing is not None:
        return missing
    folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
    return f"text encoder model not found: '{name}' is not in models/text_encoders ({folders}). {HINT}"


def resolve_text_encoder(name: str) -> str:
    """Full path of a combo choice: the embedded T5's file, a file, or a Hugging Face folder."""
    embedded = resolve_embedded(TEXT_ENCODE_NODE, "text_encoder", name)
    if embedded is not None:
        return embedded
    path = folder_paths.get_full_path(FOLDER, name)
    if path is not None and os.path.isfile(path):
        return path
    for base in folder_paths.get_folder_paths(FOLDER):
        base = os.path.abspath(base)
        candidate = os.path.abspath(os.path.join(base, name))
        if os.path.commonpath((base, candidate)) == base and os.path.isdir(candidate) and _hf_layout(candidate):
            return candidate
    raise NextScaleError(_not_found(name))


def hf_weight_files(folder: str) -> list[str]:
    """The files to read from a Hugging Face folder: the single file, or the shards that hold encoder weights
    (from ``model.safetensors.index.json``), every one checked to be present."""
    layout = _hf_layout(folder)
    if layout is None:
        raise NextScaleError(
            f"folder '{folder}' holds no model weights (model.safetensors, model-00001-of-0000N.safetensors with "
            f"model.safetensors.index.json, or pytorch_model*.bin). {HINT}"
        )
    stem, ext, present = layout
    index = os.path.join(folder, f"{stem}{ext}.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            # the encoder's shards only; the tied encoder.embed_tokens copy is needed only without shared.weight
            tied = "shared.weight" in weight_map
            needed = sorted({
                str(v) for k, v in weight_map.items()
                if not str(k).startswith(SKIPPED) and not (tied and k == "encoder.embed_tokens.weight")
            })
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise NextScaleError(
                f"'{index}' is damaged (not a Hugging Face weight index with a 'weight_map'); download it again"
            ) from None
        if not needed or any(os.path.basename(n) != n for n in needed):
            raise NextScaleError(f"'{index}' lists no encoder weights (or names outside its folder); download it again")
    elif present and (m := _SHARD.fullmatch(present[0])):
        needed = [f"{stem}-{i:05d}-of-{m['n']}{ext}" for i in range(1, int(m["n"]) + 1)]
    else:
        needed = present
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise NextScaleError(
            f"the model folder '{folder}' is incomplete: {', '.join(missing)} missing. Download every part again "
            f"from the Hugging Face repository google/flan-t5-xl"
        )
    return [os.path.join(folder, n) for n in needed]


# ---------------------------------------------------------------------------------------------------------------------
# Weights: reading, key layout, config from shapes


def _read_file(path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(tensors without the decoder half, every key)``; safetensors read key by key, so that a full
    T5ForConditionalGeneration file never brings its decoder into memory."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            return {k: f.get_tensor(k) for k in keys if not k.startswith(SKIPPED)}, keys
    except (SafetensorError, OSError, ValueError, RuntimeError):
        pass  # a pickle, or a damaged file: the pack's safe reader tells which, with its usual messages
    state_dict = read_state_dict(path, what="text encoder")
    return {k: v for k, v in state_dict.items() if not k.startswith(SKIPPED)}, list(state_dict)


def looks_like(keys: list[str]) -> str:
    """What a state dict that is no T5 encoder looks like, from its keys."""
    kind = identify(dict.fromkeys(keys))
    if kind is not None:
        return describe(kind)
    signs = (
        (("text_model.", "transformer.resblocks.", "clip_l.", "clip_g."), "a CLIP text encoder (CLIP-L/G), not T5"),
        (("lora_", "lora."), "a LoRA"),
        (("model.diffusion_model.", "double_blocks.", "joint_blocks.", "input_blocks.", "transformer_blocks."),
         "a diffusion model or a full checkpoint"),
        (("model.layers.", "model.embed_tokens."), "a decoder-only language model (Llama, Qwen, Gemma ...)"),
        (("encoder.down", "decoder.up", "first_stage_model.", "quant_conv."), "a VAE"),
        (("embeddings.word_embeddings.", "encoder.layer.0.attention."), "a BERT-style encoder"),
        (("decoder.block.",), "the decoder half of a T5 model without its encoder"),
    )
    for starts, what in signs:
        if any(k.startswith(starts) or any(f".{s}" in k for s in starts) for k in keys):
            return what
    return "an unrecognised model"


def normalise_t5_keys(tensors: dict[str, torch.Tensor], keys: list[str], path: str) -> dict[str, torch.Tensor]:
    """HF ``T5EncoderModel`` keys (``shared.weight``, ``encoder.*``), from encoder-only or full files and from files
    that nest them under one prefix; the decoder, the LM head and the tied ``encoder.embed_tokens`` copy dropped."""
    anchor, tail = next(((k, a) for a in ANCHORS for k in tensors if k.endswith(a)), (None, ""))
    if anchor is None:
        shown = ", ".join(keys[:3]) or "none"
        raise NextScaleError(
            f"'{os.path.basename(os.path.normpath(path))}' is not a T5 text encoder: it looks like {looks_like(keys)} "
            f"(keys such as {shown}; a T5 encoder has shared.weight and encoder.block.*). {HINT}"
        )
    prefix = anchor[: -len(tail)]
    state_dict = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(SKIPPED)}
    embed = state_dict.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in state_dict and embed is not None:
        state_dict["shared.weight"] = embed
    return state_dict


def infer_t5_config(state_dict: dict[str, torch.Tensor], path: str = "") -> dict:
    """The shape fields of the config (:data:`SHAPE_FIELDS`) read from an HF-layout T5 encoder state dict: width from
    ``shared.weight``, layers from the block count, heads from the relative attention bias, d_ff from ``wi_0``."""
    name = os.path.basename(os.path.normpath(path)) if path else "the text encoder"

    def need(key: str, ndim: int) -> torch.Tensor:
        t = state_dict.get(key)
        if t is None:
            raise NextScaleError(
                f"T5 text encoder '{name}' lacks the key '{key}': the file is incomplete or damaged; download it "
                f"again. {HINT}"
            )
        if t.ndim != ndim:
            raise NextScaleError(f"T5 text encoder '{name}': '{key}' has shape {list(t.shape)}; the file is damaged")
        return t

    vocab, d_model = need("shared.weight", 2).shape
    if not T5_VOCAB_ROWS[0] <= vocab <= T5_VOCAB_ROWS[1]:
        raise NextScaleError(
            f"'{name}' is a T5 model with a {vocab}-token vocabulary; flan-t5-xl uses the T5 SentencePiece vocabulary "
            f"({T5_VOCAB_ROWS[1]} rows; 250112 or 256384 rows are mT5 / umT5, with another tokenizer). {HINT}"
        )
    buckets, heads = need(REL_BIAS, 2).shape
    if buckets != RELATIVE_BUCKETS:
        raise NextScaleError(
            f"'{name}' has {buckets} relative-position buckets; T5 (and ComfyUI's T5) uses {RELATIVE_BUCKETS}. {HINT}"
        )
    if "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in state_dict:
        raise NextScaleError(
            f"'{name}' has a relative attention bias in every layer: it is an umT5-style model (such as Pile-T5, "
            f"AuraFlow's text encoder) with another tokenizer, not flan-t5-xl. {HINT}"
        )
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight", 2).shape[0]
    if heads == 0 or inner % heads:
        raise NextScaleError(
            f"'{name}': attention width {inner} is not a multiple of {heads} heads; the file is damaged"
        )
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state_dict
    d_ff = need(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight", 2).shape[0]
    num_layers = max(int(m[1]) for k in state_dict if (m := _BLOCK.match(k))) + 1
    return {
        "d_model": int(d_model),
        "num_layers": num_layers,
        "num_heads": int(heads),
        "d_kv": int(inner // heads),
        "d_ff": int(d_ff),
        "vocab_size": int(vocab),
        "is_gated_act": gated,
        # T5 v1.1 / flan-t5: gated GELU (tanh approximation; HF 'gelu_new'); original T5: ReLU
        "dense_act_fn": "gelu_pytorch_tanh" if gated else "relu",
    }


def expected_t5_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every key of an HF-layout T5 encoder with its shape."""
    d, ff, inner = config["d_model"], config["d_ff"], config["num_heads"] * config["d_kv"]
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (config["vocab_size"], d), FINAL_NORM: (d,)}
    ffn = ("wi_0", "wi_1") if config["is_gated_act"] else ("wi",)
    for i in range(config["num_layers"]):
        p = f"encoder.block.{i}.layer"
        for w in "qkv":
            shapes[f"{p}.0.SelfAttention.{w}.weight"] = (inner, d)
        shapes[f"{p}.0.SelfAttention.o.weight"] = (d, inner)
        shapes[f"{p}.0.layer_norm.weight"] = (d,)
        for w in ffn:
            shapes[f"{p}.1.DenseReluDense.{w}.weight"] = (ff, d)
        shapes[f"{p}.1.DenseReluDense.wo.weight"] = (d, ff)
        shapes[f"{p}.1.layer_norm.weight"] = (d,)
    shapes[REL_BIAS] = (RELATIVE_BUCKETS, config["num_heads"])
    return shapes


def read_t5_encoder(path_or_folder: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state dict in HF T5EncoderModel keys, shape config)`` from a file or a Hugging Face folder, every key and
    shape checked."""
    files = [path_or_folder] if os.path.isfile(path_or_folder) else None
    if files is None:
        if not os.path.isdir(path_or_folder):
            raise NextScaleError(_not_found(path_or_folder))
        files = hf_weight_files(path_or_folder)
    tensors: dict[str, torch.Tensor] = {}
    keys: list[str] = []
    for file in files:
        part, part_keys = _read_file(file)
        tensors.update(part)
        keys.extend(part_keys)
    state_dict = normalise_t5_keys(tensors, keys, path_or_folder)
    config = infer_t5_config(state_dict, path_or_folder)
    try:
        check_state_dict(state_dict, expected_t5_shapes(config), path_or_folder, "T5 text encoder")
    except NextScaleError as e:
        fp8 = any(k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input")) for k in state_dict)
        extra = " fp8-scaled files are not supported: use the fp16, bf16 or fp32 weights." if fp8 else ""
        raise NextScaleError(
            f"{e}. The file is incomplete or damaged (download it again), or not a plain T5 encoder (its first keys "
            f"say {config['num_layers']} layers, {config['d_model']} wide).{extra} {HINT}"
        ) from None
    check_tensors(state_dict, path_or_folder, "T5 text encoder")
    return state_dict, config


def check_text_width(width: int, expected: int = INFINITY_TEXT_WIDTH) -> None:
    """Raise a clear error when text features of ``width`` cannot condition a model that expects ``expected``
    (the sampler calls this with the conditioning's last dimension)."""
    if width == expected:
        return
    known = f" ({KNOWN_WIDTHS[width]}: the wrong model)" if width in KNOWN_WIDTHS else ""
    fix = (
        "Infinity was trained with flan-t5-xl (2048 wide), from the Hugging Face repository google/flan-t5-xl: pick "
        "it in NextScale Text Encode (T5)"
        if expected == INFINITY_TEXT_WIDTH
        else "pick the text encoder this model was trained with in NextScale Text Encode (T5)"
    )
    raise NextScaleError(
        f"the text encoder gives {width}-wide features{known}, but this model expects {expected}-wide ones. {fix}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# The ComfyUI CLIP: model, tokenizer, loading and the one-entry cache


class FlanT5XLModel(sd1_clip.SDClipModel):
    """ComfyUI's T5 from the flan-t5-xl config; output: the last layer after the final layer norm, no mask."""

    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options=None):
        super().__init__(
            device=device,
            layer=layer,
            layer_idx=layer_idx,
            textmodel_json_config=CONFIG_PATH,
            dtype=dtype,
            special_tokens={"end": 1, "pad": 0},
            model_class=comfy.text_encoders.t5.T5,
            enable_attention_masks=False,
            zero_out_masked=False,
            model_options=model_options or {},
        )


class FlanT5XLClipModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
        super().__init__(
            device=device, dtype=dtype, model_options=model_options or {}, name=NAME, clip_model=FlanT5XLModel, **kwargs
        )


class FlanT5XLTokenizer(sd1_clip.SDTokenizer):
    """T5 SentencePiece tokens, no padding (at least the end token), cut to 512 with the end token kept last."""

    def __init__(self, embedding_directory=None, tokenizer_data=None):
        tokenizer_data = tokenizer_data or {}
        super().__init__(
            TOKENIZER_DIR,
            max_length=99999999,  # one sequence: ComfyUI would otherwise split long prompts into chunks
            pad_with_end=False,
            embedding_directory=embedding_directory,
            embedding_size=tokenizer_data.get(WIDTH_KEY, INFINITY_TEXT_WIDTH),
            embedding_key=NAME,
            tokenizer_class=T5TokenizerFast,
            has_start_token=False,
            pad_to_max_length=False,
            min_length=1,
            tokenizer_data=tokenizer_data,
        )

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        batches = super().tokenize_with_weights(text, return_word_ids, **kwargs)
        tokens = [t for batch in batches for t in batch]
        if len(tokens) > MAX_TOKENS:  # upstream: truncation=True, max_length=512, '</s>' last
            end = (self.end_token, 1.0, 0) if return_word_ids else (self.end_token, 1.0)
            tokens = [*tokens[:MAX_TOKENS - 1], end]
        return [tokens]


class FlanT5XLTokenizers(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data=None):
        super().__init__(
            embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {}, name=NAME,
            tokenizer=FlanT5XLTokenizer,
        )


def build_clip(state_dict: dict[str, torch.Tensor], config: dict, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """A ``comfy.sd.CLIP`` holding ``state_dict``. ``dtype`` None: ComfyUI's text-encoder dtype (its --fp16-text-enc
    style flags; fp16 by default). ComfyUI computes in float32 from the float32 token embeddings whatever the
    storage."""
    model_options: dict = {f"{NAME}_model_config": {k: config[k] for k in SHAPE_FIELDS}}
    if dtype is not None:
        model_options["dtype"] = dtype
    target = comfy.supported_models_base.ClipTarget(FlanT5XLTokenizers, FlanT5XLClipModel)
    clip = comfy.sd.CLIP(
        target,
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        parameters=comfy.utils.calculate_parameters(state_dict),
        tokenizer_data={WIDTH_KEY: config["d_model"]},
        model_options=model_options,
    )
    missing, unexpected = clip.load_sd(state_dict)
    if missing or unexpected:  # cannot happen after the strict check, unless ComfyUI's T5 changed its layout
        raise NextScaleError(
            f"ComfyUI's T5 did not take the text encoder's weights (missing: {list(missing)[:4]}, unexpected: "
            f"{list(unexpected)[:4]}); this ComfyUI version's T5 differs from the one NextScale supports (>= 0.3.75)"
        )
    return clip


_cache: dict[tuple, comfy.sd.CLIP] = {}  # one entry: positive and negative prompt nodes share one load
_cache_lock = threading.Lock()


def _stamp(path: str) -> tuple:
    files = [path] if os.path.isfile(path) else hf_weight_files(path)
    return tuple((os.path.basename(f), os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)


def load_flan_t5(path_or_folder: str, dtype: torch.dtype | None = None) -> comfy.sd.CLIP:
    """Load (or reuse) a T5 encoder file or Hugging Face folder as a ``comfy.sd.CLIP``. Cached by (real path,
    modification times, dtype), one entry."""
    if not os.path.exists(path_or_folder):
        raise NextScaleError(_not_found(path_or_folder))
    real = os.path.realpath(path_or_folder)
    key = (real, _stamp(real), dtype)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        _cache.clear()  # let the previous encoder go before the next one is read
    state_dict, config = read_t5_encoder(real)
    clip = build_clip(state_dict, config, dtype)
    del state_dict
    with _cache_lock:
        _cache.clear()
        _cache[key] = clip
    log.info(
        "NextScale: loaded text encoder '%s' (T5, %d layers, %d wide)",
        os.path.basename(real), config["num_layers"], config["d_model"],
    )
    return clip


# ---------------------------------------------------------------------------------------------------------------------
# The node


class NextScaleTextEncodeT5(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleTextEncodeT5",
            display_name=TEXT_ENCODE_NODE,
            category=TEXT_CATEGORY,
            description="Encodes a prompt with flan-t5-xl, the text encoder of Infinity (text-to-image): at most 512 "
            "tokens (longer prompts are cut, as upstream), no padding, features of the encoder's last layer (2048 "
            "wide). Gives standard conditioning for a sampler's positive or negative input; ComfyUI's (word:1.2) "
            "weighting works. Nodes using the same file share one loaded encoder. The pack's embedded text-to-image "
            "model has its own small T5 (nextscale-embedded-t2i, 128 wide), encoded the same way.",
            inputs=[
                io.Combo.Input(
                    "text_encoder",
                    options=text_encoder_choices(),
                    tooltip="From ComfyUI/models/text_encoders/: flan-t5-xl from the Hugging Face repository "
                    "google/flan-t5-xl, either its folder (listed by folder name) or a single .safetensors file of "
                    "its encoder. 'nextscale-embedded-t2i' is the T5 the pack's embedded text-to-image model was "
                    "trained with (for that model only).",
                ),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The prompt. (word:1.2) weights a word; prompts longer than 512 tokens are cut.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    "conditioning",
                    display_name="conditioning",
                    tooltip="The prompt's T5 features (1 x tokens x 2048 with flan-t5-xl, no padding) for the "
                    "sampler's positive or negative input."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, text_encoder: str) -> bool | str:
        return check_file(text_encoder, text_encoder_choices(), _not_found) or True

    @classmethod
    def execute(cls, text_encoder: str, text: str) -> io.NodeOutput:
        clip = load_flan_t5(resolve_text_encoder(text_encoder))
        return io.NodeOutput(clip.encode_from_tokens_scheduled(clip.tokenize(text)))


NODES = [NextScaleTextEncodeT5]
