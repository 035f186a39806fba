"""Training: the entry point, the loop, the DeepSpeed engine config and LR schedule, checkpoints, the process group,
metrics."""
