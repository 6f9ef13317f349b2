"""Training: optimizers, learning-rate schedules, the pretrain/SFT loop and checkpoints."""
