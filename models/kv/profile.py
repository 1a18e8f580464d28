"""Calibration for the KV policies: attention statistics recorded while sampling, saved as a small JSON profile.

:func:`calibrate` samples a few images with the full cache and a recording policy (:class:`ProfileRecorder`) that,
after every layer's attention at every scale, looks at up to 32 evenly spaced queries of the current scale:

- ScaleKV's attention selectivity index per (layer, scale) (arXiv 2505.19602): the mean attention on the current
  scale's keys times the mean sum of the top 10 % history attentions, averaged over heads, rows and samples; then a
  z-score within each scale (``(asi - mean) / (std + 1e-6)`` over layers). Low z: drafter.
- HACK's column variance per (layer, head) (HACK, arXiv 2504.09261): for each key, the variance of its attention across
  the queries, normalised by its Bernoulli bound ``mean * (1 - mean)`` and summed over keys before dividing (0: every
  query attends alike, a contextual "vertical" head; 1: each query attends its own keys, a structural head);
  averaged over scales 2.. and samples.

A profile belongs to one transformer shape and one schedule: VAR's square sides, or an Infinity run's ``(h, w)``
token grids (one resolution and aspect ratio). It is schema-versioned JSON; :meth:`KVProfile.load` validates it with
errors that name the problem, and :meth:`KVProfile.check_shape` refuses a profile made for another architecture or
schedule.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from ..core.errors import NextScaleError
from ..core.family import Family
from ..core.hooks import SamplerHooks
from ..core.kv_cache import KVPolicy, LayerKV
from ..var.family import FAMILY as VAR_FAMILY
from .policies import even_queries

SCHEMA = "nextscale-kv-profile"
VERSION = 1
OBS_QUERIES = 32


def scales_of(scales) -> tuple:
    """A schedule as a profile holds it: square sides as ints, ``(h, w)`` grids as pairs of ints."""
    out = []
    for s in scales:
        if isinstance(s, (list, tuple)):
            if len(s) != 2:
                raise ValueError(f"a scale is a side or an (h, w) pair, got {s!r}")
            out.append((int(s[0]), int(s[1])))
        else:
            out.append(int(s))
    return tuple(out)


@dataclass
class KVProfile:
    """Per-(layer, scale) ASI and z-scores and per-(layer, head) column variance of one generator architecture on one
    schedule (``patch_nums``: square sides, or ``(h, w)`` grids for Infinity)."""

    depth: int
    num_heads: int
    patch_nums: tuple
    asi: list[list[float]]  # [layer][scale]
    zscore: list[list[float]]  # [layer][scale]
    head_variance: list[list[float]]  # [layer][head]
    samples: int = 0
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "model": {"depth": self.depth, "num_heads": self.num_heads, "patch_nums": list(self.patch_nums)},
            "samples": self.samples,
            "meta": self.meta,
            "scalekv": {"asi": self.asi, "zscore": self.zscore},
            "hack": {"head_variance": self.head_variance},
        }

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def from_dict(cls, d, source: str = "<profile>") -> KVProfile:
        def fail(why: str):
            raise NextScaleError(f"KV profile {source} is not valid: {why}; run NextScale KV Calibrate again")

        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            fail(f"it is not a '{SCHEMA}' file")
        if d.get("version") != VERSION:
            fail(f"schema version {d.get('version')!r}, this NextScale reads version {VERSION}")
        try:
            model = d["model"]
            depth, heads = int(model["depth"]), int(model["num_heads"])
            pns = scales_of(model["patch_nums"])
            asi, z, var = d["scalekv"]["asi"], d["scalekv"]["zscore"], d["hack"]["head_variance"]
        except (KeyError, TypeError, ValueError) as e:
            fail(f"missing or malformed field ({e})")
        for name, table, cols in (("asi", asi, len(pns)), ("zscore", z, len(pns)), ("head_variance", var, heads)):
            if (
                not isinstance(table, list)
                or len(table) != depth
                or any(not isinstance(row, list) or len(row) != cols for row in table)
            ):
                fail(f"'{name}' must be {depth} rows of {cols} numbers")
            if any(not isinstance(x, (int, float)) or not math.isfinite(x) for row in table for x in row):
                fail(f"'{name}' holds a value that is not a finite number")
        return cls(depth, heads, pns, asi, z, var, int(d.get("samples", 0)), dict(d.get("meta", {})))

    @classmethod
    def load(cls, path: str) -> KVProfile:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise NextScaleError(f"KV profile {path} does not exist; run NextScale KV Calibrate to make one") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise NextScaleError(
                f"KV profile {path} is not valid JSON ({e}); run NextScale KV Calibrate again"
            ) from None
        return cls.from_dict(d, path)

    def check_shape(self, num_layers: int, num_heads: int, scales) -> None:
        """Raise unless the profile was calibrated on a transformer of this shape and schedule."""
        mine = (self.depth, self.num_heads, scales_of(self.patch_nums))
        theirs = (num_layers, num_heads, scales_of(scales))
        if mine != theirs:
            raise NextScaleError(
                f"this KV profile was calibrated on a generator with {mine[0]} layers, {mine[1]} heads and scales "
                f"{list(mine[2])}, but the generator has {theirs[0]} layers, {theirs[1]} heads and scales "
                f"{list(theirs[2])}: calibrate this generator at this resolution with NextScale KV Calibrate (VAR) or "
                "NextScale KV Calibrate (Text) (Infinity), or use the policy without a profile"
            )

    def drafters(self, per_scale: int) -> list[list[bool]]:
        """``[layer][scale]``: the ``per_scale`` layers of lowest z-score at each scale (ScaleKV's drafters)."""
        out = [[False] * len(self.patch_nums) for _ in range(self.depth)]
        n = max(0, min(per_scale, self.depth - 1))
        for si in range(len(self.patch_nums)):
            for layer in sorted(range(self.depth), key=lambda i: self.zscore[i][si])[:n]:
                out[layer][si] = True
        return out

    def contextual_heads(self, fraction: float) -> list[list[bool]]:
        """``[layer][head]``: the ``fraction`` of all heads with the lowest column variance (HACK's contextual)."""
        flat = sorted((v, i, h) for i, row in enumerate(self.head_variance) for h, v in enumerate(row))
        chosen = {(i, h) for _, i, h in flat[: round(fraction * len(flat))]}
        return [[(i, h) in chosen for h in range(self.num_heads)] for i in range(self.depth)]


class ProfileRecorder(KVPolicy):
    """The full cache, plus the attention statistics of :mod:`.kv_profile` accumulated over runs."""

    name = "full"

    def __init__(self, depth: int, num_heads: int, patch_nums):
        self.depth, self.num_heads, self.patch_nums = depth, num_heads, tuple(patch_nums)
        K = len(self.patch_nums)
        self.asi_sum = torch.zeros(depth, K, dtype=torch.float64)
        self.asi_n = torch.zeros(depth, K, dtype=torch.float64)
        self.var_sum = torch.zeros(depth, num_heads, dtype=torch.float64)
        self.var_n = torch.zeros(depth, num_heads, dtype=torch.float64)

    def after_attention(self, kv: LayerKV, si: int, q_BHlc: torch.Tensor) -> None:
        l, S = q_BHlc.shape[2], kv.length
        if S == l:  # scale 0: no history
            return
        idx = even_queries(l, OBS_QUERIES)
        probs_BHnS = (q_BHlc[:, :, idx].float() @ kv.k_BHSc.float().transpose(-2, -1)).softmax(dim=-1)
        current = probs_BHnS[..., S - l :].sum(-1).mean()
        hist_BHnP = probs_BHnS[..., : S - l]
        top = max(1, math.ceil(0.1 * hist_BHnP.shape[-1]))
        concentration = hist_BHnP.topk(top, dim=-1).values.sum(-1).mean()
        self.asi_sum[kv.layer, si] += float(current * concentration)
        self.asi_n[kv.layer, si] += 1
        if len(idx) >= 4:
            mean_BHS = probs_BHnS.mean(dim=2)
            var_BHS = probs_BHnS.var(dim=2, unbiased=False)
            norm_BH = var_BHS.sum(-1) / (mean_BHS * (1 - mean_BHS)).sum(-1).clamp_min(1e-12)
            self.var_sum[kv.layer] += norm_BH.mean(0).double().cpu()
            self.var_n[kv.layer] += 1

    def profile(self, samples: int, meta: dict | None = None) -> KVProfile:
        asi = (self.asi_sum / self.asi_n.clamp_min(1)).float()
        z = (asi - asi.mean(0, keepdim=True)) / (asi.std(0, unbiased=False, keepdim=True) + 1e-6)
        var = (self.var_sum / self.var_n.clamp_min(1)).float()
        return KVProfile(
            self.depth, self.num_heads, self.patch_nums, asi.tolist(), z.tolist(), var.tolist(), samples, meta or {}
        )


def record_profile(
    family: Family, generator, tokenizer, conditions: list, *, seed: int = 0, options=None, schedule=None,
    device=None, callback=None, meta: dict | None = None,
) -> KVProfile:
    """Sample one image per condition (what ``family.sample`` takes for one image; seeds seed, seed + 1, ...) with
    the full cache on ``schedule`` (the family's; None: its default) and return the profile.

    ``callback(done, total)`` is called after every scale of every sample (``total`` = samples x scales); an
    exception it raises (an interrupt) ends calibration, and every KV cache is freed by the sampler."""
    if not conditions:
        raise NextScaleError("KV calibration needs at least one image to sample")
    geometry = family.kv_geometry(generator, schedule)
    recorder = ProfileRecorder(geometry.layers, geometry.heads, geometry.scales)
    K = len(geometry.scales)
    for i, condition in enumerate(conditions):
        on_scale = None
        if callback is not None:
            on_scale = lambda si, _k, _f, i=i: callback(i * K + si + 1, len(conditions) * K)  # noqa: E731
        family.sample(
            generator, tokenizer, condition, seed=seed + i, options=options,
            hooks=SamplerHooks(kv_policy=recorder, callback=on_scale), device=device,
        )
    return recorder.profile(len(conditions), {"seed": seed, **(meta or {})})


def calibrate(
    var, tokenizer, labels: list[int], seed: int = 0, options=None, device=None, callback=None,
    family: Family = VAR_FAMILY,
) -> KVProfile:
    """:func:`record_profile` of a class-conditional generator (``family``, default VAR) on its own schedule, one
    image per label."""
    if not labels:
        raise NextScaleError("KV calibration needs at least one class to sample")
    return record_profile(family, var, tokenizer, [torch.tensor([label]) for label in labels], seed=seed,
                          options=options, device=device, callback=callback, meta={"labels": list(labels)})
