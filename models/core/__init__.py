"""Shared core of every family: errors, checkpoints, schedules, token maps, KV cache, blocks, hooks, registry."""
