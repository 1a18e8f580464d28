"""The KV cache the scale loop attends through, and the policy hook that decides what it keeps.

Layout: one :class:`LayerKV` per transformer block, holding preallocated ``k`` and ``v`` buffers of shape
``(rows, H, capacity, c)`` (rows = the CFG batch). Each scale writes its keys and values into the next free
slice (no ``torch.cat``), and the layer attends to the valid prefix ``[:, :, :length]``. The buffers are
allocated at the layer's first write, with the dtype and device of the keys, and released by
:meth:`KVCache.free` (the sampler calls it in ``finally``).

Policies: :class:`KVPolicy` keeps everything, which is VAR's exact cache. A compression policy (ScaleKV's
per-layer budgets, HACK's per-head budgets, ...) subclasses it and overrides

- :meth:`KVPolicy.capacity` -- how many tokens to allocate for a layer (its budget plus the largest scale it
  must accept at once), and
- :meth:`KVPolicy.after_attention` -- called after a layer has attended at a scale, with that scale's queries
  (the current scale is always attended in full); it may call :meth:`LayerKV.keep` to compact the cache
  carried to the next scale.

``keep`` takes one index per (row, head), so heads may keep different tokens. Different counts per head (HACK)
use a padded layout with a key mask: ``keep(index_BHs, lengths_H)`` keeps ``lengths_H[h]`` tokens of head ``h`` (in
every row) in the first ``s`` slots (the rest of the ``s`` slots is padding), later scales are appended after the
``s`` slots, and :meth:`LayerKV.key_mask` gives the additive ``(rows, H, 1, length)`` mask that hides the padding
from the attention (``None`` while there is none, so the full cache's path is unchanged).

No host syncs: what each head holds depends on the schedule and the budgets only, never on the keys, so the counts
live on the host (:meth:`LayerKV.held`) and reach the device through :func:`host_tensor`; nothing here reads a
device tensor back.

Budget-sized buffers: a policy with ``transient = True`` may allocate only its budget (what it carries from one
scale to the next). When a scale does not fit, :meth:`LayerKV.extend` returns a temporary working copy (the kept
tokens plus the new scale, one layer at a time) that the policy must compact back into the buffer with
:meth:`LayerKV.keep` in its ``after_attention``; the peak memory is then the budget of every layer plus one
layer's working copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import NextScaleError


def host_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of host integers on ``device``, copied without waiting for the device (a non-blocking copy
    from pageable memory is staged at once, so the host list may go away)."""
    return torch.tensor(values, dtype=torch.long, device="cpu").to(device, non_blocking=True)


class KVPolicy:
    """Keeps every token (VAR's cache). Subclass to compress; see the module docstring."""

    name = "full"
    transient = False  # True: capacity() may be below budget + one scale (see the module docstring)

    def capacity(self, layer: int, num_tokens: int) -> int:
        """Tokens to allocate for ``layer`` when the whole sequence has ``num_tokens``."""
        return num_tokens

    def after_attention(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor) -> None:
        """Called once per layer and scale, after the attention; may compact ``kv`` with :meth:`LayerKV.keep`."""

    def keep_rows(self, rows: int) -> None:
        """Called when the run drops every row after the first ``rows`` (guidance stopped); per-row state follows."""


