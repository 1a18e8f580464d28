"""The Distilled Decoding family: VAR-d16/d20/d24 distilled to one or two steps (microsoft/distilled_decoding). The
protocol is :class:`~..core.family.Family`.

DD samples VAR's tokens with VAR's VQ-VAE (``vae_ch160v4096z32``), so encoding, decoding and previews are VAR's
(:class:`..var.family.VARTokensFamily`); the tokenizer is a VAR tokenizer to the registry. A DD file holds every key
of a VAR transformer too, so :data:`~..core.family.BUILTIN_FAMILIES` lists this family before VAR's.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from ..core.errors import NextScaleError
from ..core.family import KVGeometry, Role, Workload
from ..core.memory import MemoryNeed, transformer_step_bytes, weight_bytes
from ..var.classes import default_class_names
from ..var.family import VARTokensFamily, decoding_bytes
from ..var.tokenizer import MultiScaleVQVAE
from .model import WHAT, DistilledVAR
from .sampler import HOOKS, check_inputs, sample_dd

LOADER = "NextScale Load Distilled Decoding"
HINT = (
    "Distilled Decoding's files are published on Hugging Face in microsoft/distilled_decoding (VAR-DD/var-d16.pth, "
    "var-d20.pth, var-d24.pth); its tokenizer is VAR's vae_ch160v4096z32.pth from FoundationVision/var. Put them in "
    "ComfyUI/models/nextscale"
)

GENERATOR = Role("generator", WHAT, "a Distilled Decoding generator (VAR distilled to one or two steps)", LOADER)


class DDFamily(VARTokensFamily):
    name = "dd"
    title = "Distilled Decoding"
    roles = (GENERATOR,)
    hooks = HOOKS
    files_hint = HINT
    decode_chunk = 8

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        if "n_d_embed.weight" in keys and "final_layer_conti.linear.weight" in keys:
            return GENERATOR
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        if role is not GENERATOR:
            raise NextScaleError(f"{role.what} is not a role of the Distilled Decoding family")
        module = DistilledVAR.from_state_dict(
            state_dict, path=path, config=DistilledVAR.config_from_file(path), operations=operations,
            compute_dtype=compute_dtype,
        )
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: DistilledVAR, tokenizer) -> None:
        if not isinstance(tokenizer, MultiScaleVQVAE):
            raise NextScaleError(
                f"Distilled Decoding draws VAR's tokens: connect VAR's VQ-VAE (vae_ch160v4096z32.pth), not "
                f"{type(tokenizer).__name__}"
            )
        check_inputs(generator, tokenizer)

    def class_names(self, generator: DistilledVAR) -> tuple[str, ...]:
        return default_class_names(generator.num_classes)

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        return sample_dd(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def kv_geometry(self, generator: DistilledVAR, schedule=None) -> KVGeometry:
        """The shape a cache of DD's tokens would have; DD keeps none (each step is one pass over the sequence)."""
        cfg = generator.config
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.head_dim, tuple(schedule or cfg.patch_nums))

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        """One pass over the whole sequence (``1 + L`` tokens, no guidance rows, no KV cache) with its dense
        attention mask, the previews, and the decoding."""
        activations = preview = decode = 0
        if generator is not None:
            cfg, rows, size = generator.config, workload.batch_size, workload.dtype.itemsize
            tokens = cfg.num_tokens + 1
            activations = transformer_step_bytes(rows, tokens, cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size, size)
            activations += tokens * tokens * 4 + 3 * rows * cfg.num_tokens * cfg.cvae * 4  # mask; noise, codes, output
        if tokenizer is not None:
            last_scale = tokenizer.patch_nums[-1]
            preview, decode = decoding_bytes(tokenizer, workload, last_scale, preview=generator is not None)
        weights = sum(weight_bytes(m) for m in (generator, tokenizer) if m is not None)
        return MemoryNeed(weights, 0, activations, preview, decode)


FAMILY = DDFamily()
