"""Input validation that ComfyUI 0.3.75 does not do for V3 nodes.

- Combos: its validator checks combo values only for V1-style list combos; a V3 ``io.Combo`` arrives as
  ``("COMBO", {"options": ...})`` and an unknown value would reach ``execute``.
- Floats: its min/max check passes NaN (every comparison with NaN is false), which would reach a model as a raw
  torch error.

Each node defines ``validate_inputs`` naming exactly the inputs it checks and returns the first failing check
(``check_file(...) or check_combos(...) or check_numbers(...) or True``). ComfyUI shows a failure under every input
the function names and skips its own checks for those inputs only, so a loader names only its file input: the one
missing-file message then stands on the input that names the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from comfy_api.latest import io


def check_combos(**choices: tuple[object, Sequence[object]]) -> str | None:
    """``check_combos(name=(value, options), ...)``: None, or a message naming the input and its choices."""
    for name, (value, options) in choices.items():
        if value not in options:
            shown = ", ".join(map(str, list(options)[:12])) + (", ..." if len(options) > 12 else "")
            return f"{name} = {value!r} is not one of the choices: {shown or 'none available'}"
    return None


def check_file(name: str, options: Sequence[str], not_found: Callable[[str], str]) -> str | None:
    """None when the file choice ``name`` is offered, else ``not_found(name)``: the folder, the file and where it is
    published."""
    return None if name in options else not_found(name)


def check_numbers(node: type[io.ComfyNode], **values: float | None) -> str | None:
    """None, or a message naming the first float input of ``node`` whose value is NaN, infinite or outside the
    input's min..max (None: an optional input left out)."""
    bounds = {i.id: (i.min, i.max) for i in node.define_schema().inputs if isinstance(i, io.Float.Input)}
    for name, value in values.items():
        if value is None:
            continue
        low, high = bounds[name]
        if not math.isfinite(value):
            return f"{name} = {value} is not a number: give a value from {low} to {high}"
        if not low <= value <= high:
            return f"{name} = {value} is outside {low} to {high}"
    return None
