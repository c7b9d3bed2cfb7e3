"""Reading a landmark CNN from a variables directory, the one reader fine-tuning and pretraining share.

A directory holds either a whole Part fViT (the landmark CNN is its 'landmark_cnn' subtree of 'params'
and 'batch_stats') or a landmark CNN alone (its collections at the root). Only the landmark CNN's arrays
are read, as host arrays, whatever device count wrote them.
"""
from __future__ import annotations

from lafs_jax import variables as variables_lib

SUBTREE = "landmark_cnn"  # the landmark CNN's key in a Part fViT's params and batch_stats


def read(directory: str) -> dict:
    """{'params', 'batch_stats'} of the landmark CNN in `directory` (numpy; 'batch_stats' may be {})."""
    stored = variables_lib.stored_structure(directory)
    nested = isinstance(stored.get("params"), dict) and SUBTREE in stored["params"]
    if nested:
        loaded, _ = variables_lib.load_variables(directory, variables_lib.subtrees(
            stored, ("params", SUBTREE), ("batch_stats", SUBTREE)))
        return {col: loaded[col][SUBTREE] for col in loaded}
    loaded, _ = variables_lib.load_variables(
        directory, variables_lib.subtrees(stored, ("params",), ("batch_stats",)) or stored)
    return {"params": loaded.get("params", loaded), "batch_stats": loaded.get("batch_stats", {})}
