"""Assertions shared by the scripts that run node code inside ComfyUI's Python (:func:`.testbed.run_in_comfyui_python`,
which puts ``tests/`` on the path after booting ComfyUI, so that ``nextscale`` imports)."""

from __future__ import annotations


def raises(fn, *needles: str) -> str:
    """Call ``fn``; it must raise the pack's ``NextScaleError`` with every one of ``needles`` in its message, which
    is returned."""
    from nextscale.models.core.errors import NextScaleError

    try:
        fn()
    except NextScaleError as e:
        for n in needles:
            assert n in str(e), (n, str(e))
        return str(e)
    raise AssertionError(f"no NextScaleError (wanted {needles})")
