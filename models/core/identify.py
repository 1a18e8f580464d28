"""Tell what kind of checkpoint a state dict is, from its keys alone.

Loaders call :func:`identify` before the strict key check, so that a tokenizer given to the
generator loader (and every other mix-up) gets an error that says what the file is and which node
loads it, instead of a list of 300 missing keys.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import NextScaleError

KINDS = {
    "var-tokenizer": "a VAR tokenizer (multi-scale VQ-VAE), loaded by 'NextScale Load Tokenizer'",
    "var-generator": "a VAR generator (transformer), loaded by 'NextScale Load Generator'",
    "infinity-generator": "an Infinity transformer (text-to-image), not a VAR model",
    "infinity-tokenizer": "an Infinity BSQ tokenizer, not the VAR tokenizer",
    "car-control": "a CAR control adapter, not a base model",
    "unknown": "not a checkpoint NextScale recognises",
}


def identify(state_dict: Mapping[str, object]) -> str:
    """One of the keys of :data:`KINDS`."""
    keys = set(state_dict)
    if any(k.startswith("car_") for k in keys):
        return "car-control"
    if (
        any(k.startswith("block_chunks.") for k in keys)
        or "cfg_uncond" in keys
        or any(k.startswith("text_norm") for k in keys)
    ):
        return "infinity-generator"
    if "class_emb.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "var-generator"
    if "quantize.embedding.weight" in keys and any(k.startswith("decoder.") for k in keys):
        return "var-tokenizer"
    if any(k.startswith("decoder.") for k in keys) and (
        any(k.startswith("quantizer.") or k.startswith("quantize.") for k in keys)
        or "decoder.conv_in.conv.weight" in keys  # the BSQ tokenizer's own layout (its mask buffer is optional)
    ):
        return "infinity-tokenizer"
    return "unknown"


def describe(kind: str) -> str:
    return KINDS.get(kind, KINDS["unknown"])


def expect_kind(state_dict: Mapping[str, object], path: str, expected: str, what: str) -> None:
    """Raise a clear :class:`NextScaleError` when ``state_dict`` is recognisably another kind of checkpoint than
    ``expected`` (an unrecognised one is left to the strict key check, whose message lists the keys)."""
    found = identify(state_dict)
    if found != expected and found != "unknown":
        raise NextScaleError(f"{what} file '{path}' is {describe(found)}; expected {describe(expected)}")
