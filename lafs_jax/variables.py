"""Variables directories: a model's variables (params, batch stats) plus a `metadata.json`.

Written by the converter (lafs_jax.convert) and by the training tasks (fine-tuning's
`WORKDIR/backbone`, pretraining's `WORKDIR/teacher_backbone`); read by every task that initialises or
evaluates a backbone. Layout: DIR/variables (an orbax StandardCheckpointer item) and
DIR/metadata.json (model config, input normalisation, colour order, where they came from).
Restoring takes optional abstract targets with shardings, so the arrays land directly on the
current mesh, whatever device count wrote them.

Shared infrastructure below the tasks (train/, eval/, convert/): it imports nothing of lafs_jax.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

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
                                f"lafs_jax.variables.save_variables or lafs_jax.convert)")
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(target, abstract) if abstract is not None else ckptr.restore(target)
    meta_path = os.path.join(directory, METADATA_FILE)
    metadata = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    return variables, metadata
