"""NSARM: next-scale super-resolution on Infinity (model, transformation network, upscaling run, tiling)."""
