"""NextScale: scale-wise visual autoregressive generation (VAR family) for ComfyUI.

ComfyUI imports this package by folder name and calls :func:`comfy_entrypoint`.
The pure layers (``models/``, ``kernels/``) never import ComfyUI; the node layer is
imported lazily here so that ``models`` and ``kernels`` stay usable on their own.
"""

__version__ = "0.1.0"

# The frontend extension (socket colours, text reports on the node, titled templates), served under /extensions/.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import NextScaleExtension

    return NextScaleExtension()
