"""Training: mesh and shardings, optimizers, checkpoints, one loop per task."""
