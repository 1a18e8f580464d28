"""Infinity (Han et al. 2025): bitwise, text-conditioned next-scale prediction on a BSQ tokenizer."""
