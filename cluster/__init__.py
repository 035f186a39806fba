"""Slurm and Kubernetes job templates that run the trainer on many nodes."""
