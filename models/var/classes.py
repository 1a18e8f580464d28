"""Class names of class-conditional generators and the parsing of user class lists.

Official VAR checkpoints are trained on ImageNet-1k: their class ``i`` is the ``i``-th name of
``imagenet_classes.json`` (torchvision's ordering of the 1000 synsets). Other generators (the
embedded model, user-trained ones) carry their own names in their config.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

from ..core.errors import NextScaleError


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.json"), encoding="utf-8") as f:
        names = tuple(json.load(f))
    assert len(names) == 1000
    return names


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet names for 1000-class models, ``"0".."n-1"`` otherwise."""
    if num_classes == 1000:
        return imagenet_class_names()
    return tuple(str(i) for i in range(num_classes))


SHOWN_CLASSES = 32  # a message lists every class of a generator with at most this many


def shown_classes(names: Sequence[str]) -> str:
    """The generator's classes for a message: all of them, or the first ones and the count."""
    if len(names) <= SHOWN_CLASSES:
        return ", ".join(names)
    return f"{', '.join(names[:12])}, ... ({len(names)} classes)"


def class_index(entry: str, names: Sequence[str]) -> int:
    """Index of one class given by name (case-insensitive) or by integer index."""
    text = entry.strip()
    shown = shown_classes(names)
    if not text:
        raise NextScaleError(f"no class given: name one of this generator's classes ({shown}) or give its index")
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lstrip("-").isdigit():
        i = int(text)
        if 0 <= i < len(names):
            return i
        raise NextScaleError(f"class index {i} is outside 0..{len(names) - 1} for this generator")
    imagenet = text.lower() in (n.lower() for n in imagenet_class_names())
    origin = f" ('{text}' is an ImageNet-1k class, for the official VAR checkpoints)" if imagenet else ""
    raise NextScaleError(f"'{text}' is not a class of this generator{origin}; its classes are: {shown}")


def parse_class_list(text: str, names: Sequence[str]) -> list[int]:
    """``"circle, star, 3"`` -> class indices. An empty string gives an empty list."""
    if not text or not text.strip():
        return []
    parts = text.split(",")
    if any(not part.strip() for part in parts):
        raise NextScaleError(f"class list '{text}' has an empty entry (two commas in a row, or a trailing comma)")
    return [class_index(part, names) for part in parts]
