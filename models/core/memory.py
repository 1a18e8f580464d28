"""The memory model: bytes a run holds on the device, by part, and the meter that checks it.

A run's need (:class:`MemoryNeed`) is the weights plus its working memory. While sampling, the KV cache lives for
the whole run and the transformer's activations peak once per scale, at the largest one: either inside a block (the
residual stream and its copies, the MLP's hidden layer before and after its activation) or at the head and the
draw (the fp32 logits, their guided and tempered copies, top-p's sort with its int64 order, the softmax). Decoding
full images (NextScale Decode, the Infinity sampler's ``keep_scales`` encode) happens when no cache is held.

The per-token counts below were read from the samplers and checked with :class:`PeakMeter` on the CPU
(``tests/test_memory.py``, ``bench/bench_memory.py``): predicted within 10% of the measured peak. Official sizes are
predicted from their configs on the ``meta`` device (docs/memory.md has the table).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB = 2**30
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes one node execution holds on its device, by part: ``weights`` (every model it uses), ``kv_cache`` (the
    run's policy and rows), ``activations`` (the largest step beyond the cache), ``preview`` (the per-scale
    preview, decoded while the cache is held) and ``decode`` (full images decoded or encoded with no cache held)."""

    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    preview: int = 0
    decode: int = 0

    @property
    def sampling(self) -> int:
        """The peak while sampling: the cache, the largest step and a preview."""
        return self.kv_cache + self.activations + self.preview

    @property
    def working(self) -> int:
        """What the run needs beyond the weights (``memory_required`` of ``load_models_gpu``)."""
        return max(self.sampling, self.decode)

    @property
    def total(self) -> int:
        return self.weights + self.working

    def describe(self) -> str:
        """The working memory by part: ``"14.1 GiB (KV cache 12.4 GiB, activations 1.68 GiB)"`` (decoding when it
        is the larger)."""
        if self.decode > self.sampling:
            return f"{size(self.decode)} (decoding)"
        parts = [("KV cache", self.kv_cache), ("activations", self.activations + self.preview)]
        return f"{size(self.working)} ({', '.join(f'{name} {size(n)}' for name, n in parts if n)})"


