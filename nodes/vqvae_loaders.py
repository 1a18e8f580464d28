"""The shared part of the two-file loaders of the families that draw VAR's tokens with their own transformer
(NextScale Load Switti, NextScale Load Distilled Decoding, NextScale Load HMAR): the transformer, stored in the
chosen dtype (fp8 too), and its multi-scale VQ-VAE, a ``var-tokenizer`` kept in ComfyUI's VAE precision, checked as
a pair; and the check of a sampler's ``vqvae`` input."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import folder_paths
from comfy_api.latest import io

from ..models.core.errors import NextScaleError
from .model_files import FOLDER, model_choices
from .service import TRANSFORMER_DTYPES, load, not_found
from .sockets import Tokenizer
from .validation import check_file

VQVAE_LOADER = "NextScale Load Tokenizer"  # the loader whose role a VQ-VAE file plays (the registry's name for it)


def dtype_input() -> io.Combo.Input:
    """The transformer's ``dtype`` widget (the VQ-VAE's precision is ComfyUI's VAE rule)."""
    return io.Combo.Input(
        "dtype",
        options=TRANSFORMER_DTYPES,
        default="auto",
        tooltip="Transformer precision. auto: ComfyUI's choice for the device and its --*-unet flags (float32 on "
        "CPU, bfloat16 on recent GPUs, fp8_e4m3fn under --fp8_e4m3fn-unet); fp8_e4m3fn: 8-bit matrices with "
        "per-tensor scales, computing in bfloat16/float16 (half of bfloat16's memory). The VQ-VAE stays float32 "
        "(unless --fp16-vae / --bf16-vae); logits are always float32.",
    )


def vqvae_not_found(what: str, put: str, hint: str) -> Callable[[str], str]:
    """The message for a VQ-VAE choice missing from the model folder: ``what`` it is, ``put`` which file there."""

    def message(name: str) -> str:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        return (
            f"model not found: {what} '{name}' is not in the NextScale model folder ({folders}). Put {put} there "
            f"and refresh the node. {hint}"
        )

    return message


class VQVAELoader(io.ComfyNode):
    """Base of the two-file loader nodes (inputs ``model_name``, ``vqvae_name``, ``dtype``): checks both files
    before the workflow runs and loads them as a pair. A subclass gives its schema, ``LOADER`` (its display name,
    the registry's name for it), ``MISSING_VQVAE`` (:func:`vqvae_not_found`) and ``SHARDS`` (whether folders of
    shards are choices)."""

    LOADER: ClassVar[str]
    MISSING_VQVAE: ClassVar[Callable[[str], str]]
    SHARDS: ClassVar[bool] = False

    @classmethod
    def loader_schema(
        cls, node_id: str, category: str, description: str, model, model_tooltip: str, vqvae_tooltip: str
    ) -> io.Schema:
        """The schema of a two-file loader whose transformer leaves on the socket type ``model``."""
        choices = model_choices(shards=cls.SHARDS)
        return io.Schema(
            node_id=node_id,
            display_name=cls.LOADER,
            category=category,
            description=description,
            inputs=[
                io.Combo.Input("model_name", options=choices, tooltip=model_tooltip),
                io.Combo.Input("vqvae_name", options=choices, tooltip=vqvae_tooltip),
                dtype_input(),
            ],
            outputs=[model.Output("model", display_name="model"), Tokenizer.Output("vqvae", display_name="vqvae")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str, vqvae_name: str) -> bool | str:
        choices = model_choices(shards=cls.SHARDS)
        return (
            check_file(model_name, choices, lambda name: not_found(name, cls.LOADER, "generator"))
            or check_file(vqvae_name, choices, cls.MISSING_VQVAE)
            or True
        )

    @classmethod
    def execute(cls, model_name: str, vqvae_name: str, dtype: str) -> io.NodeOutput:
        """The transformer in ``dtype`` and the VQ-VAE in ComfyUI's VAE precision, refused together when they do
        not work together."""
        model = load(model_name, cls.LOADER, "generator", dtype)
        vqvae = load(vqvae_name, VQVAE_LOADER, "tokenizer", "auto")
        model.family.check_pair(model.module, vqvae.module)
        return io.NodeOutput(model, vqvae)


def check_var_vqvae(model, vqvae, loader: str) -> None:
    """Refuses a sampler's ``vqvae`` input that is not VAR's VQ-VAE (as ``loader`` gives it), or one that does not
    fit ``model``."""
    if str(vqvae.kind) != "var-tokenizer":
        raise NextScaleError(f"'{vqvae.name}' is {vqvae.kind.describe()}: connect VAR's VQ-VAE from {loader}")
    model.family.check_pair(model.module, vqvae.module)
