"""VAR (Tian et al. 2024): class-conditional next-scale prediction on a multi-scale residual VQ-VAE."""
