"""Reading a landmark CNN from a variables directory, the one reader fine-tuning and pretraining share.

A directory holds either a whole Part fViT (the landmark CNN is its 'landmark_cnn' subtree of 'params'
and 'batch_stats') or a landmark CNN alone (its collections at the root). Only the landmark CNN's arrays
are read, as host arrays, whatever device count wrote them. `load` checks them against the model's
shapes (a ConfigError naming the parameter); `init_and_save` writes an untrained one (tests and the CPU
demo only).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lafs_jax import sharding as mesh_lib
from lafs_jax import variables as variables_lib
from lafs_jax.config import ConfigError

SUBTREE = "landmark_cnn"  # the landmark CNN's key in a Part fViT's params and batch_stats
INIT_DIR = "landmark_cnn_init"  # WORKDIR/<this>: the untrained landmark CNN of a run without a checkpoint


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


def abstract(module: Any, image_size: int) -> dict:
    """Shapes of `module`'s (a LandmarkCNN) variables {'params', 'batch_stats'} (nothing computed)."""
    return jax.eval_shape(lambda k: init(module, k, image_size), jax.random.key(0))


def init(module: Any, key: jax.Array, image_size: int) -> dict:
    """Fresh (untrained) variables of `module` from `key` (traceable)."""
    return module.init({"params": key}, jnp.zeros((1, image_size, image_size, 3)), train=False)


def init_and_save(module: Any, key: jax.Array, image_size: int, directory: str, metadata: dict) -> None:
    """Initialise `module` from `key` and write it as a variables directory (every process calls it)."""
    variables = jax.jit(lambda k: init(module, k, image_size))(key)
    variables_lib.save_variables(directory, variables, {"kind": "landmark_cnn", **metadata})


def load(directory: str, target: dict, where: str) -> dict:
    """The landmark CNN of `directory` as numpy arrays with `target`'s structure and dtypes ({'params',
    'batch_stats'} ShapeDtypeStructs, `abstract`); a missing parameter or another shape is a ConfigError
    starting with `where` and naming the parameter."""
    loaded = read(directory)
    return {col: match_tree(target[col], loaded.get(col, {}), f"{where} {col}") for col in target}


def match_tree(target: Any, loaded: Any, where: str) -> Any:
    """`loaded` as numpy arrays with `target`'s structure and dtypes; errors name the parameter path."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    out = []
    for kp, leaf in flat:
        path = mesh_lib.path_str(kp)
        node = loaded
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: parameter '{path}' is missing")
            node = node[part]
        arr = np.asarray(node)
        if arr.shape != tuple(leaf.shape):
            raise ConfigError(f"{where}: parameter '{path}' has shape {arr.shape}, the model "
                              f"(config.model num_landmarks / landmark blocks) needs {tuple(leaf.shape)}")
        out.append(arr.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
