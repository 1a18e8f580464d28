"""The HMAR family: VAR split into base and branch blocks, Markovian across scales, with masked refinement within a
scale (NVlabs/HMAR). The protocol is :class:`~..core.family.Family`.

HMAR samples VAR's tokens with VAR's VQ-VAE (``vae_ch160v4096z32``), so encoding, decoding and previews are VAR's
(:class:`..var.family.VARTokensFamily`); the tokenizer is a VAR tokenizer to the registry.

Memory: a scale attends only to its own tokens, so no keys and values outlive a layer's pass. Where VAR's cache
holds every token of the schedule in every layer for the whole run, HMAR holds one layer's keys and values of the
largest scale (:func:`markovian_kv_bytes`; docs/hmar.md has the figures against VAR's full cache).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from ..core.errors import NextScaleError
from ..core.family import KVGeometry, Role, Workload
from ..core.memory import MemoryNeed
from ..var.classes import default_class_names
from ..var.family import VARTokensFamily, scale_memory
from ..var.tokenizer import MultiScaleVQVAE
from .model import HMAR, WHAT
from .sampler import HOOKS, check_inputs, sample_hmar

LOADER = "NextScale Load HMAR"
HINT = (
    "HMAR's files (hmar-d16.pth, hmar-d20.pth, hmar-d24.pth, hmar-d30.pth; NVIDIA's non-commercial licence) are "
    "published on Hugging Face in nvidia/HMAR (linked from github.com/NVlabs/HMAR); its tokenizer is VAR's "
    "vae_ch160v4096z32.pth from FoundationVision/var. Put them in ComfyUI/models/nextscale"
)

GENERATOR = Role("generator", WHAT, "an HMAR generator (VAR with next-scale and mask branches)", LOADER)


def markovian_kv_bytes(geometry: KVGeometry, rows: int, itemsize: int) -> int:
    """The most key and value bytes an HMAR run holds at once: one layer's, for the largest scale's tokens of
    ``rows`` rows (VAR's full cache is :meth:`KVGeometry.cache_bytes`: every layer, every token of the schedule)."""
    return 2 * rows * max(geometry.areas) * geometry.heads * geometry.head_dim * itemsize


class HMARFamily(VARTokensFamily):
    name = "hmar"
    title = "HMAR"
    roles = (GENERATOR,)
    hooks = HOOKS
    files_hint = HINT
    decode_chunk = 8

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        if "mask_embed.weight" in keys and "ns_head.weight" in keys:
            return GENERATOR
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        if role is not GENERATOR:
            raise NextScaleError(f"{role.what} is not a role of the HMAR family")
        module = HMAR.from_state_dict(
            state_dict, path=path, config=HMAR.config_from_file(path), operations=operations,
            compute_dtype=compute_dtype,
        )
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: HMAR, tokenizer) -> None:
        if not isinstance(tokenizer, MultiScaleVQVAE):
            raise NextScaleError(
                f"HMAR draws VAR's tokens: connect VAR's VQ-VAE (vae_ch160v4096z32.pth), not {type(tokenizer).__name__}"
            )
        check_inputs(generator, tokenizer)

    def class_names(self, generator: HMAR) -> tuple[str, ...]:
        return default_class_names(generator.num_classes)

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        return sample_hmar(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def kv_geometry(self, generator: HMAR, schedule=None) -> KVGeometry:
        """The layers a pass runs (base blocks and one branch) and their heads; HMAR keeps no cache of them."""
        cfg = generator.config
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.head_dim, tuple(schedule or cfg.patch_nums))

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        """VAR's per-scale activations at the largest scale, the keys and values of one layer of it (no cache), the
        previews and the decoding."""
        kv = step = 0
        if generator is not None:
            geometry = self.kv_geometry(generator, workload.schedule)
            kv = markovian_kv_bytes(geometry, workload.rows, workload.dtype.itemsize)
            step = max(geometry.areas)
        return scale_memory(generator, tokenizer, workload, kv, step)


FAMILY = HMARFamily()
