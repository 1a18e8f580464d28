"""Pure-PyTorch model layer of NextScale (no ComfyUI imports), one package per family on a shared core.

Packages:
  core      -- errors, checkpoint reading, schedules, token maps, KV cache, block kits and RoPE, sampler hooks and
               draws, the family protocol and its registry
  var       -- VAR: the transformer, its multi-scale VQ-VAE tokenizer, the scale loop, editing, collaborative decoding
  infinity  -- Infinity: the bitwise text-to-image transformer, its BSQ tokenizer, schedule and scale loop
  control   -- control injection: CAR branches, NextScale adapters, control maps
  kv        -- KV-cache compression policies (ScaleKV, HACK, ...), calibration profiles, the memory/fidelity report
"""

from .core.errors import NextScaleError

__all__ = ["NextScaleError"]