def size(n: int) -> str:
    """Bytes as the messages and the table write them: ``"14.1 GiB"``, ``"5.14 GiB"``, ``"312 MiB"``."""
    if n >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def weight_bytes(module: nn.Module, dtype: torch.dtype | None = None, matrices: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers, its floating-point ones stored in ``dtype`` (None: as they are)
    and the weights of its ``Linear`` layers in ``matrices`` (None: as the others); fp8 matrices carry one fp32 scale
    each, as the loaders' scaled fp8 stores them. Works on ``meta`` modules: nothing is read."""
    linear = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        chosen = matrices if matrices is not None and id(tensor) in linear else dtype
        if tensor.is_floating_point() and chosen is not None:
            total += tensor.numel() * chosen.itemsize + (4 if chosen in FP8_DTYPES else 0)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def kv_cache_bytes(geometry, rows: int, itemsize: int, policy=None) -> int:
    """Bytes the KV cache of ``geometry`` (a :class:`~.family.KVGeometry`) allocates for ``rows`` rows under
    ``policy``: the policy's own count when it has one (``policy.cache_bytes(geometry, rows, itemsize)``), else
    buffers of its capacity in every layer plus a transient policy's working copy (:meth:`KVGeometry.cache_bytes`)."""
    own = getattr(policy, "cache_bytes", None)
    if own is not None:
        return own(geometry, rows, itemsize)
    return geometry.cache_bytes(rows, itemsize, policy)


def block_bytes(rows: int, tokens: int, width: int, hidden: int, itemsize: int, stream_copies: float) -> int:
    """A transformer block's peak at its MLP for ``tokens`` new tokens per row: ``stream_copies`` fp32 copies of the
    residual stream (the stream, its normalised and modulated copies, the branch output), the branch input cast to
    the compute dtype when it is not fp32, and the MLP's hidden layer before and after its activation. The
    attention is fused (SDPA, Triton): it holds no score matrix and less than the MLP."""
    cast = width * itemsize if itemsize != 4 else 0
    return int(rows * tokens * (stream_copies * width * 4 + cast + 2 * hidden * itemsize))


def transformer_step_bytes(rows: int, tokens: int, width: int, hidden: int, vocab: int, itemsize: int) -> int:
    """A coarser bound for families without measured counts: one transformer step of ``tokens`` new tokens per row,
    the fp32 residual stream and its normalised copy, q/k/v and the attention's output and the MLP's hidden layer
    (before and after its activation) in the compute dtype, and the fp32 logits with their guided and softmaxed
    copies. The attention is fused (Triton, SDPA): it holds no score matrix."""
    stream = 2 * rows * tokens * width * 4
    attention = 4 * rows * tokens * width * itemsize
    mlp = 2 * rows * tokens * hidden * itemsize
    logits = 3 * rows * tokens * vocab * 4
    return stream + attention + mlp + logits


def draw_bytes(batch: int, rows: int, tokens: int, width: int, vocab: int, guided: bool) -> int:
    """The head's and the draw's peak, in fp32 whatever the compute dtype: the normalised stream (2.5 copies), the
    logits of every row, and per image the guided and tempered logits, top-p's sorted values with their int64 order,
    the softmax and the mask (``21 + 4`` bytes per logit with guidance)."""
    return int(rows * tokens * (2.5 * width * 4 + vocab * 4) + batch * tokens * vocab * (21 + 4 * guided))


def conv_coder_bytes(
    batch: int, level_channels: Sequence[int], height: int, width: int, itemsize: int, copies: int
) -> int:
    """Peak activation bytes of a convolutional encoder or decoder whose level ``i`` has ``level_channels[i]``
    channels at ``1 / 2**i`` of the image size: the largest level's feature map, held ``copies`` times at a
    residual block (its input, the normalised copy, its activation, the convolution's output, the sum; the
    family's tokenizer sets the count)."""
    largest = max(c * max(1, height >> i) * max(1, width >> i) for i, c in enumerate(level_channels))
    return copies * batch * largest * itemsize


def banded_decoder_bytes(
    batch: int, level_channels: Sequence[int], height: int, width: int, itemsize: int, copies: int, bands: int
) -> int:
    """Peak activation bytes of ``autoencoder.decode_in_bands`` (levels as in :func:`conv_coder_bytes`): at each
    level a block holds its input (the width of the level below, upsampled, at a level's first block), its inner
    map and its output whole, and ``copies`` maps of the wider of the two a band high (with a neighbour row on each
    side)."""
    peak = 0
    for i, c in enumerate(level_channels):
        h, w = max(1, height >> i), max(1, width >> i)
        c_in = level_channels[min(i + 1, len(level_channels) - 1)]
        band = min(h, -(-h // bands) + 2)
        peak = max(peak, (c_in + 2 * c) * h * w + copies * max(c_in, c) * band * w)
    return batch * peak * itemsize


def largest_batch(need: Callable[[int], int], batch: int, free: int) -> int:
    """The largest ``b <= batch`` whose ``need(b)`` (growing with ``b``) fits in ``free`` bytes; 0 when one does
    not."""
    low, high = 0, batch
    while low < high:
        middle = (low + high + 1) // 2
        if need(middle) <= free:
            low = middle
        else:
            high = middle - 1
    return low


class PeakMeter(TorchDispatchMode):
    """The peak of tensor bytes allocated inside the ``with`` block and alive at once: every storage an operator
    creates (not a view or an in-place result of its inputs) counts from its creation until it is freed. Tensors
    that existed before (weights, inputs) are not counted; ``meta`` tensors hold nothing. ``peak`` is in bytes."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._held: dict[int, int] = {}

    def _freed(self, pointer: int, nbytes: int) -> None:
        self._held.pop(pointer, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _counted(t)}
        for tensor in tree_leaves(out):
            if not _counted(tensor):
                continue
            storage = tensor.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes and pointer not in inputs and pointer not in self._held:
                self._held[pointer] = nbytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, pointer, nbytes)
        return out


def _counted(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta"