class LayerKV:
    """One layer's cache: ``k``/``v`` buffers ``(rows, H, capacity, c)``, valid up to ``length``; ``cache`` is the
    :class:`KVCache` it belongs to (its policy and current scale)."""

    def __init__(self, layer: int, capacity: int, cache: KVCache):
        self.layer, self.capacity, self.length = layer, capacity, 0
        self.cache = cache
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._work_k: torch.Tensor | None = None  # transient working copy (kept + current scale), see extend
        self._work_v: torch.Tensor | None = None
        self._kept_H: tuple[int, ...] | None = None  # tokens held per head in the first _pad_end slots (padded layout)
        self._kept_dev_H: torch.Tensor | None = None  # the same, on the buffers' device
        self._pad_end = 0

    @property
    def k_BHSc(self) -> torch.Tensor:
        return self._work_k if self._work_k is not None else self._k[:, :, : self.length]

    @property
    def v_BHSc(self) -> torch.Tensor:
        return self._work_v if self._work_v is not None else self._v[:, :, : self.length]

    def valid_BHS(self) -> torch.Tensor | None:
        """Bool ``(rows, H, length)``: which cached positions hold a token (``None``: all of them)."""
        if self._kept_dev_H is None:
            return None
        B, H = self.k_BHSc.shape[:2]
        pos_S = torch.arange(self.length, device=self._kept_dev_H.device)
        return ((pos_S < self._kept_dev_H[:, None]) | (pos_S >= self._pad_end)).expand(B, H, self.length)

    def held(self) -> list[int] | None:
        """Tokens held per head, the same in every row (``None`` before the first write); on the host."""
        if self._k is None and self._work_k is None:
            return None
        if self._kept_H is None:
            return [self.length] * self.k_BHSc.shape[1]
        return [n + self.length - self._pad_end for n in self._kept_H]

    def valid_counts(self) -> torch.Tensor | None:
        """CPU ``(rows, H)`` tokens held per head (``None`` before the first write)."""
        held_H = self.held()
        if held_H is None:
            return None
        return torch.tensor(held_H, dtype=torch.long, device="cpu").expand(self.k_BHSc.shape[0], -1)

    def key_mask(self, attn_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """``attn_mask`` plus the additive mask hiding padded slots; ``attn_mask`` itself when nothing is padded."""
        valid_BHS = self.valid_BHS()
        if valid_BHS is None:
            return attn_mask
        dtype = torch.float32 if attn_mask is None else attn_mask.dtype
        mask_BH1S = torch.zeros(valid_BHS.shape, dtype=dtype, device=valid_BHS.device)
        mask_BH1S = mask_BH1S.masked_fill_(~valid_BHS, float("-inf"))[:, :, None]
        return mask_BH1S if attn_mask is None else attn_mask + mask_BH1S

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one scale's keys and values; return every cached key and value, the new ones included."""
        B, H, l, c = k_BHlc.shape
        if self._k is None:
            self._k = k_BHlc.new_empty(B, H, self.capacity, c)
            self._v = v_BHlc.new_empty(B, H, self.capacity, v_BHlc.shape[-1])
        end = self.length + l
        if end > self.capacity and self.cache.policy.transient:
            self._work_k = torch.cat((self._k[:, :, : self.length], k_BHlc), dim=2)
            self._work_v = torch.cat((self._v[:, :, : self.length], v_BHlc), dim=2)
            self.length = end
            return self._work_k, self._work_v
        if end > self.capacity:
            raise NextScaleError(
                f"KV cache of layer {self.layer} holds {self.capacity} tokens but needs {end} at this scale: "
                f"the '{self.cache.policy.name}' policy's budget is smaller than what it must keep plus one scale"
            )
        self._k[:, :, self.length : end] = k_BHlc
        self._v[:, :, self.length : end] = v_BHlc
        self.length = end
        return self.k_BHSc, self.v_BHSc

    def after_attention(self, q_BHlc: torch.Tensor) -> None:
        self.cache.policy.after_attention(self, self.cache.scale, q_BHlc)
        if self._work_k is not None:
            raise NextScaleError(
                f"the '{self.cache.policy.name}' KV policy left layer {self.layer} holding {self.length} tokens in a "
                f"buffer of {self.capacity}: its after_attention must keep at most {self.capacity}"
            )

    def keep(self, index_BHs: torch.Tensor, lengths_H: Sequence[int] | None = None) -> None:
        """Compact the cache to the tokens ``index_BHs`` (positions in ``[0, length)``, one list per row and
        head, all of the same length ``s``), in the given order; they become positions ``[0, s)``. With
        ``lengths_H`` (host integers per head, at most ``s``) only the first ``lengths_H[h]`` of head ``h``'s ``s``
        entries are kept tokens and the rest is padding, hidden by :meth:`key_mask`."""
        B, H, s = index_BHs.shape
        if s > self.capacity:
            raise NextScaleError(
                f"the '{self.cache.policy.name}' KV policy keeps {s} tokens in layer {self.layer}, whose buffer holds "
                f"{self.capacity}: its capacity() must cover what it keeps"
            )
        src_k, src_v = self.k_BHSc, self.v_BHSc
        if self._k is None:
            self._k = src_k.new_empty(B, H, self.capacity, src_k.shape[-1])
            self._v = src_v.new_empty(B, H, self.capacity, src_v.shape[-1])
        gather = index_BHs[..., None].expand(B, H, s, src_k.shape[-1])
        self._k[:, :, :s] = src_k.gather(2, gather)
        self._v[:, :, :s] = src_v.gather(2, gather.expand(B, H, s, src_v.shape[-1]))
        self._work_k = self._work_v = None
        self.length = s
        if lengths_H is None or all(n == s for n in lengths_H):
            self._kept_H, self._kept_dev_H, self._pad_end = None, None, 0
        else:
            self._kept_H = tuple(int(n) for n in lengths_H)
            self._kept_dev_H, self._pad_end = host_tensor(self._kept_H, index_BHs.device), s

    def free(self) -> None:
        self._k = self._v = self._work_k = self._work_v = self._kept_H = self._kept_dev_H = None
        self.length = self._pad_end = 0


class KVCache:
    """Per-layer caches for one sampling run over a sequence of ``num_tokens`` tokens."""

    def __init__(self, num_layers: int, num_tokens: int, policy: KVPolicy | None = None):
        self.policy = policy or KVPolicy()
        self.scale = -1
        self.layers = [LayerKV(i, self.policy.capacity(i, num_tokens), self) for i in range(num_layers)]

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def begin_scale(self, si: int) -> None:
        self.scale = si

    def keep_rows(self, rows: int) -> None:
        """Drop every row after the first ``rows`` (the unconditional rows when guidance stops), in every layer and
        in the policy's per-row state. The buffers are narrowed in place (a view: the attention over them halves,
        their memory is released at :meth:`free`)."""
        for kv in self.layers:
            if kv._k is not None:
                kv._k, kv._v = kv._k[:rows], kv._v[:rows]
        self.policy.keep_rows(rows)

    def nbytes(self) -> int:
        """Bytes held by the allocated buffers (and any transient working copy)."""
        return sum(
            t.numel() * t.element_size()
            for kv in self.layers
            for t in (kv._k, kv._v, kv._work_k, kv._work_v)
            if t is not None
        )

    def valid_nbytes(self) -> int:
        """Bytes of the tokens held (padding excluded): what a packed ragged layout would need."""
        total = 0
        for kv in self.layers:
            held_H = kv.held()
            if held_H is not None:
                k, v = kv.k_BHSc, kv.v_BHSc
                per_token = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()
                total += sum(held_H) * k.shape[0] * per_token
        return total

    def free(self) -> None:
        for kv in self.layers:
            kv.free()
