"""Shared plumbing for every stage: errors, MLflow runs, checkpoints, devices, options, images."""
