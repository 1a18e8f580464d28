"""The KV cache the scale loop attends through, and the policy hook that decides what it keeps.

A layer's cache is a :class:`LayerKV` in one of two layouts, chosen by the policy (:attr:`KVPolicy.packed`):

- **Dense** (:class:`DenseLayerKV`): preallocated ``k`` and ``v`` buffers of shape ``(rows, H, capacity, c)``
  (rows = the CFG batch). Each scale writes its keys and values into the next free slice (no ``torch.cat``), and the
  layer attends to the valid prefix ``[:, :, :length]``. Every head holds the same tokens' count.
- **Packed** (:class:`PackedLayerKV`): heads hold different numbers of tokens (HACK's per-head budgets). Head
  ``(b, h)``'s keys and values are rows ``offsets[bh] : offsets[bh + 1]`` of one ``(total, c)`` buffer per layer (the
  layout of :mod:`...kernels.ragged`), ``total`` being exactly the tokens held. A scale's keys go into a new buffer of
  what is held plus the scale (the working copy), the scale attends to it through :func:`~...kernels.ragged.
  ragged_attention` (the Triton kernel on CUDA, padded SDPA elsewhere), and :meth:`LayerKV.keep` compacts it into a
  buffer of exactly the kept tokens. What is allocated is what is held, at every step.

Buffers take the dtype and device of the keys, are allocated at the layer's first write and released by
:meth:`KVCache.free` (the sampler calls it in ``finally``).

Policies: :class:`KVPolicy` keeps everything, which is VAR's exact cache. A compression policy (ScaleKV's
per-layer budgets, HACK's per-head budgets, ...) subclasses it and overrides

- :meth:`KVPolicy.capacity` -- how many tokens to allocate for a dense layer (its budget plus the largest scale it
  must accept at once),
- :meth:`KVPolicy.after_attention` -- called after a layer has attended at a scale, with that scale's queries
  (the current scale is always attended in full); it may call :meth:`LayerKV.keep` to compact the cache
  carried to the next scale, and
- :meth:`KVPolicy.cache_bytes` -- the most bytes its cache holds during a run, for the memory planner.

Policies score and select tokens on a **padded view** of a layer, ``(rows, H, length)`` slots:
:attr:`LayerKV.k_BHSc` / :attr:`LayerKV.v_BHSc` and :meth:`LayerKV.valid_BHS` (which slots hold a token). In the
packed layout, head ``h`` holds the ``kept[h]`` tokens of the last compaction in its first slots, padding up to
``pad_end = max(kept)``, then the tokens added since; the view is materialised on demand (a temporary, like any
activation). :meth:`LayerKV.keep` takes one index per (row, head) into that view, so heads may keep different tokens,
and with ``lengths_H`` different counts (packed layout only).

Budget-sized dense buffers: a policy with ``transient = True`` may allocate only its budget (what it carries from one
scale to the next). When a scale does not fit, :meth:`LayerKV.extend` makes a temporary working copy (the kept
tokens plus the new scale, one layer at a time) that the policy must compact back into the buffer with
:meth:`LayerKV.keep` in its ``after_attention``; the peak memory is then the budget of every layer plus one layer's
working copy.

Memory: :meth:`KVCache.nbytes` is the bytes of the key and value buffers (working copies included) at that moment,
:attr:`KVCache.peak_bytes` the most they held at once, recorded at every allocation while the buffer it replaces is
still alive. The KV report shows these figures.

No host syncs: what each head holds depends on the schedule and the budgets only, never on the keys, so the counts
live on the host (:meth:`LayerKV.held`) and reach the device through :func:`host_tensor`; nothing here reads a
device tensor back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ...kernels.attention import attention
from ...kernels.ragged import lengths_to_offsets, packed_heads, ragged_attention
from .errors import NextScaleError

if TYPE_CHECKING:
    from .family import KVGeometry


def host_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of host integers on ``device``, copied without waiting for the device (a non-blocking copy
    from pageable memory is staged at once, so the host list may go away)."""
    return torch.tensor(values, dtype=torch.long, device="cpu").to(device, non_blocking=True)


