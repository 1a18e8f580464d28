"""Training side of NextScale's embedded default model.

Modules:
  data             -- deterministic synthetic dataset (glyphs and shapes, filled or outlined) and folder datasets
                      (class = subfolder, or side-car text files)
  common           -- device choice, checkpoint save/resume, logging, progress bar, LR schedule
  distributed      -- one process or many under torchrun: DDP/FSDP wrapping, per-rank rows, full-state checkpoints
  classifier       -- the small measuring-stick classifier and its metrics (accuracy, Frechet distance, diversity)
  train_tokenizer  -- multi-scale residual VQ-VAE training (straight-through estimator, dead-code restart)
  train_generator  -- VAR training with teacher forcing, label dropout for CFG, AdamW + warmup/cosine
  train_control    -- control adapters on a frozen generator
  train_lora       -- LoRA of a VAR or Infinity transformer on a folder of images (class names or captions)
  evaluate         -- metrics of a trained tokenizer/generator pair
  evaluate_lora    -- what a style LoRA of the embedded generator does, at each strength
  embedded         -- the embedded model's one-command recipe

Run the scripts from the repository root, e.g. ``python3 -m training.train_tokenizer --help``; every trainer also
runs under ``torchrun`` (docs/fine-tuning.md).
"""
