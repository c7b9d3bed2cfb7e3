"""Training checkpoints with orbax (a model's variables plus metadata: `lafs_jax.variables`).

`TrainCheckpointer`, a thin wrapper over orbax's V0 `CheckpointManager` with `args=`, saves the
whole train state (any pytree of arrays: params, optimizer state, step, RNG keys, EMA teacher, DINO
centre), the Grain iterator state (through grain's own orbax handler, one JSON file per process)
and a JSON metadata dict, asynchronous, last N kept. Layout: DIR/<step>/{state, data, metadata}.
Moving to orbax's V1 `training.Checkpointer` later is a change of this file only.
Nothing here is written by hand beyond the wiring: orbax does the (sharded, async) array I/O and
the retention, grain the iterator state.

Confirmed checkpoints. A checkpoint of step s holds the state *after* update s; the loss of step s
is computed from the state before it. So a checkpoint is only known good once a loss computed from
its own state (step s + 1's) has been checked, finite and not exploding (loop_utils.DivergenceMonitor).
The loop then calls `confirm(s)`, which writes DIR/<s>/confirmed.json (after the checkpoint is on
disk; process 0). `resume()` only ever restores confirmed checkpoints, newest first: a checkpoint
without the marker (the run stopped between the save and the check, or diverged) is moved to
DIR/unconfirmed/<s>, never resumed from; on divergence the loop deletes the unconfirmed ones
(`discard_unconfirmed`). Retention keeps the latest `keep` checkpoints and, always, the newest
confirmed one.

Corrupted checkpoints. `resume()` restores the newest confirmed checkpoint; if that raises (a
truncated or missing array file, a deleted manifest or `state/`, a truncated iterator JSON) or
gives arrays with NaN / inf, it logs which directory is broken and why, and tries the next older
confirmed one; the broken ones are moved to DIR/broken/<s> once an older one restores, so a later
save of the same step is not blocked. When none restores it raises CheckpointRestoreError listing
every directory and reason, and moves nothing. Not caught: bytes changed inside a tensor file that
still decode to finite numbers (orbax stores no checksums), and an iterator state that is valid
JSON but not the one saved. Several processes: see `resume`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # not exported; see _no_replica_slicing_on_cpu

from lafs_jax.sharding import path_str
from lafs_jax.variables import to_json_dict

STATE_ITEM = "state"
DATA_ITEM = "data"
META_ITEM = "metadata"
CONFIRMED_FILE = "confirmed.json"  # DIR/<step>/confirmed.json: the checkpoint's state gave a good loss
BROKEN_DIR = "broken"  # DIR/broken/<step>: checkpoints that did not restore (an older one did)
UNCONFIRMED_DIR = "unconfirmed"  # DIR/unconfirmed/<step>: never confirmed, set aside at resume


_WHOLE_REPLICA_HANDLER_REGISTERED = False


def _no_replica_slicing_on_cpu() -> None:
    """On CPU backends, save each jax.Array from its replica 0 whole (orbax's choice on GPU).

    orbax's default elsewhere splits a replicated array into one slice per replica, each cut by an
    eager jax op, so the first save of a state compiles a slice program per distinct parameter shape:
    100 replicated arrays on 8 CPU devices took 37.9 s of CPU to save once, 0.25 s without slicing
    (`python -m bench.replica_slicing`). On CPU every replica lives in the same host memory, so the
    slices buy no parallel write. Accelerator backends keep orbax's default."""
    global _WHOLE_REPLICA_HANDLER_REGISTERED
    if jax.default_backend() == "cpu" and not _WHOLE_REPLICA_HANDLER_REGISTERED:
        _WHOLE_REPLICA_HANDLER_REGISTERED = True  # once: orbax logs a warning at every override
        # the array metadata store as in orbax's default registration: it records PRNG key dtypes
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                 array_metadata_store=array_metadata_store.Store())
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a directory restores; the message lists every directory tried and why."""


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


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths ('a/b/c') of the floating-point leaves of `tree` holding a NaN or inf.

    Each process looks at its own shards (host copies, no compilation); typed PRNG keys and integer
    leaves are skipped.
    """
    bad = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            continue
        parts = [s.data for s in leaf.addressable_shards] if isinstance(leaf, jax.Array) else [leaf]
        arrays = [np.asarray(p) for p in parts]
        if not all(np.isfinite(a if a.dtype.kind == "f" else a.astype(np.float32)).all() for a in arrays):
            bad.append(path_str(keypath))
    return bad


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (one all-gather; just `ok` on one process)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel  (multi-process only)

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(ok, np.int32))).all())


