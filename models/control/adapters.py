"""Control injection for the sampler's :class:`~.sampler.Control` hook: CAR (official weights) and NextScale adapters.

Background in docs/control.md. Everything here is driven through ``block_input(si, layer, x_RlC)``
(all CFG rows: the ``B`` conditional rows, then the ``B`` null rows) and ``logits(si, logits_BlV)``.

CAR (MiracleDance/CAR, VAR-d16 canny/HED/depth/normal/sketch files ``car_*_d16.pth``):
- Keys: ``car_control_convs`` (conv encoder 3 -> 64 -> 128 -> 256 -> 512 -> 1024 -> C, stride 16: ``conv_in``,
  ``blocks.{2i}`` a 3x3 conv at ``c_i``, ``blocks.{2i+1}`` a 3x3 stride-2 conv ``c_i -> c_{i+1}``, ``conv_out``,
  SiLU after every conv but the last), ``car_var_conv`` (3x3 conv C -> C), ``car_blocks.{0..n-1}`` (``n = depth // 2``
  VAR blocks, same keys as the generator's), ``car_skip_norm.{j}`` (LayerNorm(2C), fp32) and
  ``car_skip_linear.{j}`` (Linear(2C, C)). ``car_blocks.*.attn.zero_k_bias`` are optional (rebuilt).
- Scale ``si``: the control image, resized to ``16 pn x 16 pn`` and scaled to -1..1, is encoded to ``(C, pn, pn)``;
  the branch input is ``car_var_conv(word_embed(next-scale input))`` (at scale 0: class embedding + ``pos_start``)
  plus that map plus the level/position embedding; it runs through the ``n`` control blocks with their own KV
  cache. Before generator block ``b >= depth // 2``: ``x = skip_linear(skip_norm([x, ctrl]))`` with the control
  blocks' outputs taken deepest first (block ``depth // 2 + j`` gets control output ``n - 1 - j``). The control
  is the same on the conditional and the null rows.
- The hook gives the hidden state, not the pieces it was summed from, so the branch input is recovered as
  ``x - lvl_pos`` (and at scale 0 the class embedding as ``x - pos_start - lvl_pos``): exact up to one rounding of
  the sum (about 1e-7 relative in fp32, one ulp of the activations in fp16/bf16).
- NextScale extensions (not in CAR): ``strength`` ``x <- x + s (fused - x)`` (1 = CAR, 0 = no control, exactly) and
  a scale range ``[start, end)`` outside which the generator's blocks are untouched (the branch still runs on
  earlier scales to build its cache; it stops after the last active scale).
- The branch's outputs are kept per scale until the generator's last block has taken them, so a pass that goes
  block by block over several scales' segments (collaborative decoding's refiner prefill: block 0 sees every
  drafted scale before block 1 sees any) fuses each segment with its own scale's outputs.

Adapters (NextScale's own, trained by ``training/train_control.py`` on a frozen generator):
- One interface, :class:`ControlAdapter`: a small conv encoder maps the control image to a feature grid, average-
  pooled to every scale's ``pn x pn`` grid, plus a learned per-scale embedding: control tokens ``(B, pn**2, F)``.
- ``kind="add"`` (ControlAR-style, section 1): before each injection layer, ``x += strength * MLP_j(tokens)`` with
  the MLP's last linear zero-initialised; the token at position ``p`` of scale ``si`` gets the control of the same
  position (in VAR the input at a position predicts that position's token).
- ``kind="reference"`` (ScaleWeaver-style, section 3): ``x += strength * gate_j * CrossAttn_j(LN(x), tokens)``,
  image queries attending to the same scale's control tokens only, through a zero-initialised per-channel gate.
- Zero-initialised adapters, strength 0 and scales outside the range leave the hidden state bit-identical.
- ECM's temperature schedule (section 4): ``late_temperature`` divides the guided logits from ``late_from_scale``
  on (1 = off), applied through the hook's ``logits``.

Both are built from an op set (``operations``, :mod:`..core.ops`) and compute in their own ``compute_dtype``: CAR's
branch on the device of the hidden state it is given, an adapter's control tokens on the control image's device.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import AdaLNSelfAttn
from ..core.checkpoint import check_state_dict, key_shape, read_safetensors_metadata, read_state_dict, save_safetensors
from ..core.errors import NextScaleError
from ..core.hooks import Control
from ..core.kv_cache import KVCache
from ..core.ops import ComputeDtype, TorchOps, cast, weight_and_bias
from ..core.schedule import token_count

CAR_WHAT = "CAR control"
ADAPTER_WHAT = "NextScale control adapter"
ADAPTER_PREFIX = "adapter_"
CONFIG_METADATA_KEY = "nextscale_config"
ADAPTER_KINDS = ("add", "reference")
CAR_HINT = ("CAR files (car_canny_d16.pth, car_hed_d16.pth, ...) are published in the Hugging Face repository "
            "MiracleDance/CAR")


# ---------------------------------------------------------------------------------------------------------------
# CAR


@dataclass(frozen=True)
class CARConfig:
    """CAR's control branch; ``depth`` is the number of control blocks (the generator's depth // 2)."""

    embed_dim: int
    num_heads: int
    depth: int
    hidden_dim: int
    encoder_channels: tuple[int, ...] = (64, 128, 256, 512, 1024)
    in_channels: int = 3
    shared_aln: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        if (
            min(self.embed_dim, self.num_heads, self.depth, self.hidden_dim, self.in_channels) < 1
            or not self.encoder_channels
        ):
            raise NextScaleError(f"CAR config has a non-positive size: {self}")
        if self.embed_dim % self.num_heads:
            raise NextScaleError(f"CAR config: width {self.embed_dim} is not divisible by {self.num_heads} heads")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_channels) - 1)


