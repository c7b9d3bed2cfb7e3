"""Training checkpoints with orbax (a model's variables plus metadata: `lafs_jax.variables`).

`TrainCheckpointer`, a thin wrapper over orbax's V0 `CheckpointManager` with `args=`, saves the
whole train state (any pytree of arrays: params, optimizer state, step, RNG keys, EMA teacher, DINO
centre), the Grain iterator state (through grain's own orbax handler, one JSON file per process)
and a JSON metadata dict, asynchronous, last N kept. Layout: DIR/<step>/{state, data, metadata}.
Moving to orbax's V1 `training.Checkpointer` later is a change of this file only.
Nothing here is written by hand beyond the wiring: orbax does the (sharded, async) array I/O and
the retention, grain the iterator state.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lafs_jax.sharding import path_str
from lafs_jax.variables import to_json_dict

STATE_ITEM = "state"
DATA_ITEM = "data"
META_ITEM = "metadata"


def abstract_like(state: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of `state` (arrays or structs), with `shardings` (a matching pytree, one
    sharding for all, or None to keep each array's own sharding) as restore targets."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=shardings or getattr(x, "sharding", None)),
                            state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _check_global(state: Any) -> None:
    """In a multi-process run every jax.Array of the state must be a global array (on the mesh)."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
            raise ValueError(f"state leaf '{path_str(keypath)}' is a process-local jax.Array ({leaf.sharding}); in a "
                             f"multi-process run every state array must live on the mesh: create it with "
                             f"jax.jit(..., out_shardings=NamedSharding(mesh, P())) or "
                             f"jax.device_put(numpy_value, NamedSharding(mesh, P()))")


