"""Official PyTorch checkpoints -> Flax params (torch is needed only here)."""
