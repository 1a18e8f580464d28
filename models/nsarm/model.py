"""NSARM (upstream ``Infinity`` with ``map_transformer``): an Infinity transformer fine-tuned for super-resolution,
plus the transformation network that maps a low-quality image to its first scales.

``NSARM.pth`` is a plain state dict: every key of an Infinity-8B (``block_chunks.{c}.module.{j}.*``, ``cfg_uncond``,
``text_*``, ``word_embed``, ``head``, ...) and the ``map_transformer.*`` keys of :class:`~.mapper.ScaleMapper`.
:class:`NSARM` is an :class:`~..infinity.model.Infinity` (its sampler, KV cache and policies apply unchanged) with
the network as a submodule of the same name, so the keys load one for one, strictly.

The released model (``scripts/infer.sh`` upstream): Infinity-8B (depth 40, width 3584, 28 heads, 2x2 spatial
patchify, level embedding before the first block only, RoPE normalised to the 1M grid), the tokenizer
``infinity_vae_d56_f8_14_patchify.pth`` and flan-t5-xl; sampled on the 1:1 '1M' schedule (13 scales, 1024 px) from a
256 px input (a 32 x 32 latent), the first 7 scales mapped from the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.checkpoint import (
    CONFIG_METADATA_KEY,
    check_state_dict,
    check_tensors,
    config_from_metadata,
    load_on_meta,
    read_weights,
    save_safetensors,
    shapes_on_meta,
)
from ..core.errors import NextScaleError
from ..core.family import expect_kind
from ..core.ops import cast
from ..infinity.model import IGNORED_BUFFERS, Infinity, InfinityConfig
from ..infinity.schedule import InfinitySchedule
from .mapper import PREFIX, MapperConfig, ScaleMapper

WHAT = "NSARM super-resolution model"


@dataclass(frozen=True)
class NSARMConfig:
    """The transformer's and the transformation network's architectures."""

    infinity: InfinityConfig
    mapper: MapperConfig

    @classmethod
    def official(cls) -> NSARMConfig:
        return cls(InfinityConfig.official("8b"), MapperConfig.official())

    def to_dict(self) -> dict:
        return {"infinity": self.infinity.to_dict(), "mapper": self.mapper.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> NSARMConfig:
        if set(d) != {"infinity", "mapper"}:
            raise NextScaleError(f"an NSARM config has the entries 'infinity' and 'mapper', got {sorted(d)}")
        return cls(InfinityConfig.from_dict(d["infinity"]), MapperConfig.from_dict(d["mapper"]))


class NSARM(Infinity):
    """An Infinity transformer with ``map_transformer``; build it with :meth:`from_file` / :meth:`from_state_dict`.
    ``config`` (inherited) is the transformer's, :attr:`setup` both architectures."""

    def __init__(self, config: NSARMConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__(config.infinity, operations, compute_dtype)
        self.setup = config
        self.map_transformer = ScaleMapper(config.mapper, operations)
        self.compute_dtype = compute_dtype

    @property
    def mapper_config(self) -> MapperConfig:
        return self.setup.mapper

    def schedule(self) -> InfinitySchedule:
        """The 1:1 schedule it samples (the transformer's token grids)."""
        return InfinitySchedule.from_template(1.0, self.mapper_config.resolution)

    def empty_prompt(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_BTC, mask_BT)`` of one token, the first row of the learned unconditional embedding: the prompt
        when none is given (no text encoder needed)."""
        row = cast(self.cfg_uncond[:1], device, torch.float32)
        return row.expand(batch_size, 1, -1), torch.ones(batch_size, 1, dtype=torch.bool, device=device)

    # -- checkpoints --------------------------------------------------------------------------------

    @staticmethod
    def expected_shapes(config: NSARMConfig) -> dict[str, tuple[int, ...]]:
        return shapes_on_meta(lambda: NSARM(config))

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> NSARMConfig:
        """The config implied by the keys and shapes (the network's sides and heads: the released model's)."""
        transformer = {k: v for k, v in state_dict.items() if not k.startswith(PREFIX)}
        return NSARMConfig(Infinity.infer_config(transformer, path), ScaleMapper.infer_config(state_dict, path))

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        config: NSARMConfig | None = None,
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> NSARM:
        """A frozen fp32 model in eval mode holding ``state_dict``, strictly checked (meta-device build, tensors
        taken over), built with ``operations`` to compute in ``compute_dtype``."""
        state_dict = {k: v for k, v in state_dict.items() if k not in IGNORED_BUFFERS}
        check_tensors(state_dict, path, WHAT)
        cfg = config or cls.infer_config(state_dict, path)
        anchor = state_dict.get("pos_start")
        rebuilt = cls.rebuilt_buffers(cfg.infinity, device=None if anchor is None else anchor.device)
        check_state_dict(state_dict, cls.expected_shapes(cfg), path, WHAT, optional=rebuilt)
        return load_on_meta(lambda: cls(cfg, operations, compute_dtype), {**state_dict, **rebuilt})

    @staticmethod
    def config_from_file(path: str) -> NSARMConfig | None:
        return config_from_metadata(path, NSARMConfig.from_dict, WHAT)

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> NSARM:
        """Load ``NSARM.pth`` (read with ``weights_only=True``) or a safetensors file saved by :meth:`save`."""
        state_dict = read_weights(path, WHAT)
        expect_kind(state_dict, path, "nsarm-upscaler", WHAT)
        return cls.from_state_dict(
            state_dict, path, cls.config_from_file(path), operations=operations, compute_dtype=compute_dtype
        )

    def save(self, path: str) -> None:
        save_safetensors(self.state_dict(), path, {CONFIG_METADATA_KEY: self.setup.to_dict()})

    def extra_repr(self) -> str:
        m = self.mapper_config
        return f"{super().extra_repr()}, mapped scales={m.sides}, input grid={m.grid}, {m.resolution}"
