"""Checkpoints with orbax.

Two kinds live here:
- *variables directories* (`save_variables` / `load_variables`): a model's variables (params, batch
  stats) plus a `metadata.json` (model config, input normalisation, colour order, where they came
  from). Written by the converter and by `export`-style steps; read by every task that initialises a
  backbone. Restoring takes optional abstract targets with shardings, so the arrays land directly on
  the current mesh, whatever device count wrote them.
- *training checkpoints* (the CheckpointManager wrapper below): the whole train state plus the
  Grain iterator state, asynchronous, last N kept, resumed automatically.
"""
from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp

VARIABLES_ITEM = "variables"
METADATA_FILE = "metadata.json"


def save_variables(directory: str, variables: Any, metadata: dict | None = None) -> None:
    """Write `variables` (a pytree of arrays) to DIR/variables and `metadata` to DIR/metadata.json."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, VARIABLES_ITEM)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, variables, force=True)
        ckptr.wait_until_finished()
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata or {}, f, indent=1, sort_keys=True)


def load_variables(directory: str, abstract: Any = None) -> tuple[Any, dict]:
    """(variables, metadata) from a directory written by `save_variables`.

    `abstract` (a pytree of jax.ShapeDtypeStruct with shardings) restores onto the current mesh;
    without it arrays come back as orbax stores them (numpy for host arrays).
    """
    directory = os.path.abspath(directory)
    target = os.path.join(directory, VARIABLES_ITEM)
    if not os.path.isdir(target):
        raise FileNotFoundError(f"no variables checkpoint at {target} (expected a directory written by "
                                f"lafs_jax.train.checkpoint.save_variables or lafs_jax.convert)")
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(target, abstract) if abstract is not None else ckptr.restore(target)
    meta_path = os.path.join(directory, METADATA_FILE)
    metadata = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    return variables, metadata