class ConvEncoder(nn.Module):
    """``conv_in``, then per stage a 3x3 conv and a 3x3 stride-2 conv (``blocks``), then ``conv_out``; SiLU after
    every conv except ``conv_out``. Downsamples by ``2 ** (len(channels) - 1)``."""

    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int, operations=TorchOps):
        super().__init__()
        self.conv_in = operations.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in itertools.pairwise(channels):
            self.blocks.append(operations.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(operations.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = operations.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x_B3HW))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class CARControlNet(ComputeDtype, nn.Module):
    """CAR's control branch with the official key names; build it with :meth:`from_state_dict` / :meth:`from_file`.
    ``operations``: the op set its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes
    in (default: its weights' dtype)."""

    def __init__(self, config: CARConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        C = cfg.embed_dim
        self.car_control_convs = ConvEncoder(cfg.in_channels, cfg.encoder_channels, C, ops)
        self.car_var_conv = ops.Conv2d(C, C, 3, padding=1)
        self.car_blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.num_heads, cfg.hidden_dim, cfg.norm_eps, cfg.shared_aln, ops) for _ in range(cfg.depth)
        )
        self.car_skip_norm = nn.ModuleList(ops.LayerNorm(2 * C, eps=1e-6) for _ in range(cfg.depth))
        self.car_skip_linear = nn.ModuleList(ops.Linear(2 * C, C) for _ in range(cfg.depth))
        self.compute_dtype = compute_dtype

    def fuse(self, j: int, x_BlC: torch.Tensor, ctrl_BlC: torch.Tensor) -> torch.Tensor:
        """``skip_linear_j(LayerNorm_fp32([x, ctrl]))`` in ``x``'s dtype."""
        norm = self.car_skip_norm[j]
        cat = torch.cat((x_BlC, ctrl_BlC.to(x_BlC.dtype)), dim=-1).float()
        h = F.layer_norm(cat, norm.normalized_shape, *weight_and_bias(norm, cat.device, torch.float32), norm.eps)
        return self.car_skip_linear[j](h.to(self.compute_dtype)).to(x_BlC.dtype)

    def check_base(self, var) -> None:
        """A clear error when this branch cannot drive ``var`` (CAR exists for VAR-d16 only)."""
        c, v = self.config, var.config
        if (c.embed_dim, c.num_heads, 2 * c.depth, c.shared_aln) != (v.embed_dim, v.num_heads, v.depth, v.shared_aln):
            raise NextScaleError(
                f"this CAR control was trained for a generator of width {c.embed_dim}, {c.num_heads} heads and "
                f"{2 * c.depth} blocks (VAR-d{2 * c.depth}); the connected generator has width {v.embed_dim}, "
                f"{v.num_heads} heads and {v.depth} blocks. Use the generator it was made for (CAR: var_d16.pth)"
            )

    @staticmethod
    def expected_shapes(config: CARConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = CARControlNet(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @staticmethod
    def rebuilt_buffers(config: CARConfig, device=None) -> dict[str, torch.Tensor]:
        return {f"car_blocks.{i}.attn.zero_k_bias": torch.zeros(config.embed_dim, device=device)
                for i in range(config.depth)}

    @staticmethod
    def infer_config(state_dict: Mapping[str, torch.Tensor], path: str = "<state dict>") -> CARConfig:
        def shape(key: str, ndim: int) -> tuple[int, ...]:
            return key_shape(state_dict, key, ndim, path, CAR_WHAT, f": it is not a CAR control file. {CAR_HINT}")

        C = shape("car_var_conv.weight", 4)[0]
        blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"car_blocks\.(\d+)\.", k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise NextScaleError(
                f"{CAR_WHAT} file '{path}' has control blocks {blocks[:8]}; expected car_blocks.0 ... car_blocks.<n-1>"
            )
        convs = sorted({int(m.group(1)) for k in state_dict
                        if (m := re.match(r"car_control_convs\.blocks\.(\d+)\.", k))})
        if len(convs) % 2 or convs != list(range(len(convs))):
            raise NextScaleError(
                f"{CAR_WHAT} file '{path}' has encoder convs {convs}; expected an even count 0 ... 2k-1"
            )
        c_in, in_channels = shape("car_control_convs.conv_in.weight", 4)[:2]
        channels = [c_in] + [shape(f"car_control_convs.blocks.{2 * i + 1}.weight", 4)[0]
                             for i in range(len(convs) // 2)]
        return CARConfig(
            embed_dim=C,
            num_heads=shape("car_blocks.0.attn.scale_mul_1H11", 4)[1],
            depth=len(blocks),
            hidden_dim=shape("car_blocks.0.ffn.fc1.weight", 2)[0],
            encoder_channels=tuple(channels),
            in_channels=in_channels,
            shared_aln="car_blocks.0.ada_gss" in state_dict,
        )

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        path: str = "<state dict>",
        *,
        operations=None,
        compute_dtype: torch.dtype | None = None,
    ) -> CARControlNet:
        """A frozen fp32 branch holding ``state_dict`` (checked strictly: missing, unexpected, mis-shaped keys),
        built with ``operations`` to compute in ``compute_dtype``."""
        if any(k.startswith(("blocks.", "class_emb.")) for k in state_dict):  # a merged CAR + VAR checkpoint
            state_dict = {k: v for k, v in state_dict.items() if k.startswith("car_")}
        cfg = cls.infer_config(state_dict, path)
        rebuilt = cls.rebuilt_buffers(cfg, device=state_dict["car_var_conv.weight"].device)
        check_state_dict(state_dict, cls.expected_shapes(cfg), path, CAR_WHAT, optional=rebuilt)
        with torch.device("meta"):
            model = cls(cfg, operations, compute_dtype)
        model.load_state_dict({**state_dict, **rebuilt}, strict=True, assign=True)
        return model.float().eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> CARControlNet:
        return cls.from_state_dict(
            read_state_dict(path, CAR_WHAT), path, operations=operations, compute_dtype=compute_dtype
        )

    def bind(self, var, control_B3HW: torch.Tensor, **kwargs) -> CARControl:
        return CARControl(self, var, control_B3HW, **kwargs)


def _resize(x_B3HW: torch.Tensor, side: int) -> torch.Tensor:
    if x_B3HW.shape[-2:] == (side, side):
        return x_B3HW
    down = side < max(x_B3HW.shape[-2:])
    return F.interpolate(x_B3HW, size=(side, side), mode="bicubic", align_corners=False, antialias=down).clamp(-1, 1)


def _check_control_image(control_B3HW: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    if control_B3HW.dim() != 4 or control_B3HW.shape[1] != 3:
        raise NextScaleError(f"the control image must be (batch, 3, height, width), got {list(control_B3HW.shape)}")
    if batch_size is not None and control_B3HW.shape[0] not in (1, batch_size):
        raise NextScaleError(
            f"the control image batch has {control_B3HW.shape[0]} images but the sampler makes {batch_size}: "
            f"give one control image, or one per sampled image"
        )
    return control_B3HW.float()


def _rows(t_B: torch.Tensor, R: int) -> torch.Tensor:
    """Per-image tensors ``(B or 1, ...)`` to the CFG rows ``(R, ...)``: ``[t; t]`` (conditional, then null)."""
    if t_B.shape[0] == R:
        return t_B
    if t_B.shape[0] == 1:
        return t_B.expand(R, *t_B.shape[1:])
    return t_B.repeat(R // t_B.shape[0], *([1] * (t_B.dim() - 1)))


class ScaleWindow(Control):
    """Strength, scale range and ECM's late temperature shared by every control binding."""

    def __init__(self, num_scales: int, strength: float = 1.0, start_scale: int = 0, end_scale: int | None = None,
                 late_temperature: float = 1.0, late_from_scale: int | None = None):
        end = num_scales if end_scale is None or end_scale <= 0 else min(end_scale, num_scales)
        if not 0 <= start_scale < end:
            raise NextScaleError(
                f"control scale range [{start_scale}, {end_scale}) is empty: this generator has {num_scales} scales "
                f"(0..{num_scales - 1}); start must be below end (0 = through the last scale)"
            )
        if not late_temperature > 0:
            raise NextScaleError(f"late_temperature must be positive, got {late_temperature}")
        self.num_scales, self.strength, self.start, self.end = num_scales, float(strength), int(start_scale), end
        self.late_temperature = float(late_temperature)
        self.late_from = (num_scales * 2) // 3 if late_from_scale is None else int(late_from_scale)

    def active(self, si: int) -> bool:
        return self.strength != 0 and self.start <= si < self.end

    def logits(self, si: int, logits_BlV: torch.Tensor) -> torch.Tensor:
        if self.late_temperature != 1.0 and si >= self.late_from:
            return logits_BlV / self.late_temperature
        return logits_BlV


class CARControl(ScaleWindow):
    """One run of CAR's branch alongside the generator (its own KV cache); see the module docstring."""

    def __init__(self, car: CARControlNet, var, control_B3HW: torch.Tensor, batch_size: int | None = None, **window):
        super().__init__(len(var.patch_nums), **window)
        car.check_base(var)
        self.car, self.var, self.half = car, var, var.depth // 2
        self.control_B3HW = _check_control_image(control_B3HW, batch_size)
        self.begins = [token_count(var.patch_nums[:si]) for si in range(len(var.patch_nums))]
        self.cache: KVCache | None = None
        self.outs: dict[int, list[torch.Tensor]] = {}  # scale -> the branch's block outputs, until fused
        self.ada: list[torch.Tensor] = []

    def _branch(self, si: int, x_RlC: torch.Tensor) -> list[torch.Tensor]:
        car, var, device = self.car, self.var, x_RlC.device
        pn, begin = var.patch_nums[si], self.begins[si]
        R, l, C = x_RlC.shape
        with torch.no_grad():
            lvl_pos_1lC = var.level_positions(device)[:, begin : begin + l]
        dtype = car.compute_dtype
        if si == 0:  # a new run: recover the class embedding, modulations and a fresh cache
            pos_start_1C = cast(var.pos_start, device, var.compute_dtype)[:, 0]
            cond_RD = (x_RlC[:, 0] - pos_start_1C - lvl_pos_1lC[:, 0]).to(dtype)
            if var.config.shared_aln:
                cond_RD = var.shared_ada_lin(cond_RD).view(-1, 1, 6, C)
            self.ada = [block.modulation(cond_RD) for block in car.car_blocks]
            if self.cache is not None:
                self.cache.free()
            self.cache = KVCache(len(car.car_blocks), var.num_tokens)
        tokens_RlC = x_RlC - lvl_pos_1lC  # scale 0: class embedding + pos_start; later: word_embed(next input)
        img = _resize(self.control_B3HW.to(device), car.config.downsample * pn).to(dtype)
        ctrl_BChw = car.car_control_convs(img)
        map_RChw = tokens_RlC.to(dtype).transpose(1, 2).reshape(R, C, pn, pn)
        h_RChw = car.car_var_conv(map_RChw) + _rows(ctrl_BChw, R)
        h_RlC = h_RChw.flatten(2).transpose(1, 2) + lvl_pos_1lC.to(dtype)
        self.cache.begin_scale(si)
        outs = []
        for i, block in enumerate(car.car_blocks):
            h_RlC = block(h_RlC, self.ada[i], kv=self.cache[i])
            outs.append(h_RlC)
        if si == self.end - 1:
            self.finish()
        return outs

    def block_input(self, si: int, layer: int, x_BlC: torch.Tensor) -> torch.Tensor:
        if layer == 0 and si < self.end:
            self.outs[si] = self._branch(si, x_BlC)
        outs = self.outs.pop(si, None) if layer == self.var.depth - 1 else self.outs.get(si)
        if layer < self.half or not self.active(si):
            return x_BlC
        j = layer - self.half
        fused = self.car.fuse(j, x_BlC, outs[len(outs) - 1 - j])
        return fused if self.strength == 1 else x_BlC + self.strength * (fused - x_BlC)

    def finish(self) -> None:
        if self.cache is not None:
            self.cache.free()
            self.cache = None


# ---------------------------------------------------------------------------------------------------------------
# NextScale adapters (ControlAR-style additive, ScaleWeaver-style reference attention)


@dataclass(frozen=True)
class AdapterConfig:
    """A control adapter for a generator of width ``embed_dim``, ``base_depth`` blocks and ``num_scales`` scales."""

    embed_dim: int
    base_depth: int
    num_scales: int
    layers: tuple[int, ...] = (0,)
    kind: str = "add"
    channels: tuple[int, ...] = (32, 64, 128)
    feat_dim: int = 128
    image_size: int = 128
    num_heads: int = 4
    control_type: str = "edges"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.kind not in ADAPTER_KINDS:
            raise NextScaleError(f"adapter kind '{self.kind}' is not one of {', '.join(ADAPTER_KINDS)}")
        if (
            not self.layers
            or len(set(self.layers)) != len(self.layers)
            or not all(0 <= i < self.base_depth for i in self.layers)
        ):
            raise NextScaleError(f"adapter layers {self.layers} must be distinct blocks in 0..{self.base_depth - 1}")
        if min(self.embed_dim, self.num_scales, self.feat_dim, self.image_size, self.num_heads, *self.channels) < 1:
            raise NextScaleError(f"adapter config has a non-positive size: {self}")
        if self.feat_dim % self.num_heads:
            raise NextScaleError(f"adapter feat_dim {self.feat_dim} is not divisible by {self.num_heads} heads")

    @classmethod
    def for_generator(cls, var_config, layers: Sequence[int] | None = None, **kw) -> AdapterConfig:
        """ControlAR's placement by default: blocks ``0, depth // 3, 2 depth // 3``."""
        d = var_config.depth
        layers = sorted({0, d // 3, (2 * d) // 3}) if layers is None else layers
        return cls(embed_dim=var_config.embed_dim, base_depth=d, num_scales=len(var_config.patch_nums),
                   layers=tuple(layers), **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"], d["channels"] = list(self.layers), list(self.channels)
        return {"type": "control-adapter", **d}

    @classmethod
    def from_dict(cls, d: Mapping) -> AdapterConfig:
        d = {k: v for k, v in d.items() if k != "type"}
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise NextScaleError(f"adapter config has unknown field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise NextScaleError(f"adapter config is incomplete: {e}") from None


class ReferenceAttention(nn.Module):
    """Image queries attend to one scale's control tokens; the output passes a zero-initialised per-channel gate."""

    def __init__(self, embed_dim: int, feat_dim: int, num_heads: int, operations=TorchOps):
        super().__init__()
        self.num_heads = num_heads
        self.q = operations.Linear(embed_dim, feat_dim)
        self.kv = operations.Linear(feat_dim, 2 * feat_dim)
        self.out = operations.Linear(feat_dim, embed_dim)
        self.gate = nn.Parameter(torch.zeros(embed_dim))

    def forward(self, x_BlC: torch.Tensor, tok_BlF: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, l, _ = x_BlC.shape
        H = self.num_heads
        q = self.q(F.layer_norm(x_BlC, x_BlC.shape[-1:])).view(B, l, H, -1).transpose(1, 2)
        k, v = self.kv(tok_BlF).view(B, tok_BlF.shape[1], 2, H, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out_BlC = self.out(o.transpose(1, 2).reshape(B, l, -1))
        return out_BlC * cast(self.gate, out_BlC.device, out_BlC.dtype)


class ControlAdapter(ComputeDtype, nn.Module):
    """NextScale's trainable control adapter (both kinds); keys start with ``adapter_``. ``operations``: the op set
    its layers come from (default: plain torch); ``compute_dtype``: the dtype it computes in (default: its weights')."""

    def __init__(self, config: AdapterConfig, operations=None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        ops = operations or TorchOps
        self.adapter_encoder = ConvEncoder(3, cfg.channels, cfg.feat_dim, ops)
        self.adapter_scale_embed = ops.Embedding(cfg.num_scales, cfg.feat_dim)
        nn.init.normal_(self.adapter_scale_embed.weight, std=0.02)
        if cfg.kind == "add":
            feat, width = cfg.feat_dim, cfg.embed_dim
            self.adapter_inject = nn.ModuleList(
                nn.Sequential(ops.Linear(feat, feat), nn.GELU(), ops.Linear(feat, width)) for _ in cfg.layers
            )
            for mlp in self.adapter_inject:
                nn.init.zeros_(mlp[2].weight)
                nn.init.zeros_(mlp[2].bias)
        else:
            self.adapter_inject = nn.ModuleList(
                ReferenceAttention(cfg.embed_dim, cfg.feat_dim, cfg.num_heads, ops) for _ in cfg.layers
            )
        self.slot = {layer: j for j, layer in enumerate(cfg.layers)}
        self.compute_dtype = compute_dtype

    def control_tokens(self, control_B3HW: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
        """Per scale ``(B, pn**2, F)``: the encoded control image pooled to ``pn x pn`` plus the scale embedding,
        on the image's device."""
        dtype = self.compute_dtype
        feat_BFhw = self.adapter_encoder(_resize(control_B3HW.float(), self.config.image_size).to(dtype))
        scales_KF, _ = weight_and_bias(self.adapter_scale_embed, feat_BFhw.device, dtype)
        return [
            F.adaptive_avg_pool2d(feat_BFhw, pn).flatten(2).transpose(1, 2) + scales_KF[si]
            for si, pn in enumerate(patch_nums)
        ]

    def inject(self, layer: int, x_BlC: torch.Tensor, tok_BlF: torch.Tensor, strength: float = 1.0,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` plus this layer's control contribution times ``strength``."""
        module = self.adapter_inject[self.slot[layer]]
        dtype = self.compute_dtype  # the adapter's own; x is the generator's fp32 stream
        tok_BlF = tok_BlF.to(dtype)
        delta = module(tok_BlF) if self.config.kind == "add" else module(x_BlC.to(dtype), tok_BlF, attn_mask)
        return x_BlC + strength * delta.to(x_BlC.dtype)

    def check_base(self, var) -> None:
        c, v = self.config, var.config
        if (c.embed_dim, c.base_depth, c.num_scales) != (v.embed_dim, v.depth, len(v.patch_nums)):
            raise NextScaleError(
                f"this control adapter was trained for a generator of width {c.embed_dim}, {c.base_depth} blocks and "
                f"{c.num_scales} scales; the connected generator has width {v.embed_dim}, {v.depth} blocks and "
                f"{len(v.patch_nums)} scales. Use the generator it was trained on"
            )

    def bind(self, var, control_B3HW: torch.Tensor, **kwargs) -> AdapterControl:
        return AdapterControl(self, var, control_B3HW, **kwargs)

    # -- files ----------------------------------------------------------------------------------------------------

    @staticmethod
    def expected_shapes(config: AdapterConfig) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = ControlAdapter(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], config: AdapterConfig,
                        path: str = "<state dict>", *, operations=None,
                        compute_dtype: torch.dtype | None = None) -> ControlAdapter:
        """A frozen fp32 adapter holding ``state_dict`` (checked strictly against ``config``), built with
        ``operations`` to compute in ``compute_dtype``."""
        check_state_dict(state_dict, cls.expected_shapes(config), path, ADAPTER_WHAT)
        with torch.device("meta"):
            model = cls(config, operations, compute_dtype)
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
        return model.float().eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str, *, operations=None, compute_dtype: torch.dtype | None = None) -> ControlAdapter:
        meta = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
        if meta is None:
            raise NextScaleError(
                f"{ADAPTER_WHAT} file '{path}' has no '{CONFIG_METADATA_KEY}' metadata: adapters are safetensors "
                f"written by training/train_control.py"
            )
        try:
            config = AdapterConfig.from_dict(json.loads(meta))
        except ValueError as e:
            raise NextScaleError(f"{ADAPTER_WHAT} file '{path}' has an invalid config: {e}") from None
        return cls.from_state_dict(
            read_state_dict(path, ADAPTER_WHAT), config, path, operations=operations, compute_dtype=compute_dtype
        )

    def save(self, path: str, dtype: torch.dtype | None = None) -> None:
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
              for k, v in self.state_dict().items()}
        save_safetensors(sd, path, {CONFIG_METADATA_KEY: self.config.to_dict()})


class AdapterControl(ScaleWindow):
    """One run of an adapter: control tokens per scale, added at the adapter's layers (see the module docstring)."""

    def __init__(self, adapter: ControlAdapter, var, control_B3HW: torch.Tensor, batch_size: int | None = None,
                 uncond: bool = True, **window):
        super().__init__(len(var.patch_nums), **window)
        adapter.check_base(var)
        self.adapter, self.uncond = adapter, uncond
        control_B3HW = _check_control_image(control_B3HW, batch_size)
        with torch.no_grad():
            self.tokens = adapter.control_tokens(control_B3HW, var.patch_nums)

    def block_input(self, si: int, layer: int, x_BlC: torch.Tensor) -> torch.Tensor:
        if layer not in self.adapter.slot or not self.active(si):
            return x_BlC
        R = x_BlC.shape[0]
        tok = self.tokens[si].to(x_BlC.device)
        if self.uncond or tok.shape[0] == R:  # the null rows get the control too (as CAR does), or no CFG
            return self.adapter.inject(layer, x_BlC, _rows(tok, R), self.strength)
        B = R // 2  # ControlAR: the null rows get no control, so guidance amplifies it
        out = self.adapter.inject(layer, x_BlC[:B], _rows(tok, B), self.strength)
        return torch.cat((out, x_BlC[B:]))


def teacher_logits(var, adapter: ControlAdapter, label_B: torch.Tensor, x_BLCv: torch.Tensor,
                   control_B3HW: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """fp32 ``logits_BLV`` of :meth:`VAR.forward_teacher` with ``adapter`` injected (training): the same blocks and
    block-causal mask, each token getting its own scale's control token; reference attention stays within a scale."""
    pn = var.patch_nums
    l, device = x_BLCv.shape[1] + 1, x_BLCv.device
    cond = var.condition(label_B)
    x_BLC = (torch.cat((var.start_token(cond.cond_BD), var.word_embed(x_BLCv.to(var.compute_dtype))), dim=1)
             + cond.lvl_pos_1LC[:, :l])
    tok_BLF = _rows(torch.cat(adapter.control_tokens(control_B3HW, pn), dim=1)[:, :l], label_B.shape[0])
    same_scale = None
    if adapter.config.kind == "reference":
        lvl_L = cast(var.lvl_1L, device)[0, :l]
        same_scale = lvl_L[:, None] == lvl_L[None, :]
    mask_LL = var.teacher_mask(l, device)
    for i, (block, ada) in enumerate(zip(var.blocks, cond.ada_B16C)):
        if i in adapter.slot:
            x_BLC = adapter.inject(i, x_BLC, tok_BLF, strength, same_scale)
        x_BLC = block(x_BLC, ada, attn_mask=mask_LL)
    return var.logits(x_BLC, cond)


# ---------------------------------------------------------------------------------------------------------------
# loading


def load_control(
    path: str, *, operations=None, compute_dtype: torch.dtype | None = None
) -> CARControlNet | ControlAdapter:
    """A CAR file (``car_*`` keys, alone or merged with VAR's) or a NextScale adapter (``adapter_*`` keys), built
    with ``operations`` to compute in ``compute_dtype``."""
    state_dict = read_state_dict(path, "control")
    if any(k.startswith("car_") for k in state_dict):
        return CARControlNet.from_state_dict(state_dict, path, operations=operations, compute_dtype=compute_dtype)
    if any(k.startswith(ADAPTER_PREFIX) for k in state_dict):
        return ControlAdapter.from_file(path, operations=operations, compute_dtype=compute_dtype)
    from ..core.family import describe, identify

    raise NextScaleError(
        f"'{path}' is {describe(identify(state_dict))}, not a control file: NextScale Load Control takes CAR files "
        f"(car_*_d16.pth) or NextScale adapters (adapter_* keys). {CAR_HINT}"
    )


class ControlStack(Control):
    """Several bound controls applied in order (chained Apply Control nodes)."""

    def __init__(self, controls: Sequence[Control]):
        self.controls = list(controls)

    def block_input(self, si: int, layer: int, x_BlC: torch.Tensor) -> torch.Tensor:
        for c in self.controls:
            x_BlC = c.block_input(si, layer, x_BlC)
        return x_BlC

    def logits(self, si: int, logits_BlV: torch.Tensor) -> torch.Tensor:
        for c in self.controls:
            logits_BlV = c.logits(si, logits_BlV)
        return logits_BlV

    def finish(self) -> None:
        for c in self.controls:
            if (finish := getattr(c, "finish", None)) is not None:
                finish()
