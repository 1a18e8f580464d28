"""The ComfyUI node layer: thin V3 nodes, one file per feature, and the loading service. No math here."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from ..kernels.triton_support import triton_status
from . import (
    accel,
    collaborative,
    control,
    dd,
    editing,
    flexvar,
    generator,
    hmar,
    images,
    infinity,
    kv,
    lora,
    schedule,
    switti,
    text_encoder,
    tokenizer,
    upscale,
)
from .model_files import register_model_folder
from .routes import register_routes

log = logging.getLogger("NextScale")

# The node modules, each with its NODES list (not the model families: models.core.family.FAMILIES).
NODE_MODULES = [
    schedule, tokenizer, generator, accel, editing, collaborative, control, kv, images, infinity, text_encoder, lora,
    switti, upscale, dd, flexvar, hmar,
]


class NextScaleExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 never calls ComfyExtension.on_load, so start-up work happens here (called once).
        register_model_folder()
        register_routes()
        available, detail = triton_status()
        if not available:
            log.warning("NextScale: Triton is not available (%s); attention and quantizer kernels use PyTorch.", detail)
        return [node for module in NODE_MODULES for node in module.NODES]