def _reason(error: BaseException) -> str:
    """One line naming an exception: its type and the start of its first line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


@dataclasses.dataclass
class _NewestConfirmed:
    """orbax preservation policy: keep the newest confirmed checkpoint (whatever LatestN says), so a
    crash between a save and its confirmation always leaves one to resume from."""

    is_confirmed: Callable[[int], bool]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        confirmed = [c.step for c in checkpoints if self.is_confirmed(c.step)]
        newest = max(confirmed) if confirmed else None
        return [c.step == newest for c in checkpoints]


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

    Loops resume with `resume()` (confirmed checkpoints only, with fallback past broken ones) and
    call `confirm(s)` once step s + 1's loss is checked; see the module docstring.
    """

    def __init__(self, directory: str, keep: int | None = 3, save_every: int = 1, async_save: bool = True,
                 metadata: Any = None, best_fn: Callable[[dict], float] | None = None, best_mode: str = "max"):
        """keep: checkpoints kept (the latest ones, plus the newest confirmed one; None keeps all). save_every: `save` writes only at
        steps divisible by it unless force=True. metadata: JSON-able dict (ConfigDicts allowed) stored
        with every checkpoint, e.g. config, input normalisation, colour order.
        best_fn: with it, `save(..., metrics=)` records a JSON dict of metrics with the checkpoint and
        the checkpoint whose best_fn(metrics) is the largest (best_mode 'max') or smallest ('min') is
        kept beside the latest `keep` (orbax BestN + LatestN); checkpoints saved without metrics rank
        last. `best_step()` names it."""
        if keep is not None and keep < 1:
            raise ValueError(f"TrainCheckpointer(keep={keep}): keep at least 1 checkpoint (or None for all)")
        if save_every < 1:
            raise ValueError(f"TrainCheckpointer(save_every={save_every}): must be >= 1")
        if best_mode not in ("max", "min"):
            raise ValueError(f"TrainCheckpointer(best_mode={best_mode!r}): choose 'max' or 'min'")
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.metadata = to_json_dict(metadata or {})
        json.dumps(self.metadata)  # fail now, naming nothing hidden, if metadata is not JSON-able
        self.best_fn, self.best_mode = best_fn, best_mode
        _no_replica_slicing_on_cpu()
        policies = ocp.checkpoint_managers
        preservation = None
        if keep is not None:
            preservation = policies.AnyPreservationPolicy([policies.LatestN(keep),
                                                           _NewestConfirmed(lambda s: s in self._confirmed)])
        rank = None
        if best_fn is not None and preservation is not None:
            worst = -math.inf if best_mode == "max" else math.inf
            rank = lambda m: float(best_fn(m)) if m else worst  # noqa: E731  (no metrics: ranked last)
            preservation = policies.AnyPreservationPolicy([preservation, policies.BestN(
                get_metric_fn=rank, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            # every `save_every` steps, and at the step of JAX's preemption sync point (multi-process)
            save_decision_policy=policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every),
                                                         policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=preservation,
            # best_fn makes orbax write and reload the metrics; the preservation policy above decides
            best_fn=rank if best_fn is not None else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                           META_ITEM: ocp.JsonCheckpointHandler()})
        self._confirmed: set[int] = {s for s in self._manager.all_steps()
                                     if (self._step_dir(s) / CONFIRMED_FILE).exists()}
        self._to_confirm: dict[int, dict] = {}  # confirmed, marker not written yet (save in progress)

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    # -- saving ---------------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write (step % save_every == 0, newer than the latest)."""
        return self._manager.should_save(int(step))

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False,
             metrics: dict | None = None) -> bool:
        """Save `state` (pytree of jax/numpy arrays) and the iterator's state as checkpoint `step`.

        Returns whether a checkpoint was started. A step that already has a checkpoint is skipped
        (returns False), so a final forced save after a periodic one at the same step is harmless.
        metrics: JSON-able dict of numbers ranked by best_fn (only with best_fn).
        """
        if metrics is not None and self.best_fn is None:
            raise ValueError("TrainCheckpointer.save(metrics=...) needs best_fn= at construction")
        step = int(step)
        if step in self._manager.all_steps() or not (force or self.should_save(step)):
            return False
        if jax.process_count() > 1:
            _check_global(state)
        # orbax waits for the previous save here anyway; the confirmations waiting for it go to disk
        # first, so the retention below sees them
        self._manager.wait_until_finished()
        self._write_confirmations()
        items = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(self.metadata)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        if self.best_fn is not None:
            metrics = {k: float(v) for k, v in (metrics or {}).items()}
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True, metrics=metrics))

    # -- confirmation ---------------------------------------------------------------------------
    def confirm(self, step: int, **evidence: Any) -> None:
        """Mark checkpoint `step` good: a loss computed from its state (step + 1's) was checked.

        evidence: JSON-able facts stored in the marker (e.g. loss=..., checked_at_step=...). The
        marker is written once the checkpoint is on disk (now, or when the save in progress ends:
        the next save, wait or close), by process 0; every process must call it.
        """
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"cannot confirm step {step}: no such checkpoint in {self.directory}; "
                                    f"available steps: {self.all_steps()}")
        self._to_confirm[step] = {k: to_json_dict(v) for k, v in evidence.items()}
        if not self._manager.is_saving_in_progress():
            self._write_confirmations()

    def _write_confirmations(self) -> None:
        for step, evidence in sorted(self._to_confirm.items()):
            path = self._step_dir(step)
            if jax.process_index() == 0:
                if not path.exists():
                    raise FileNotFoundError(f"checkpoint {path} vanished before its confirmation was written")
                tmp = path / (CONFIRMED_FILE + ".tmp")
                tmp.write_text(json.dumps({"step": step, "time": time.time(), **evidence}, sort_keys=True))
                tmp.rename(path / CONFIRMED_FILE)
            self._confirmed.add(step)
        self._to_confirm.clear()

    def is_confirmed(self, step: int) -> bool:
        return int(step) in self._confirmed or int(step) in self._to_confirm

    def confirmed_steps(self) -> list[int]:
        return [s for s in self.all_steps() if self.is_confirmed(s)]

    def latest_confirmed_step(self) -> int | None:
        steps = self.confirmed_steps()
        return steps[-1] if steps else None

    def discard_unconfirmed(self) -> list[int]:
        """Delete every checkpoint not confirmed (after a divergence: their states are suspect); the steps."""
        self.wait()
        doomed = [s for s in self.all_steps() if not self.is_confirmed(s)]
        for s in doomed:
            self._manager.delete(s)
        return doomed

    def after_divergence(self, error: BaseException) -> BaseException:
        """The training loops' answer to a divergence `error`: deletes the unconfirmed checkpoints and
        returns an error of the same type naming them and the confirmed one a relaunch resumes from."""
        removed = self.discard_unconfirmed()
        return type(error)(f"{error}; deleted the unconfirmed checkpoints {removed} (their states are suspect); "
                           f"{self.describe_confirmed()}")

    def _set_aside(self, step: int, kind: str) -> epath.Path:
        """Move checkpoint `step` to DIR/<kind>/<step>[-n] (process 0), out of orbax's sight; the new path."""
        source = self._step_dir(step)
        dest = self.directory / kind / str(step)
        n = 1
        while dest.exists():
            dest, n = self.directory / kind / f"{step}-{n}", n + 1
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            source.rename(dest)
        ocp.multihost.sync_global_processes(f"TrainCheckpointer:set_aside:{kind}:{step}")
        self._manager.reload()
        self._confirmed.discard(step)
        return dest

    def describe_confirmed(self) -> str:
        """A sentence naming the newest confirmed checkpoint (what a relaunch resumes from)."""
        step = self.latest_confirmed_step()
        if step is None:
            return f"no confirmed checkpoint in {self.directory}: a relaunch starts from scratch"
        return f"the last confirmed checkpoint is {self._step_dir(step)}: a relaunch resumes from step {step}"

    # -- reading --------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None when the directory has none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept checkpoint with the best best_fn(metrics), or None (no best_fn, or no checkpoint
        saved with metrics)."""
        if self.best_fn is None:
            return None
        scored = [(float(self.best_fn(m)), s) for s in self.all_steps() if (m := self._manager.metrics(s))]
        if not scored:
            return None
        return (max if self.best_mode == "max" else min)(scored, key=lambda t: t[0])[1]

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with checkpoint `step` (None when it has none)."""
        return self._manager.metrics(self._step(step)) or None

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

    def resume(self, abstract_state: Any = None, data_iterator: Any = None,
               padded_rows: dict[str, int] | None = None) -> tuple[int | None, Any]:
        """(step, state) of the newest confirmed checkpoint that restores with finite arrays, or
        (None, None) when there is none (start from scratch).

        Checkpoints without a confirmation are never restored: they are moved to DIR/unconfirmed/
        (logged). A confirmed checkpoint that fails to restore or holds NaN / inf is logged with
        its directory and the reason, and the next older one is tried; once one restores, the
        broken newer ones are moved to DIR/broken/ (logged). When none restores this raises
        CheckpointRestoreError listing them all, and moves nothing. Every process must call it: what a
        process can check alone (`state/` present, its own iterator file present and JSON) is agreed
        across processes before orbax's collective restore, so all fall back together (tested with
        two processes); array data that only one process reads and finds broken fails inside
        orbax's barriers on that process, which the others do not survive gracefully.
        """
        self.wait()
        confirmed = self.confirmed_steps()
        broken: list[tuple[int, str]] = []
        for step in reversed(confirmed):
            state = None
            # what a process can check alone first, agreed before orbax's collective restore (a failure
            # inside it on one process only would leave the others waiting in its barriers)
            reason = self._precheck(step, data_iterator)
            if _all_processes_agree(not reason):
                try:
                    state = self.restore(step, abstract_state, data_iterator=data_iterator, padded_rows=padded_rows)
                    bad = nonfinite_leaves(state)
                    reason = (f"restored arrays hold NaN or inf: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
                              if bad else "")
                except Exception as e:  # pylint: disable=broad-except  (any failure: try the next older one)
                    state, reason = None, _reason(e)
            else:
                reason = reason or "its files are broken on another process"
            if not _all_processes_agree(not reason):
                reason = reason or "restore failed on another process"
                logging.warning("checkpoint %s cannot be restored (%s); trying the next older confirmed one",
                                self._step_dir(step), reason)
                broken.append((step, reason))
                continue
            self._set_aside_newer(step, broken)
            if broken:
                logging.warning("resumed from %s, the newest checkpoint that restores; the newer ones did not: %s",
                                self._step_dir(step), "; ".join(f"{s}: {r}" for s, r in broken))
            return step, state
        if broken:
            listing = "\n".join(f"  {self._step_dir(s)}: {r}" for s, r in broken)
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} restores (newest first):\n{listing}\nfix or remove them; "
                f"removing the whole directory starts the run from scratch")
        self._set_aside_newer(None, [])
        return None, None

    def _precheck(self, step: int, data_iterator: Any) -> str:
        """Why checkpoint `step` cannot restore on this process, from its files alone ('' if no reason
        is visible): `state/` missing, or this process's iterator file missing or not JSON."""
        path = self._step_dir(step)
        if not (path / STATE_ITEM).exists():
            return f"no '{STATE_ITEM}' item (directory {path / STATE_ITEM} is missing)"
        if data_iterator is None:
            return ""
        # grain's handler names the file by jax's process index and count
        name = path / DATA_ITEM / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not name.exists():
            return f"no data iterator state {name}"
        if isinstance(data_iterator, grain.DatasetIterator):
            try:
                json.loads(name.read_text())
            except ValueError as e:
                return f"{name}: {_reason(e)}"
        return ""

    def _set_aside_newer(self, resumed: int | None, broken: list[tuple[int, str]]) -> None:
        """Move the broken checkpoints and every unconfirmed one out of the way of future saves."""
        for step, reason in broken:
            dest = self._set_aside(step, BROKEN_DIR)
            logging.warning("moved the broken checkpoint %s (%s) to %s", self._step_dir(step), reason, dest)
        for step in self.all_steps():
            if not self.is_confirmed(step):
                dest = self._set_aside(step, UNCONFIRMED_DIR)
                logging.warning("checkpoint %s was never confirmed (the run stopped before a loss computed from "
                                "its state was checked): moved it to %s; %s", self._step_dir(step), dest,
                                f"resuming from step {resumed}" if resumed is not None else "starting from scratch")

    def read_metadata(self, step: int | None = None) -> dict:
        """The metadata dict saved with checkpoint `step` (None: the latest)."""
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]

    # -- lifetime -------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every started save is on disk (and the confirmations waiting for it)."""
        self._manager.wait_until_finished()
        self._write_confirmations()

    def close(self) -> None:
        """Wait for pending saves, write pending confirmations, release the manager's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