class TrainCheckpointer:
    """Training checkpoints in `directory`: train state + Grain iterator state + JSON metadata.

    Every process of a multi-process run must make the same calls (orbax synchronises them); each
    process saves and restores its own iterator state. `save` is asynchronous by default: it returns
    once the arrays are copied off the devices, and the next `save`, `wait` or `close` waits for the
    write. The iterator state is taken synchronously at the `save` call.

        ckpt = TrainCheckpointer(workdir + "/checkpoints", keep=3, save_every=1000,
                                 metadata={"config": config, "normalization": "[-1,1]"})
        if ckpt.latest_step() is not None:
            state = ckpt.restore(None, abstract_state, data_iterator=it)
        ... ckpt.save(step, state, data_iterator=it)   # saves when step % save_every == 0
        ckpt.save(step, state, data_iterator=it, force=True); ckpt.close()
    """

    def __init__(self, directory: str, keep: int | None = 3, save_every: int = 1, async_save: bool = True,
                 metadata: Any = None):
        """keep: checkpoints kept (the latest ones; None keeps all). save_every: `save` writes only at
        steps divisible by it unless force=True. metadata: JSON-able dict (ConfigDicts allowed) stored
        with every checkpoint, e.g. config, input normalisation, colour order."""
        if keep is not None and keep < 1:
            raise ValueError(f"TrainCheckpointer(keep={keep}): keep at least 1 checkpoint (or None for all)")
        if save_every < 1:
            raise ValueError(f"TrainCheckpointer(save_every={save_every}): must be >= 1")
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.metadata = to_json_dict(metadata or {})
        json.dumps(self.metadata)  # fail now, naming nothing hidden, if metadata is not JSON-able
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every),
            preservation_policy=policies.LatestN(keep) if keep is not None else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                           META_ITEM: ocp.JsonCheckpointHandler()})

    # -- saving ---------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write (step % save_every == 0, newer than the latest)."""
        return self._manager.should_save(int(step))

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Save `state` (pytree of jax/numpy arrays) and the iterator's state as checkpoint `step`.

        Returns whether a checkpoint was started. A step that already has a checkpoint is skipped
        (returns False), so a final forced save after a periodic one at the same step is harmless.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if jax.process_count() > 1:
            _check_global(state)
        items = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(self.metadata)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    # -- reading --------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None when the directory has none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no training checkpoint in {self.directory}")
        elif int(step) not in self._manager.all_steps():
            raise FileNotFoundError(f"no training checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {self.all_steps()}")
        return int(step)

    def stored_arrays(self, step: int | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{'a/b/c': (shape, dtype)} of the train state saved at `step` (None: the latest); metadata only."""
        step = self._step(step)
        tree = self._manager.item_metadata(step)[STATE_ITEM]
        tree = getattr(tree, "tree", tree)
        return {path_str(kp): (tuple(m.shape), m.dtype) for kp, m in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def _check_target(self, step: int, abstract_state: Any, padded_rows: dict[str, int]) -> bool:
        """Compare the restore target with the stored arrays before orbax reads anything; one ValueError
        naming the checkpoint, the arrays and both shapes on a mismatch. Returns whether some array is
        re-padded (a row count changes under `padded_rows`)."""
        where = self.directory / str(step)
        stored = self.stored_arrays(step)
        target = {}
        for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.eval_shape(jax.random.key_data, leaf)  # stored as its raw key data
            target[path_str(kp)] = tuple(leaf.shape)
        problems, resized = [], []
        missing = sorted(set(target) - set(stored))
        extra = sorted(set(stored) - set(target))
        if missing:
            problems.append(f"{len(missing)} array(s) of this run's state are not in it, e.g. '{missing[0]}' "
                            f"(shape {target[missing[0]]})")
        if extra:
            problems.append(f"it holds {len(extra)} array(s) this run's state does not have, e.g. '{extra[0]}' "
                            f"(shape {stored[extra[0]][0]})")
        for path in sorted(set(target) & set(stored)):
            want, have = target[path], stored[path][0]
            if want == have:
                continue
            real = next((n for pattern, n in padded_rows.items() if re.search(pattern, path)), None)
            if (real is not None and len(want) == len(have) >= 1 and want[1:] == have[1:]
                    and min(want[0], have[0]) >= real):
                resized.append(f"'{path}' {have} -> {want}")
                continue
            note = (f" (rows are re-padded only down to the {real} real rows)" if real is not None else "")
            problems.append(f"array '{path}' is stored with shape {have}, this run needs {want}{note}")
        if problems:
            raise ValueError(f"cannot restore checkpoint {where}: " + "; ".join(problems[:4])
                             + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
                             + ". Was it written by a run with a different model / data / optimizer config?")
        if resized:
            logging.info("checkpoint %s: re-padding rows for this mesh (real rows kept, padding zero): %s",
                         where, ", ".join(resized))
        return bool(resized)

    def restore(self, step: int | None = None, abstract_state: Any = None, data_iterator: Any = None,
                padded_rows: dict[str, int] | None = None) -> Any:
        """The train state of checkpoint `step` (None: the latest).

        abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) matching the saved state; the
        arrays are restored straight into those shardings, whatever mesh / device count wrote them
        (see `abstract_like`). Its shapes are checked against the checkpoint first: a mismatch raises
        one ValueError naming the checkpoint, the array and both shapes. Without it, arrays come back
        as orbax stores them (on the writing topology only).
        padded_rows: {regex on the 'a/b/c' path: number of real rows} for arrays padded to a multiple
        of the device count (Partial FC's W and its optimizer moments: `partial_fc.padded_rows_rule`).
        A matching array may be stored with another row count (axis 0, the rest equal); it is
        restored with its first rows identical, the extra stored rows dropped or zero rows appended.
        Every row past the real ones must be padding (zero) for that to be exact.
        data_iterator: a Grain iterator (DatasetIterator / DataLoaderIterator) whose state is set to
        the saved one, so its next element is the one that followed the save.
        """
        step = self._step(step)
        resize = False
        if abstract_state is not None:
            resize = self._check_target(step, abstract_state, dict(padded_rows or {}))
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state, strict=not resize)}
        if data_iterator is not None:
            data_dir = self.directory / str(step) / DATA_ITEM
            if not data_dir.exists():
                raise FileNotFoundError(f"checkpoint {self.directory / str(step)} holds no data iterator state "
                                        f"(it was saved without data_iterator=)")
            mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if not (data_dir / mine).exists():
                saved = sorted(p.name for p in data_dir.iterdir() if re.fullmatch(r"process_\d+-of-\d+\.json", p.name))
                counts = sorted({int(re.search(r"-of-(\d+)", n).group(1)) for n in saved})
                raise FileNotFoundError(f"checkpoint {self.directory / str(step)} holds the data iterator states "
                                        f"{saved} (written by {counts} process(es)), none for this process ({mine}): "
                                        f"each process reads its own slice of the data, so resume with the same "
                                        f"process count (any device count per process)")
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM]

    def read_metadata(self, step: int | None = None) -> dict:
        """The metadata dict saved with checkpoint `step` (None: the latest)."""
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]

    # -- lifetime -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
