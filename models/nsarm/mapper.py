"""NSARM's transformation network (upstream ``Map_Transformer_residual_for8B``): the tokenizer latent of a
low-quality image to the residual codes of the first scales.

Architecture (keys under ``map_transformer.`` in ``NSARM.pth``):

- ``feature_extractor``: three 3x3 convolutions ``d -> 64 -> 128 -> d``, each followed by a LayerNorm over the whole
  ``(channels, G, G)`` map (weights of that shape, so the input grid ``G`` is fixed: 32 latent cells, a 256 px image
  for the 8B's f8 tokenizer) and an exact GELU.
- one branch per mapped scale ``i`` of side ``s_i`` (the 8B: sides 2, 4, 8, 12, 16, 24, 32; widths 64 ... 1024):
  ``feature_transforms.i`` (two such conv-LayerNorm-GELU stages ``d -> w/2 -> w``), an adaptive average pool to
  ``s_i x s_i``, ``transformers.i`` (post-norm encoder layers, ReLU feed-forward of ``4 w``, LayerNorm eps 1e-5:
  ``torch.nn.TransformerEncoderLayer``'s keys), and ``output_projs.i`` (``Linear(w, w/2)``, LayerNorm, GELU,
  ``Linear(w/2, d)``): ``(B, s_i * s_i, d)``.

The branch outputs are the mapped scales' residual codes, a cell's bit ``j`` set where channel ``j`` is positive.
How a ``(B, s*s, d)`` output becomes a ``(B, d, s, s)`` code map is ``MapperConfig.reading``:

- ``"reshape"`` (upstream's, the released NSARM's and the default): the output reinterpreted in memory order, so
  token ``t`` carries channel ``(t*d + j) // s^2`` at cell ``(t*d + j) % s^2``: every token gathers other cells'
  content, a routing a small network learns slowly (bench/bench_nsarm_mapper_reading.py);
- ``"tokens"`` (NextScale's small models may choose it): token ``t`` is cell ``t`` and its ``d`` values are that
  cell's channels (a transpose). Same modules and keys; only the reading differs, recorded in the file's metadata.

Head counts and the sides are not in the keys: a file saved by NextScale carries them in its metadata, a file
without metadata must have the 8B's branch widths and gets the 8B's (:meth:`MapperConfig.official`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checkpoint import key_shape
from ..core.errors import NextScaleError
from ..core.ops import ComputeDtype, TorchOps, cast

WHAT = "NSARM transformation network"
PREFIX = "map_transformer."
RESOLUTIONS = ("0.06M", "0.25M", "0.60M", "1M")
READINGS = ("reshape", "tokens")


@dataclass(frozen=True)
class MapperConfig:
    """Architecture of the transformation network. ``sides``/``widths``/``layers``/``heads``: one entry per mapped
    scale; ``stem``: the two hidden widths of the feature extractor; ``grid``: the input latent side;
    ``resolution``: the 1:1 Infinity schedule the model samples ('1M' for NSARM: 13 scales, 1024 px); ``reading``:
    how a branch's tokens become a code map (module docstring)."""

    channels: int = 14
    grid: int = 32
    sides: tuple[int, ...] = (2, 4, 8, 12, 16, 24, 32)
    widths: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024)
    layers: tuple[int, ...] = (4, 6, 8, 10, 12, 14, 16)
    heads: tuple[int, ...] = (4, 4, 8, 8, 8, 12, 16)
    stem: tuple[int, int] = (64, 128)
    mlp_ratio: int = 4
    resolution: str = "1M"
    reading: str = "reshape"

    def __post_init__(self):
        for name in ("sides", "widths", "layers", "heads", "stem"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.sides)
        problems = []
        if not n or any(len(getattr(self, k)) != n for k in ("widths", "layers", "heads")):
            problems.append("sides, widths, layers and heads need one entry per mapped scale")
        elif any(w % h or w % 2 for w, h in zip(self.widths, self.heads)):
            problems.append(f"widths {self.widths} must be even and divisible by heads {self.heads}")
        if len(self.stem) != 2 or min(self.channels, self.grid, self.mlp_ratio, *self.stem) < 1:
            problems.append("every size must be positive")
        if n and any(not 1 <= s <= self.grid for s in self.sides):
            problems.append(f"sides {self.sides} must lie in 1..{self.grid} (the input grid)")
        if self.resolution not in RESOLUTIONS:
            problems.append(f"resolution '{self.resolution}' is not one of {', '.join(RESOLUTIONS)}")
        if self.reading not in READINGS:
            problems.append(f"reading '{self.reading}' is not one of {', '.join(READINGS)}")
        if problems:
            raise NextScaleError("invalid NSARM transformation network config: " + "; ".join(problems))

    @classmethod
    def official(cls) -> MapperConfig:
        """The released NSARM's (Infinity-8B, f8 tokenizer with d = 14)."""
        return cls()

    @property
    def num_scales(self) -> int:
        return len(self.sides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> MapperConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NextScaleError(f"unknown NSARM transformation network config entries: {', '.join(unknown)}")
        return cls(**dict(d))


class EncoderAttention(ComputeDtype, nn.Module):
    """``torch.nn.MultiheadAttention``'s keys (``in_proj_weight (3w, w)``, ``in_proj_bias``, ``out_proj``); the
    packed projection is read through :func:`~..core.ops.cast` (no layer owns it)."""

    def __init__(self, width: int, heads: int, operations=TorchOps):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = operations.Linear(width, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        B, L, C = x_BLC.shape
        device, dtype = x_BLC.device, self.compute_dtype
        qkv = F.linear(x_BLC, cast(self.in_proj_weight, device, dtype), cast(self.in_proj_bias, device, dtype))
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))


class EncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` (post-norm, ReLU) with the same keys, built from the op set."""

    def __init__(self, width: int, heads: int, hidden: int, operations=TorchOps):
        super().__init__()
        self.self_attn = EncoderAttention(width, heads, operations)
        self.linear1 = operations.Linear(width, hidden)
        self.linear2 = operations.Linear(hidden, width)
        self.norm1 = operations.LayerNorm(width, eps=1e-5)
        self.norm2 = operations.LayerNorm(width, eps=1e-5)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        x_BLC = self.norm1(x_BLC + self.self_attn(x_BLC))
        return self.norm2(x_BLC + self.linear2(F.relu(self.linear1(x_BLC))))


class Encoder(nn.Module):
    """``torch.nn.TransformerEncoder`` without a final norm: key prefix ``layers.{j}``."""

    def __init__(self, width: int, heads: int, hidden: int, depth: int, operations=TorchOps):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads, hidden, operations) for _ in range(depth))

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x_BLC = layer(x_BLC)
        return x_BLC


def conv_stage(ops, cin: int, cout: int, grid: int) -> list[nn.Module]:
    return [ops.Conv2d(cin, cout, 3, padding=1), ops.LayerNorm([cout, grid, grid]), nn.GELU()]


class ScaleMapper(ComputeDtype, nn.Module):
    """The transformation network (module docstring); computes on the device of the latent it is given."""

    def __init__(self, config: MapperConfig, operations=None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        d, G = cfg.channels, cfg.grid
        self.feature_extractor = nn.Sequential(
            *conv_stage(ops, d, cfg.stem[0], G), *conv_stage(ops, cfg.stem[0], cfg.stem[1], G),
            *conv_stage(ops, cfg.stem[1], d, G),
        )
        self.feature_transforms = nn.ModuleList(
            nn.Sequential(*conv_stage(ops, d, w // 2, G), *conv_stage(ops, w // 2, w, G)) for w in cfg.widths
        )
        self.transformers = nn.ModuleList(
            Encoder(w, h, cfg.mlp_ratio * w, n, ops) for w, h, n in zip(cfg.widths, cfg.heads, cfg.layers)
        )
        self.output_projs = nn.ModuleList(
            nn.Sequential(ops.Linear(w, w // 2), ops.LayerNorm(w // 2), nn.GELU(), ops.Linear(w // 2, d))
            for w in cfg.widths
        )

    def forward(self, latent_BdGG: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """The residual codes ``(B, s*s, d)`` of the first ``count`` mapped scales (default: all)."""
        cfg = self.config
        if latent_BdGG.dim() != 4 or tuple(latent_BdGG.shape[1:]) != (cfg.channels, cfg.grid, cfg.grid):
            raise NextScaleError(
                f"the NSARM transformation network maps ({cfg.channels}, {cfg.grid}, {cfg.grid}) tokenizer latents, "
                f"got {list(latent_BdGG.shape[1:])}: give it an image of the model's input size"
            )
        features = self.feature_extractor(latent_BdGG.to(self.compute_dtype))
        out = []
        for i, side in enumerate(cfg.sides[: cfg.num_scales if count is None else count]):
            pooled = F.adaptive_avg_pool2d(self.feature_transforms[i](features), side)
            seq = self.transformers[i](pooled.flatten(2).transpose(1, 2))
            out.append(self.output_projs[i](seq))
        return out

    def code_map(self, codes_BLd: torch.Tensor) -> torch.Tensor:
        """A branch's output ``(B, s*s, d)`` read as the code map ``(B, d, s, s)`` (``config.reading``)."""
        B, L, d = codes_BLd.shape
        side = round(L**0.5)
        if self.config.reading == "tokens":
            return codes_BLd.transpose(1, 2).reshape(B, d, side, side)
        return codes_BLd.reshape(B, d, side, side)

    def bits(self, latent_BdGG: torch.Tensor, count: int | None = None) -> list[torch.Tensor]:
        """Bool ``bits_Bhwd (B, s, s, d)`` of the first ``count`` mapped scales (module docstring)."""
        return [(self.code_map(codes) > 0).permute(0, 2, 3, 1).contiguous() for codes in self(latent_BdGG, count)]

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> MapperConfig:
        """The config of the ``map_transformer.*`` keys of ``state_dict`` (prefix included), for a file without
        NextScale metadata: sizes from the shapes, sides and heads the 8B's (its widths are required)."""

        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, PREFIX + key, ndim, path, WHAT, ": it is not an NSARM checkpoint")

        branches = _indices(state_dict, r"output_projs\.(\d+)\.")
        if branches != list(range(len(branches))) or not branches:
            raise NextScaleError(f"{WHAT} in '{path}': its branches are not output_projs.0 ... output_projs.<n-1>")
        widths = tuple(shape(f"output_projs.{i}.0.weight", 2)[1] for i in branches)
        layers = tuple(len(_indices(state_dict, rf"transformers\.{i}\.layers\.(\d+)\.")) for i in branches)
        stem = shape("feature_extractor.0.weight", 4)
        official = MapperConfig.official()
        if widths != official.widths:
            raise NextScaleError(
                f"{WHAT} in '{path}' has branch widths {list(widths)}, not the released NSARM's "
                f"{list(official.widths)}, and no NextScale metadata giving its scale sides and heads: save it with "
                f"NextScale (NSARM.save) or use the released NSARM.pth"
            )
        return MapperConfig(
            channels=stem[1], grid=shape("feature_extractor.1.weight", 3)[2], sides=official.sides, widths=widths,
            layers=layers, heads=official.heads, stem=(stem[0], shape("feature_extractor.3.weight", 4)[0]),
            mlp_ratio=shape("transformers.0.layers.0.linear1.weight", 2)[0] // widths[0],
            resolution=official.resolution,
        )


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """The sorted numbers ``pattern``'s group matches in the ``map_transformer.*`` keys."""
    found = (re.match(re.escape(PREFIX) + pattern, k) for k in state_dict)
    return sorted({int(m[1]) for m in found if m})
