"""Op sets: the layer classes a model is built from, and the casts that let its weights live off the compute device.

An op set is a namespace of layer classes constructed like torch's: ``Linear``, ``Conv2d``, ``Embedding``,
``LayerNorm`` and ``GroupNorm`` (every layer type the models use). Every model takes one as ``operations=`` and
builds each of those layers through it; the default, :class:`TorchOps`, is plain ``torch.nn``. ComfyUI's op sets
(``comfy.ops.manual_cast``, ``comfy.ops.pick_operations(...)``) are the same layers with a per-call cast: a layer
whose ``comfy_cast_weights`` is set casts its weight and bias to its input's device and dtype on every call, so a
partial load can leave its weights on the offload device, and fp8-stored weights compute in bf16/fp16.

A partial load moves only leaf modules (those whose parameters are all their own) and leaves the parameters and
buffers of every other module on the offload device. For a model to compute on the device of its activations
whatever was moved, the models follow these rules:

- The compute device is the device of the activations (or indices) a caller passes; no model looks up where its
  parameters are.
- A parameter or buffer that no op-set layer owns (VAR's ``pos_1LC``, ``q_bias``, ``ada_gss``, Infinity's
  ``cfg_uncond``, ...) is read through :func:`cast`, onto the activation's device and into the dtype it computes in.
- Code that needs a layer's weight for a functional call (``F.linear`` with another bias, the fp32 head, a codebook)
  takes it through :func:`weight_and_bias`, which casts it as the layer's own call would. Embedding rows come from
  :func:`embed`. The two layers no op-set class fits (Infinity's fp32 ``RMSNorm``; VAR's ``Phi`` refiner, a conv
  that mixes its input back in) are torch modules that cast their own weights with :func:`weight_and_bias`.
- A model computes in its :attr:`ComputeDtype.compute_dtype`. Torch layers compute in their weights' dtype; a compute
  dtype other than the storage dtype (fp8 storage computed in bf16) needs an op set that casts per call.

With the torch op set and the weights on the activations' device, every cast is a no-op (``Tensor.to`` returns the
tensor itself): the numerics are those of plain torch layers.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import NextScaleError

# The dtypes a model can compute in; a model stored in another (fp8) needs a compute dtype set explicitly.
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TorchOps:
    """The default op set: plain ``torch.nn`` layers."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    Embedding = nn.Embedding
    LayerNorm = nn.LayerNorm
    GroupNorm = nn.GroupNorm


def cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device``, in ``dtype`` (default: its own); ``t`` itself when it is already there."""
    return t.to(device=device, dtype=dtype)


def weight_and_bias(
    layer: nn.Module, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's ``weight`` and ``bias`` (None without one) on ``device`` in ``dtype``, for a functional call: cast as
    the layer's own per-call cast does, with the patches a host attached to it (``weight_function`` and
    ``bias_function``, ComfyUI's low-VRAM patches) applied after the cast, then multiplied by its ``scale_weight``
    when it has one (fp8 stored with a per-tensor scale, as ComfyUI's scaled fp8 layers multiply it back)."""
    weight = cast(layer.weight, device, dtype)
    for patch in getattr(layer, "weight_function", ()):
        weight = patch(weight)
    scale = getattr(layer, "scale_weight", None)
    if scale is not None:
        weight = weight * cast(scale, device, dtype)
    bias = getattr(layer, "bias", None)
    if bias is not None:
        bias = cast(bias, device, dtype)
        for patch in getattr(layer, "bias_function", ()):
            bias = patch(bias)
    return weight, bias


def embed(layer: nn.Module, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows of an op set's ``Embedding`` for ``index``, gathered on ``index``'s device, in ``dtype``. A layer that
    casts per call (ComfyUI's, which take ``out_dtype``) casts its weight to ``dtype`` before gathering, so fp8 rows
    are never gathered."""
    if hasattr(layer, "comfy_cast_weights"):
        return layer(index, out_dtype=dtype).to(dtype)
    return layer(index).to(dtype)


class ComputeDtype:
    """Mixin of the modules that choose the dtype they compute in (models, and the blocks inside them that cast).

    ``compute_dtype`` is the dtype set at build time or later (setting it on a module sets it on every such module
    inside), else the dtype its weights are stored in, which must then be one to compute in (:data:`COMPUTE_DTYPES`).
    """

    _compute_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        if self._compute_dtype is not None:
            return self._compute_dtype
        weight = next(self.parameters(), None)
        dtype = torch.float32 if weight is None else weight.dtype
        if dtype not in COMPUTE_DTYPES:
            raise NextScaleError(
                f"{type(self).__name__} stores its weights in {dtype}, which it cannot compute in: give it a "
                f"compute dtype (compute_dtype=torch.bfloat16 or torch.float16) and a manual-cast op set"
            )
        return dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            names = ", ".join(str(d) for d in COMPUTE_DTYPES)
            raise NextScaleError(f"compute dtype {dtype} is not one of {names}")
        for module in self.modules():
            if isinstance(module, ComputeDtype):
                module._compute_dtype = dtype
