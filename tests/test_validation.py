"""Validation of every node's inputs before anything runs: NaN and infinities in every float input, one
missing-file message per loader on the input that names the file, and the error type's name as ComfyUI shows it."""

import textwrap
import traceback

from harness.testbed import run_in_comfyui_python
from nextscale.models.core.errors import NextScaleError

NODE_CHECK = textwrap.dedent(
    """
    import inspect, math, os, tempfile
    import folder_paths
    from comfy_api.latest import io
    from nextscale.nodes import NODE_MODULES

    def defaults(node):
        # every input the node's validate_inputs names, at its default (a combo: its default or first option)
        inputs = {i.id: i for i in node.define_schema().inputs}
        names = list(inspect.signature(node.validate_inputs).parameters)
        values = {}
        for name in names:
            i = inputs[name]
            if isinstance(i, io.Combo.Input):
                values[name] = i.default if i.default is not None else (i.options or [""])[0]
            else:
                values[name] = i.default
        return values

    floats_checked = 0
    for node in [n for m in NODE_MODULES for n in m.NODES]:
        floats = [i for i in node.define_schema().inputs if isinstance(i, io.Float.Input)]
        if not floats:
            continue
        assert node.validate_inputs(**defaults(node)) is True, (node, node.validate_inputs(**defaults(node)))
        for i in floats:
            for bad in (math.nan, math.inf, -math.inf):
                message = node.validate_inputs(**{**defaults(node), i.id: bad})
                assert isinstance(message, str) and message.startswith(f"{i.id} = {bad}"), (node, i.id, message)
                assert f"from {i.min} to {i.max}" in message, message
            message = node.validate_inputs(**{**defaults(node), i.id: i.max + 1})
            assert message == f"{i.id} = {i.max + 1} is outside {i.min} to {i.max}", message
            floats_checked += 1
    assert floats_checked >= 20, floats_checked

    # a loader names only its file input, so ComfyUI shows one message, under that input
    from nextscale.nodes.control import NextScaleLoadControl
    from nextscale.nodes.generator import NextScaleLoadGenerator
    from nextscale.nodes.infinity import NextScaleLoadInfinity
    from nextscale.nodes.tokenizer import NextScaleLoadTokenizer

    models = tempfile.mkdtemp()
    folder_paths.add_model_folder_path("nextscale", models, is_default=True)
    for node, file, published in [
        (NextScaleLoadGenerator, "var_d16.pth", "FoundationVision/var"),
        (NextScaleLoadTokenizer, "vae_ch160v4096z32.pth", "FoundationVision/var"),
        (NextScaleLoadControl, "car_canny.safetensors", "Hugging Face"),
        (NextScaleLoadInfinity, "infinity_2b_reg.pth", "FoundationVision/Infinity"),
    ]:
        names = list(inspect.signature(node.validate_inputs).parameters)
        assert "dtype" not in names and len(names) == (2 if node is NextScaleLoadInfinity else 1), (node, names)
        values = {**defaults(node), names[0]: file}
        message = node.validate_inputs(**values)
        assert message.startswith("model not found: ") and f"'{file}'" in message, message
        assert models in message and published in message and "not one of the choices" not in message, message
    print("OK")
    """
)


def test_every_float_input_and_every_loader_validate(tmp_path):
    result = run_in_comfyui_python(NODE_CHECK, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def test_error_type_is_shown_by_its_name():
    """ComfyUI names an exception's type as execution.full_type_name does: module + qualname unless builtins."""
    klass = NextScaleError
    shown = klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"
    assert shown == "NextScaleError"
    assert traceback.format_exception_only(NextScaleError("no file")) == ["NextScaleError: no file\n"]
