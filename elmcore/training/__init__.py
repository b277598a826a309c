"""Training: the trainer, optimiser, losses, evaluation, checkpoints, data parallel runs and sweeps."""