class KVPolicy:
    """Keeps every token (VAR's cache). Subclass to compress; see the module docstring."""

    name = "full"
    transient = False  # True: capacity() may be below budget + one scale (see the module docstring)
    packed = False  # True: the packed per-head layout (heads keep different numbers of tokens)

    def capacity(self, layer: int, num_tokens: int) -> int:
        """Tokens to allocate for a dense ``layer`` when the whole sequence has ``num_tokens``."""
        return num_tokens

    def after_attention(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor) -> None:
        """Called once per layer and scale, after the attention; may compact ``kv`` with :meth:`LayerKV.keep`."""

    def keep_rows(self, rows: int) -> None:
        """Called when the run drops every row after the first ``rows`` (guidance stopped); per-row state follows."""

    def cache_bytes(self, geometry: KVGeometry, rows: int, itemsize: int) -> int:
        """The most bytes a :class:`KVCache` under this policy holds during a run over ``geometry`` with ``rows``
        rows (the CFG rows included) and keys and values of ``itemsize`` bytes per element (``dtype.itemsize``):
        dense buffers of :meth:`capacity` tokens in every layer, plus, for a transient policy, one layer's working
        copy (its capacity and the largest scale)."""
        capacities = [self.capacity(layer, geometry.num_tokens) for layer in range(geometry.layers)]
        working = max(capacities, default=0) + max(geometry.areas) if self.transient else 0
        return (sum(capacities) + working) * token_bytes(geometry, rows, itemsize)


def token_bytes(geometry: KVGeometry, rows: int, itemsize: int) -> int:
    """Bytes of one token position of one layer: its key and value in every head and row."""
    return 2 * rows * geometry.heads * geometry.head_dim * itemsize


