"""Switti: scale-wise text-to-image transformers on CLIP-L + bigG text and a VAR-layout VQ-VAE."""
