"""Training side of NextScale's embedded default model.

Modules:
  data             -- deterministic synthetic dataset (glyphs and shapes) and a folder dataset (class = subfolder)
  common           -- device choice, checkpoint save/resume, logging, progress bar, LR schedule
  classifier       -- the small measuring-stick classifier and its metrics (accuracy, Frechet distance, diversity)
  train_tokenizer  -- multi-scale residual VQ-VAE training (straight-through estimator, dead-code restart)
  train_generator  -- VAR training with teacher forcing, label dropout for CFG, AdamW + warmup/cosine
  evaluate         -- metrics of a trained tokenizer/generator pair

Run the scripts from the repository root, e.g. ``python3 -m training.train_tokenizer --help``.
"""
