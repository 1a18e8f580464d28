"""The pack's one user-facing error type.

Every problem a user can cause (a wrong file, a bad input, a model mismatch) is raised as
:class:`NextScaleError` with a message that names what was wrong and how to fix it. Nodes let
it propagate so that ComfyUI shows the message in the UI and keeps running.
"""


class NextScaleError(ValueError):
    """A clear, actionable error: what is wrong, where, and how to fix it."""


# ComfyUI names an error's type ``module.qualname`` unless the module is ``builtins``, and loads the pack under its
# folder's path, so the UI would show ".../custom_nodes/comfyui-nextscale.models.core.errors.NextScaleError".
# Tracebacks name it the same way: "NextScaleError: <message>".
NextScaleError.__module__ = "builtins"