class LayerKV:
    """One layer's cache (see the module docstring for the two layouts): ``rows`` rows (set at the first write),
    ``length`` slots in the padded view; ``cache`` is the :class:`KVCache` it belongs to (its policy, current scale
    and memory record)."""

    def __init__(self, layer: int, cache: KVCache):
        self.layer, self.rows, self.length, self.cache = layer, 0, 0, cache

    @property
    def k_BHSc(self) -> torch.Tensor:
        """Keys of the padded view ``(rows, H, length, c)``."""
        raise NotImplementedError

    @property
    def v_BHSc(self) -> torch.Tensor:
        """Values of the padded view ``(rows, H, length, c)``."""
        raise NotImplementedError

    @property
    def over_capacity(self) -> bool:
        """Whether the layer holds a working copy that its policy must compact at this scale."""
        return False

    def valid_BHS(self) -> torch.Tensor | None:
        """Bool ``(rows, H, length)``: which slots of the padded view hold a token (``None``: all of them)."""
        return None

    def held(self) -> list[int] | None:
        """Tokens held per head, the same in every row (``None`` before the first write); on the host."""
        raise NotImplementedError

    def valid_counts(self) -> torch.Tensor | None:
        """CPU ``(rows, H)`` tokens held per head (``None`` before the first write)."""
        held_H = self.held()
        if held_H is None:
            return None
        return torch.tensor(held_H, dtype=torch.long, device="cpu").expand(self.rows, -1)

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> None:
        """Append one scale's keys and values ``(rows, H, l, c)`` (each layout's :meth:`_append`)."""
        self._append(k_BHlc, v_BHlc)

    def _append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> None:
        raise NotImplementedError

    def attention(self, q_BHlc: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """``out_BHlc`` of the queries over every cached key (see :mod:`...kernels.attention` for the conventions)."""
        raise NotImplementedError

    def attend(
        self, q_BHlc: torch.Tensor, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One scale: append its keys and values, attend its queries to the whole cache, let the policy compact."""
        self.extend(k_BHlc, v_BHlc)
        out_BHlc = self.attention(q_BHlc, attn_mask)
        self.after_attention(q_BHlc)
        return out_BHlc

    def after_attention(self, q_BHlc: torch.Tensor) -> None:
        self.cache.policy.after_attention(self, self.cache.scale, q_BHlc)

    def keep(self, index_BHs: torch.Tensor, lengths_H: Sequence[int] | None = None) -> None:
        """Compact the cache to the slots ``index_BHs`` of the padded view (one list per row and head, all of
        length ``s``), in the given order; they become slots ``[0, s)``. With ``lengths_H`` (host integers per head,
        at most ``s``; packed layout only) head ``h`` keeps only the first ``lengths_H[h]`` of its ``s`` entries."""
        raise NotImplementedError

    def keep_rows(self, rows: int) -> None:
        """Keep the first ``rows`` rows only (a view of the buffers: no copy, no allocation)."""
        raise NotImplementedError

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The tensors the layer holds (what :meth:`KVCache.nbytes` counts)."""
        raise NotImplementedError

    def free(self) -> None:
        raise NotImplementedError


class DenseLayerKV(LayerKV):
    """Buffers ``(rows, H, capacity, c)``, valid up to ``length``; a transient working copy while a scale does
    not fit (see the module docstring)."""

    def __init__(self, layer: int, capacity: int, cache: KVCache):
        super().__init__(layer, cache)
        self.capacity = capacity
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._work_k: torch.Tensor | None = None  # transient working copy (kept + current scale), see extend
        self._work_v: torch.Tensor | None = None

    @property
    def k_BHSc(self) -> torch.Tensor:
        return self._work_k if self._work_k is not None else self._k[:, :, : self.length]

    @property
    def v_BHSc(self) -> torch.Tensor:
        return self._work_v if self._work_v is not None else self._v[:, :, : self.length]

    @property
    def over_capacity(self) -> bool:
        return self._work_k is not None

    def held(self) -> list[int] | None:
        if self._k is None and self._work_k is None:
            return None
        return [self.length] * self.k_BHSc.shape[1]

    def _append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> None:
        B, H, l, c = k_BHlc.shape
        if self._k is None:
            self.rows = B
            self._k = k_BHlc.new_empty(B, H, self.capacity, c)
            self._v = v_BHlc.new_empty(B, H, self.capacity, v_BHlc.shape[-1])
            self.cache.note_allocation()
        end = self.length + l
        if end > self.capacity and self.cache.policy.transient:
            self._work_k = torch.cat((self._k[:, :, : self.length], k_BHlc), dim=2)
            self._work_v = torch.cat((self._v[:, :, : self.length], v_BHlc), dim=2)
            self.length = end
            self.cache.note_allocation()
            return
        if end > self.capacity:
            raise NextScaleError(
                f"KV cache of layer {self.layer} holds {self.capacity} tokens but needs {end} at this scale: "
                f"the '{self.cache.policy.name}' policy's budget is smaller than what it must keep plus one scale"
            )
        self._k[:, :, self.length : end] = k_BHlc
        self._v[:, :, self.length : end] = v_BHlc
        self.length = end

    def attention(self, q_BHlc: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return attention(q_BHlc, self.k_BHSc, self.v_BHSc, attn_mask)

    def after_attention(self, q_BHlc: torch.Tensor) -> None:
        super().after_attention(q_BHlc)
        if self.over_capacity:
            raise NextScaleError(
                f"the '{self.cache.policy.name}' KV policy left layer {self.layer} holding {self.length} tokens in a "
                f"buffer of {self.capacity}: its after_attention must keep at most {self.capacity}"
            )

    def keep(self, index_BHs: torch.Tensor, lengths_H: Sequence[int] | None = None) -> None:
        B, H, s = index_BHs.shape
        if lengths_H is not None and any(n != s for n in lengths_H):
            raise NextScaleError(
                f"the '{self.cache.policy.name}' KV policy keeps different numbers of tokens per head, which the dense "
                "layout cannot hold: such a policy sets packed = True"
            )
        if s > self.capacity:
            raise NextScaleError(
                f"the '{self.cache.policy.name}' KV policy keeps {s} tokens in layer {self.layer}, whose buffer holds "
                f"{self.capacity}: its capacity() must cover what it keeps"
            )
        src_k, src_v = self.k_BHSc, self.v_BHSc
        gather = index_BHs[..., None].expand(B, H, s, src_k.shape[-1])
        self._k[:, :, :s] = src_k.gather(2, gather)
        self._v[:, :, :s] = src_v.gather(2, gather.expand(B, H, s, src_v.shape[-1]))
        self._work_k = self._work_v = None
        self.length = s

    def keep_rows(self, rows: int) -> None:
        if self._k is not None:
            self._k, self._v = self._k[:rows], self._v[:rows]
        if self._work_k is not None:
            self._work_k, self._work_v = self._work_k[:rows], self._work_v[:rows]
        self.rows = min(self.rows, rows)

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self._k, self._v, self._work_k, self._work_v) if t is not None)

    def free(self) -> None:
        self._k = self._v = self._work_k = self._work_v = None
        self.length = self.rows = 0


class PackedLayerKV(LayerKV):
    """Packed keys and values ``(total, c)``, head ``(b, h)`` at rows ``offsets[bh] : offsets[bh + 1]`` with
    ``total`` = the tokens held; per-head counts on the host (``kept`` slots of the last compaction, then
    ``length - pad_end`` slots added since)."""

    def __init__(self, layer: int, cache: KVCache):
        super().__init__(layer, cache)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._kept_H: tuple[int, ...] | None = None
        self._pad_end = 0

    def held(self) -> list[int] | None:
        if self._kept_H is None:
            return None
        return [n + self.length - self._pad_end for n in self._kept_H]

    def _offsets(self, held_H: Sequence[int]) -> torch.Tensor:
        """``(rows * H + 1,)`` offsets on the buffers' device of heads holding ``held_H`` tokens in every row."""
        return lengths_to_offsets(host_tensor(held_H, self._k.device).repeat(self.rows))

    def _slot_rows(self, slots_BHs: torch.Tensor) -> torch.Tensor:
        """Buffer rows of the padded view's slots ``(rows, H, s)`` (a padding slot gives a row of its own head, or
        the last row)."""
        kept_H1 = host_tensor(self._kept_H, slots_BHs.device)[:, None]
        within = torch.where(slots_BHs < kept_H1, slots_BHs, slots_BHs - self._pad_end + kept_H1).clamp_min(0)
        starts_BH1 = self._offsets(self.held())[:-1].view(self.rows, -1, 1)
        return (starts_BH1 + within).clamp_max(self._k.shape[0] - 1)

    def _view(self, packed_Tc: torch.Tensor) -> torch.Tensor:
        slots_BHS = torch.arange(self.length, device=packed_Tc.device).expand(self.rows, len(self._kept_H), -1)
        return packed_Tc[self._slot_rows(slots_BHS)]

    @property
    def k_BHSc(self) -> torch.Tensor:
        return self._view(self._k)

    @property
    def v_BHSc(self) -> torch.Tensor:
        return self._view(self._v)

    def valid_BHS(self) -> torch.Tensor | None:
        if all(n == self._pad_end for n in self._kept_H):
            return None
        kept_H1 = host_tensor(self._kept_H, self._k.device)[:, None]
        pos_S = torch.arange(self.length, device=self._k.device)
        return ((pos_S < kept_H1) | (pos_S >= self._pad_end)).expand(self.rows, -1, -1)

    def _append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> None:
        """A buffer of the held tokens plus the new scale's in each head (the old one is released)."""
        B, H, l, c = k_BHlc.shape
        if self._kept_H is None:
            self.rows, self._kept_H = B, (0,) * H
            self._k, self._v = k_BHlc.new_empty(0, c), v_BHlc.new_empty(0, v_BHlc.shape[-1])
        held_H = self.held()
        total = B * (sum(held_H) + H * l)
        work_k, work_v = k_BHlc.new_empty(total, c), v_BHlc.new_empty(total, v_BHlc.shape[-1])
        device = k_BHlc.device
        old_offsets = self._offsets(held_H)
        shift_BH = l * torch.arange(B * H, device=device)  # each head moves by the new tokens of the heads before it
        new_rows = (old_offsets[1:] + shift_BH)[:, None] + torch.arange(l, device=device)
        work_k.index_copy_(0, new_rows.view(-1), k_BHlc.reshape(B * H * l, c))
        work_v.index_copy_(0, new_rows.view(-1), v_BHlc.reshape(B * H * l, v_BHlc.shape[-1]))
        if self._k.shape[0]:
            head_T, _ = packed_heads(old_offsets, self._k.shape[0])
            old_rows = torch.arange(self._k.shape[0], device=device) + shift_BH[head_T]
            work_k.index_copy_(0, old_rows, self._k)
            work_v.index_copy_(0, old_rows, self._v)
        self.cache.note_allocation(work_k.nbytes + work_v.nbytes)
        self._k, self._v = work_k, work_v
        self.length += l

    def attention(self, q_BHlc: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("the packed KV layout attends a scale to the whole cache: it takes no attention mask")
        held_H = self.held()
        return ragged_attention(q_BHlc, self._k, self._v, self._offsets(held_H), longest=max(held_H))

    def keep(self, index_BHs: torch.Tensor, lengths_H: Sequence[int] | None = None) -> None:
        """A buffer of the kept tokens only (the working one is released)."""
        B, H, s = index_BHs.shape
        kept_H = tuple(int(n) for n in lengths_H) if lengths_H is not None else (s,) * H
        src_BHs = self._slot_rows(index_BHs)
        new_offsets = lengths_to_offsets(host_tensor(kept_H, index_BHs.device).repeat(B))
        total = B * sum(kept_H)
        head_T, pos_T = packed_heads(new_offsets, total)
        rows_T = src_BHs.view(B * H, s)[head_T, pos_T]
        kept_k, kept_v = self._k.index_select(0, rows_T), self._v.index_select(0, rows_T)
        self.cache.note_allocation(kept_k.nbytes + kept_v.nbytes)
        self._k, self._v = kept_k, kept_v
        self._kept_H, self._pad_end, self.length = kept_H, s, s

    def keep_rows(self, rows: int) -> None:
        # The flat buffer holds row 0's heads, then row 1's, ...: the first rows are a prefix of it.
        if self._kept_H is not None and rows < self.rows:
            end = rows * sum(self.held())
            self._k, self._v, self.rows = self._k[:end], self._v[:end], rows

    def buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self._k, self._v) if t is not None)

    def free(self) -> None:
        self._k = self._v = self._kept_H = None
        self.length = self._pad_end = self.rows = 0


class KVCache:
    """Per-layer caches for one sampling run over a sequence of ``num_tokens`` tokens, in the layout the policy
    chooses; ``peak_bytes`` is the most its buffers held at once."""

    def __init__(self, num_layers: int, num_tokens: int, policy: KVPolicy | None = None):
        self.policy = policy or KVPolicy()
        self.scale = -1
        self.peak_bytes = 0
        if self.policy.packed:
            self.layers: list[LayerKV] = [PackedLayerKV(i, self) for i in range(num_layers)]
        else:
            self.layers = [DenseLayerKV(i, self.policy.capacity(i, num_tokens), self) for i in range(num_layers)]

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
            kv.keep_rows(rows)
        self.policy.keep_rows(rows)

    def nbytes(self) -> int:
        """Bytes of the buffers the layers hold now (working copies included)."""
        return sum(t.nbytes for kv in self.layers for t in kv.buffers())

    def note_allocation(self, pending: int = 0) -> None:
        """Record the peak after an allocation; ``pending``: bytes allocated that no layer holds yet (a buffer's
        successor, while the buffer itself is still alive)."""
        self.peak_bytes = max(self.peak_bytes, self.nbytes() + pending)

    def free(self) -> None:
        for kv in self.layers:
            kv.free()
