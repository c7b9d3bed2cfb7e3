"""lafs_jax entry point: python main.py --config configs/X.py[:arg] --workdir DIR [--config.a.b=value].

Logs: our progress, metric and stage lines at INFO; the libraries' (orbax, grain, jax, ...) only from
WARNING up. `--verbosity=1` (absl's `-v 1`) shows the libraries' INFO lines again (lafs_jax.logs).

Runs as one process per host. With several processes, pass --coordinator_address / --num_processes /
--process_id (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or launch under a
cluster that jax.distributed auto-detects (SLURM, Open MPI, TPU pods).

Start-up takes an exclusive lock on the workdir (lafs_jax.workdir_lock; process 0 of a multi-process
run, the outcome broadcast to all): a second launch on the same workdir exits at once with status 1,
naming the holder. Exit status: 0 when the task finished or stopped on SIGTERM with its state saved;
1 on an error; 143 (128 + SIGTERM) when SIGTERM found the input pipeline stalled and the process
stopped without saving that step.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from lafs_jax import config as config_lib
from lafs_jax import logs
from lafs_jax import sharding as mesh_lib
from lafs_jax import demo, workdir_lock
from lafs_jax.eval import evaluate
from lafs_jax.train import finetune, info, loop_utils, pretrain

# config.task -> run(config, workdir): the one list of tasks
TASK_RUNNERS = {"info": info.run, "demo": demo.run, "pretrain": pretrain.run, "finetune": finetune.run,
                "evaluate": evaluate.run}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/demo.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
                                      "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ
                                   else None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])

_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _maybe_initialize_distributed() -> None:
    if _COORDINATOR.value or (_NUM_PROCESSES.value or 0) > 1:
        missing = [n for n, v in (("coordinator_address", _COORDINATOR.value),
                                  ("num_processes", _NUM_PROCESSES.value),
                                  ("process_id", _PROCESS_ID.value)) if v is None]
        if missing:
            raise app.UsageError(f"multi-process run needs --{', --'.join(missing)}")
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(int(os.environ.get(k, "1") if k != "TPU_WORKER_HOSTNAMES" else
                 len(os.environ.get(k, "").split(","))) > 1 for k in _CLUSTER_ENV):
        jax.distributed.initialize()


def _lock_workdir(workdir: str):
    """Process 0 locks the workdir; every process learns the outcome. The lock, or exit(1) naming the holder."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = workdir_lock.acquire(workdir)
        except workdir_lock.WorkdirLockedError as e:
            error = str(e)
    if jax.process_count() > 1:
        ok = bool(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(error is None))))
        if not ok and error is None:
            error = f"process 0 could not lock the workdir {os.path.abspath(workdir)} (see its log): stopping"
    if error is not None:
        sys.stderr.write(f"FATAL {error}\n")
        sys.stderr.flush()
        if jax.process_count() > 1:
            # nothing was started and nothing is to be saved: leave at once, without exit-time teardown (the
            # distributed client's shutdown and the collectives' destructors wait for peers that are gone, and
            # hung process 1 for minutes after process 0 had exited)
            logging.flush()
            os._exit(1)
        sys.exit(1)
    return lock


def _unknown_override(argv: list[str]) -> str | None:
    """Message naming the first --config.a.b override whose key the recipe does not define, else None."""
    config_arg = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            config_arg = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            config_arg = argv[i + 1]
    if not config_arg:
        return None
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        return f"--config: no recipe file at {path!r}"
    spec = importlib.util.spec_from_file_location("_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None) if arg else module.get_config()
    for a in argv:
        m = re.match(r"--config\.([\w.]+)(=|$)", a)
        if not m:
            continue
        node, walked = config, []
        for part in m.group(1).split("."):
            if not hasattr(node, "keys") or part not in node:
                where = ".".join(walked) or "<top level>"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"unknown config key {m.group(1)!r} in {a!r}: {part!r} is not a field of "
                        f"config.{where} in {path}; valid fields there: {valid}")
            node, walked = node[part], walked + [part]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    message = _unknown_override(argv)
    if message:
        sys.stderr.write(f"FATAL {message}\n")
        sys.exit(2)
    return flags.FLAGS(argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.configure(flags.FLAGS.verbosity, own_paths=(os.path.abspath(__file__),))
    config = _CONFIG.value
    try:
        config_lib.validate_common(config, tasks=tuple(TASK_RUNNERS))
    except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from None

    _maybe_initialize_distributed()
    lock = _lock_workdir(_WORKDIR.value)
    try:
        mesh = mesh_lib.make_mesh(config.mesh)
        logging.info("JAX %s | process %d/%d | %d local / %d global devices (%s)", jax.__version__,
                     jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                     jax.devices()[0].platform)
        logging.info("mesh %s", dict(mesh.shape))
        os.makedirs(_WORKDIR.value, exist_ok=True)
        try:
            loop_utils.exit_on_input_stall(lambda: TASK_RUNNERS[config.task](config, _WORKDIR.value))
        except config_lib.ConfigError as e:  # the user's input: one line naming it, no traceback
            logging.flush()
            sys.stderr.write(f"FATAL {e}\n")
            sys.stderr.flush()
            sys.exit(1)
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main, flags_parser=_parse_flags)
