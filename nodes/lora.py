"""NextScale Load LoRA: a LoRA from training/train_lora.py on a VAR generator or an Infinity transformer.

The LoRA goes through ComfyUI's own machinery: the node clones the model's ``ModelPatcher`` and adds one
``comfy.weight_adapter.LoRAAdapter`` patch per adapted weight. The base weights are never changed in place by the
node: ComfyUI patches them when it loads the clone for sampling and puts the originals back when it unloads it, so
the unpatched model (and every other clone) samples exactly as before. Chaining nodes stacks LoRAs.
"""

from __future__ import annotations

import dataclasses
import os

import folder_paths
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from ..models.core.family import describe, identify
from ..models.core.lora import LoRA, check_fits, read_lora
from .model_files import WEIGHTS_DIR
from .sockets import CATEGORY, Generator, InfinityModel
from .validation import check_file, check_numbers

FOLDER = "loras"  # ComfyUI/models/loras, where ComfyUI keeps every LoRA
# Either transformer socket: the output carries the kind that came in.
Transformer = io.Custom(f"{Generator.io_type},{InfinityModel.io_type}")
FAMILY_KINDS = {"var": "var-generator", "infinity": "infinity-generator"}
# the pack's example: the embedded generator draws outlines instead of filled shapes (docs/fine-tuning.md)
EMBEDDED_LORAS = {"nextscale-embedded-outline": os.path.join(WEIGHTS_DIR, "nextscale_lora_outline.safetensors")}


def lora_choices() -> list[str]:
    """The pack's example LoRAs (when shipped) first, then the files in ComfyUI's loras folder."""
    embedded = [name for name, path in EMBEDDED_LORAS.items() if os.path.isfile(path)]
    return embedded + [f for f in folder_paths.get_filename_list(FOLDER) if f not in EMBEDDED_LORAS]


def not_found(name: str) -> str:
    folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
    return (f"LoRA '{name}' was not found in ComfyUI's loras folder ({folders}): put the file there and refresh the "
            f"node; LoRAs are trained with python -m training.train_lora (docs/fine-tuning.md)")


def resolve_lora(name: str) -> str:
    path = EMBEDDED_LORAS.get(name) or folder_paths.get_full_path(FOLDER, name)
    if path is None or not os.path.isfile(path):
        raise NextScaleError(not_found(name))
    return path


def comfy_patches(lora: LoRA) -> dict[str, LoRAAdapter]:
    """ComfyUI's patch for each weight the LoRA adapts: ``LoRAAdapter`` on ``(up, down, alpha, mid, dora_scale,
    reshape)``, which adds ``strength * alpha / rank * up @ down`` to the weight."""
    return {key: LoRAAdapter(set(), (w.up, w.down, w.alpha, None, None, None)) for key, w in lora.weights.items()}


def with_lora(model, lora: LoRA, strength: float, lora_name: str):
    """``model`` (a loaded transformer: ``.module`` and ``.patcher``) with ``lora`` added at ``strength`` to a clone
    of its patcher; ``model`` itself is unchanged."""
    state = model.module.state_dict()
    family = lora.config.get("family")
    kind = identify(state)
    if family in FAMILY_KINDS and FAMILY_KINDS[family] != str(kind):
        raise NextScaleError(f"'{lora_name}' is {lora.describe()}, but the connected model is {describe(kind)}: use "
                             f"a LoRA trained on this model")
    check_fits(lora, {k: tuple(v.shape) for k, v in state.items()}, f"'{lora_name}'")
    patcher = model.patcher.clone()
    patcher.add_patches(comfy_patches(lora), float(strength))
    return dataclasses.replace(model, patcher=patcher)


class NextScaleLoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NextScaleLoadLoRA",
            display_name="NextScale Load LoRA",
            category=CATEGORY,
            description="Applies a LoRA trained with training/train_lora.py to a VAR generator or an Infinity "
            "transformer, through ComfyUI's model patcher: the weights are patched only while the model samples and "
            "restored exactly afterwards. Chain several to stack LoRAs.",
            inputs=[
                Transformer.Input(
                    "model",
                    tooltip="From NextScale Load Generator or NextScale Load Infinity, or another Load LoRA.",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=lora_choices(),
                    tooltip="File in ComfyUI/models/loras, trained on this very model (same architecture). "
                    "'nextscale-embedded-outline' is the pack's example for the embedded generator: outlines instead "
                    "of filled shapes.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="0 = the model unchanged (the same images as without the LoRA), 1 = as trained; "
                    "negative values push away from the LoRA's data.",
                ),
            ],
            outputs=[Transformer.Output("model_out", display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, lora_name: str, strength: float | None = None) -> bool | str:
        return check_file(lora_name, lora_choices(), not_found) or check_numbers(cls, strength=strength) or True

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        return io.NodeOutput(with_lora(model, read_lora(resolve_lora(lora_name)), strength, lora_name))


NODES = [NextScaleLoadLoRA]
