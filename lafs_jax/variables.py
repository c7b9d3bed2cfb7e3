"""Variables directories: a model's variables (params, batch stats) plus a `metadata.json`.

Written by the converter (lafs_jax.convert) and by the training tasks (fine-tuning's
`WORKDIR/backbone`, pretraining's `WORKDIR/teacher_backbone`); read by every task that initialises or
evaluates a backbone. Layout: DIR/variables (an orbax PyTree checkpoint) and DIR/metadata.json
(model config, input normalisation, colour order, where they came from).

Device-count-free both ways:
- `save_variables` writes host (numpy) arrays: a sharded jax.Array is first gathered (across
  processes with `multihost_utils.process_allgather`), so nothing of the writing mesh is recorded.
- `load_variables` restores against an explicit target (the caller's abstract tree, or the stored
  shapes and dtypes), never against the sharding recorded at save time: a directory written by 8
  devices (even by an older version that saved sharded device arrays) loads in a 1-device process.
  Arrays come back as numpy, or placed on the caller's shardings.

Shared infrastructure below the tasks (train/, eval/, convert/): it imports nothing of lafs_jax.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lafs_jax.sharding import path_str

VARIABLES_ITEM = "variables"
METADATA_FILE = "metadata.json"


def to_json_dict(metadata: Any) -> Any:
    """`metadata` with ConfigDicts turned into plain dicts and tuples into lists (JSON-able)."""
    if isinstance(metadata, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return json.loads(metadata.to_json_best_effort())
    if isinstance(metadata, dict):
        return {str(k): to_json_dict(v) for k, v in metadata.items()}
    if isinstance(metadata, (list, tuple)):
        return [to_json_dict(v) for v in metadata]
    return metadata


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array holding the whole (global) value.

    A jax.Array spread over several processes is all-gathered (every process must call this at the
    same point); other jax.Arrays are copied off their devices.
    """
    def one(x):
        if isinstance(x, jax.Array):
            if x.is_fully_addressable:
                return np.asarray(jax.device_get(x))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def save_variables(directory: str, variables: Any, metadata: dict | None = None) -> None:
    """Write `variables` (a pytree of arrays, sharded or not) as host arrays to DIR/variables and
    `metadata` to DIR/metadata.json. In a multi-process run every process calls it (the arrays are
    gathered collectively); process 0 writes."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    host = to_host(variables)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, VARIABLES_ITEM), host, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, METADATA_FILE), "w") as f:
            json.dump(to_json_dict(metadata or {}), f, indent=1, sort_keys=True)


def _target_dir(directory: str) -> str:
    target = os.path.join(os.path.abspath(directory), VARIABLES_ITEM)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"no variables checkpoint at {target} (expected a directory written by "
                                f"lafs_jax.variables.save_variables or lafs_jax.convert)")
    return target


def stored_structure(directory: str) -> Any:
    """The stored tree of a variables directory as jax.ShapeDtypeStructs (shapes and dtypes, no
    sharding); nothing but metadata is read."""
    meta = ocp.PyTreeCheckpointer().metadata(_target_dir(directory))
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)), tree)


def read_metadata(directory: str) -> dict:
    """DIR/metadata.json ({} when absent)."""
    path = os.path.join(os.path.abspath(directory), METADATA_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _flat(tree: Any) -> dict[str, Any]:
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_variables(directory: str, abstract: Any = None, sharding: Any = None) -> tuple[Any, dict]:
    """(variables, metadata) from a directory written by `save_variables` (or an older sharded one).

    abstract: the target tree (jax.ShapeDtypeStructs or arrays), e.g. `presets.abstract_variables`
      of the model config; it may hold only part of the stored tree (only that part is read).
      Default: the whole stored tree with its stored shapes and dtypes.
    sharding: one jax Sharding for every leaf, or a pytree of them matching `abstract`; without
      it, each target leaf's own `.sharding` is used where it has one.
    Leaves with no sharding come back as numpy arrays (host memory, any device count).
    A target entry the directory lacks, or whose shape differs from the stored one, raises a
    ValueError naming the directory, the entry and both shapes.
    """
    target_dir = _target_dir(directory)
    stored = _flat(stored_structure(directory))
    if abstract is None:
        abstract = stored_structure(directory)
    flat_target = _flat(abstract)
    for path, leaf in flat_target.items():
        if path not in stored:
            raise ValueError(f"variables directory {directory}: no entry '{path}' (needed with shape "
                             f"{tuple(np.shape(leaf))}); it holds {len(stored)} entries such as "
                             f"{sorted(stored)[:3]}")
        if tuple(np.shape(leaf)) != tuple(stored[path].shape):
            raise ValueError(f"variables directory {directory}: '{path}' is stored with shape "
                             f"{tuple(stored[path].shape)}, the model needs {tuple(np.shape(leaf))}")
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        shardings = [sharding or getattr(x, "sharding", None) for x in leaves]
    else:
        shardings = treedef.flatten_up_to(sharding)

    def restore_arg(leaf, s):
        if isinstance(s, jax.sharding.Sharding):
            return ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(np.shape(leaf)), dtype=leaf.dtype)
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)

    restore_args = treedef.unflatten([restore_arg(x, s) for x, s in zip(leaves, shardings)])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), abstract)
    partial = len(flat_target) < len(stored)
    with ocp.PyTreeCheckpointer() as ckptr:
        variables = ckptr.restore(target_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=partial))
    return variables, read_metadata(directory)


def subtrees(stored: Any, *paths: tuple[str, ...]) -> dict:
    """The parts of a stored tree (e.g. `variables_lib.stored_structure`) at `paths` that exist, nested
    as stored: the target of a partial load that reads nothing else."""
    out: dict = {}
    for path in paths:
        node = stored
        for key in path:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            parent = out
            for key in path[:-1]:
                parent = parent.setdefault(key, {})
            parent[path[-1]] = node
    return out
