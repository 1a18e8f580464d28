"""The Switti family: text-to-image scale-wise transformers (Switti, Switti-AR, at 512 and 1024 px). The protocol is
:class:`~..core.family.Family`.

Switti's VQ-VAE (``yresearch/VQVAE-Switti``) has VAR's tokenizer layout key for key (a fine-tuned
``vae_ch160v4096z32``), so it is a VAR tokenizer to the registry and is built by VAR's ``MultiScaleVQVAE``; the
tokens are VAR's :class:`~..core.tokens.NextScaleTokens` on Switti's schedule. Encoding, decoding and previews are
VAR's (:class:`..var.family.VARTokensFamily`).
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

from ..core.errors import NextScaleError
from ..core.family import KVGeometry, Role, Workload
from ..core.memory import MemoryNeed, kv_cache_bytes, transformer_step_bytes, weight_bytes
from ..var.family import VARTokensFamily, decoding_bytes
from ..var.tokenizer import MultiScaleVQVAE
from .model import CLIP_G_DIM, CLIP_L_DIM, TEXT_TOKENS, WHAT, Switti
from .sampler import HOOKS, check_inputs, sample_switti

LOADER = "NextScale Load Switti"
HINT = (
    "Switti's files are published on Hugging Face: the transformers in yresearch/Switti, yresearch/Switti-AR, "
    "yresearch/Switti-1024 and yresearch/Switti-1024-AR (put each repository's folder, model.safetensors with its "
    "config.json, into the NextScale model folder), the VQ-VAE in yresearch/VQVAE-Switti; the text encoders are "
    "SDXL's clip_l and clip_g in ComfyUI/models/text_encoders"
)

GENERATOR = Role("generator", WHAT, "a Switti transformer (text-to-image)", LOADER)


class SwittiFamily(VARTokensFamily):
    name = "switti"
    title = "Switti"
    roles = (GENERATOR,)
    hooks = HOOKS
    files_hint = HINT
    decode_chunk = 4

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        if "text_pooler.weight" in keys and "blocks.0.cross_attn.to_kv.weight" in keys:
            return GENERATOR
        return None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        if role is not GENERATOR:
            raise NextScaleError(f"{role.what} is not a role of the Switti family")
        module = Switti.from_state_dict(
            state_dict, path=path, config=Switti.config_from_file(path), known=Switti.hub_fields(path),
            operations=operations, compute_dtype=compute_dtype,
        )
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: Switti, tokenizer) -> None:
        if not isinstance(tokenizer, MultiScaleVQVAE):
            raise NextScaleError(
                f"Switti draws VAR-layout tokens: connect its VQ-VAE (yresearch/VQVAE-Switti), not "
                f"{type(tokenizer).__name__}"
            )
        check_inputs(generator, tokenizer)

    def class_names(self, generator: Switti) -> tuple[str, ...]:
        raise NextScaleError("Switti models take a text prompt, not a class: use NextScale Switti Sampler")

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        return sample_switti(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def kv_geometry(self, generator: Switti, schedule=None) -> KVGeometry:
        cfg = generator.config
        scales = tuple(schedule) if schedule is not None else cfg.patch_nums
        return KVGeometry(cfg.depth, cfg.num_heads, cfg.head_dim, scales)

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        """Switti-AR's KV cache (none for Switti) and every block's text keys and values, the largest step's
        activations, the previews and the decoding."""
        kv = activations = preview = decode = 0
        if generator is not None:
            cfg, rows = generator.config, workload.rows
            size = workload.dtype.itemsize
            geometry = self.kv_geometry(generator, workload.schedule)
            if cfg.causal:
                kv += kv_cache_bytes(geometry, rows, size, workload.kv_policy)
            stream = max(size, 4)  # the text keys and values stay in the stream dtype (fp32 for half compute)
            kv += cfg.depth * 2 * rows * TEXT_TOKENS * cfg.embed_dim * stream
            kv += rows * TEXT_TOKENS * (CLIP_L_DIM + CLIP_G_DIM) * stream
            step = workload.step_tokens or max(geometry.areas)
            activations = transformer_step_bytes(rows, step, cfg.embed_dim, cfg.ffn_dim, cfg.vocab_size, size)
        if tokenizer is not None:
            patch_nums = workload.schedule or (generator.patch_nums if generator is not None else tokenizer.patch_nums)
            preview, decode = decoding_bytes(tokenizer, workload, patch_nums[-1], preview=generator is not None)
        weights = sum(weight_bytes(m) for m in (generator, tokenizer) if m is not None)
        return MemoryNeed(weights, kv, activations, preview, decode)


FAMILY = SwittiFamily()
