"""Training: EMA, the step, checkpoints, the Ray Train loop."""
