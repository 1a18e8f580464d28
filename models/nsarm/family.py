"""The NSARM family: next-scale super-resolution. The protocol is :class:`~..core.family.Family`.

NSARM is its own family rather than a role of Infinity's because a run takes an image, not a prompt alone, and its
model is a file of its own kind (the ``map_transformer.*`` keys); everything else is Infinity's and is reused: the
model is an :class:`~..infinity.model.Infinity`, the tokenizer an Infinity BSQ tokenizer (loaded by NextScale Load
NSARM through the Infinity tokenizer role), the scale loop, the token type, decoding, previews and the KV geometry.
The family is listed before Infinity's in the registry, so that an NSARM file is not taken for an Infinity one.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import replace

from ..core.errors import NextScaleError
from ..core.family import Role, Workload
from ..core.memory import MemoryNeed, conv_coder_bytes
from ..infinity.family import DECODER_COPIES, InfinityFamily
from .mapper import PREFIX
from .model import NSARM, WHAT
from .sampler import check_pair, input_size, sample_nsarm

LOADER = "NextScale Load NSARM"
HINT = (
    "NSARM's weights are linked from github.com/Xiangtaokong/NSARM: join the parts (cat NSARM_part_* > NSARM.pth; "
    "md5 16905db52d64fd44c365b6a963a6598d) and put NSARM.pth into the NextScale model folder with Infinity's "
    "infinity_vae_d56_f8_14_patchify.pth (Hugging Face FoundationVision/Infinity); for prompts, flan-t5-xl "
    "(google/flan-t5-xl) into ComfyUI/models/text_encoders"
)

UPSCALER = Role("upscaler", WHAT, "an NSARM super-resolution model (Infinity with a transformation network)", LOADER)


class NSARMFamily(InfinityFamily):
    name = "nsarm"
    title = "NSARM"
    roles = (UPSCALER,)
    hooks = frozenset({"control", "kv_policy", "callback"})
    files_hint = HINT

    def detect(self, keys: AbstractSet[str]) -> Role | None:
        return UPSCALER if any(k.startswith(PREFIX) for k in keys) else None

    def build(self, role, state_dict, path, *, dtype, operations=None, compute_dtype=None):
        if role is not UPSCALER:
            raise NextScaleError(f"{role.what} is not a role of the NSARM family")
        module = NSARM.from_state_dict(
            state_dict, path=path, config=NSARM.config_from_file(path), operations=operations,
            compute_dtype=compute_dtype,
        )
        return module.to(dtype=dtype).eval().requires_grad_(False)

    def check_pair(self, generator: NSARM, tokenizer) -> None:
        check_pair(generator, tokenizer)

    def sample(self, generator, tokenizer, condition, *, seed, options=None, hooks=None, device=None):
        """``condition`` is an :class:`~.sampler.UpscaleCondition`, ``options`` :class:`~.sampler.UpscaleOptions`."""
        return sample_nsarm(generator, tokenizer, condition, seed=seed, options=options, hooks=hooks, device=device)

    def encode(self, tokenizer, images_B3HW, schedule=None, resize="stretch"):
        raise NextScaleError("NSARM encodes its input inside NextScale Upscale: connect the image there")

    def kv_geometry(self, generator: NSARM, schedule=None):
        return super().kv_geometry(generator, schedule or generator.schedule())

    def memory(self, generator, tokenizer, workload: Workload) -> MemoryNeed:
        """Infinity's (cache, largest step, previews, decoding) on the model's schedule, plus encoding the input and
        the transformation network's largest branch, which run before the cache exists."""
        if generator is None:
            return super().memory(None, tokenizer, workload)
        need = super().memory(generator, tokenizer, replace(workload, schedule=generator.schedule()))
        cfg, size = generator.mapper_config, workload.dtype.itemsize
        rows = workload.batch_size
        maps = 4 * rows * max(cfg.stem + cfg.widths) * cfg.grid * cfg.grid * size
        tokens = max(s * s * w * (cfg.mlp_ratio + 4) for s, w in zip(cfg.sides, cfg.widths))
        mapping = maps + rows * tokens * size
        if tokenizer is not None:
            side = input_size(generator, tokenizer)
            levels = [tokenizer.config.base_ch * m for m in tokenizer.config.ch_mult]
            mapping += conv_coder_bytes(rows, levels, side, side, workload.decode_dtype.itemsize, DECODER_COPIES)
        return replace(need, decode=max(need.decode, mapping))


FAMILY = NSARMFamily()
