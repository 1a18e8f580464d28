"""The ComfyUI node layer: thin V3 nodes, one file per feature, and the loading service. No math here."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from ..kernels.triton_support import triton_status
from . import (
    collaborative,
    control,
    dd,
    editing,
    generator,
    images,
    infinity,
    kv,
    lora,
    schedule,
    switti,
    text_encoder,
    tokenizer,
)
from .model_files import register_model_folder

log = logging.getLogger("NextScale")

FAMILIES = [
    schedule, tokenizer, generator, editing, collaborative, control, kv, images, infinity, text_encoder, lora, switti,
    dd,
]


class NextScaleExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.3.75 never calls ComfyExtension.on_load, so start-up work happens here (called once).
        register_model_folder()
        available, detail = triton_status()
        if not available:
            log.warning("NextScale: Triton is not available (%s); attention and quantizer kernels use PyTorch.", detail)
        return [node for family in FAMILIES for node in family.NODES]
