"""Random model weights for end-to-end tests that write model files into a server's model folder."""

from __future__ import annotations


def randomise(module, seed: int, gain: float = 0.3):
    """O(1)-scale random weights (normal, times ``gain``), so that outputs are far from uniform and images far from
    flat; returns the module in eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * gain)
    return module.eval()
