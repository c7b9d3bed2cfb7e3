"""One process per host for the benchmarks: the same flags and environment as main.py, and helpers so
that every process builds the same global arrays and only process 0 prints and writes.

Flags (argparse): --coordinator_address, --num_processes, --process_id, defaulting to
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID as in main.py; with none of them, a
cluster that jax.distributed detects by itself (SLURM, Open MPI, TPU pods: the same variables main.py
looks at) is joined, else the run is single-process.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax
import numpy as np

# the variables main.py checks for a cluster that jax.distributed.initialize() detects by itself
CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                        help="host:port of process 0, for multi-process runs")
    parser.add_argument("--num_processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
                        help="number of processes of a multi-process run")
    parser.add_argument("--process_id", type=int,
                        default=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
                        help="this process's index in a multi-process run")


def _cluster_size(name: str) -> int:
    value = os.environ.get(name, "")
    if name == "TPU_WORKER_HOSTNAMES":
        return len(value.split(",")) if value else 1
    return int(value or "1")


def initialize(args: argparse.Namespace) -> None:
    """jax.distributed.initialize as main.py does; SystemExit naming the missing flags."""
    if args.coordinator_address or (args.num_processes or 0) > 1:
        missing = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(args, n) is None]
        if missing:
            raise SystemExit(f"multi-process run needs --{', --'.join(missing)}")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif any(_cluster_size(name) > 1 for name in CLUSTER_ENV):
        jax.distributed.initialize()


def is_main() -> bool:
    return jax.process_index() == 0


def emit(line: dict) -> None:
    """Print a JSON line on process 0 only."""
    if is_main():
        print(json.dumps(line), flush=True)


def global_array(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global jax.Array from a host array every process holds in full (same seed on every host):
    each process places only the shards of its own devices."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def global_tree(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    return jax.tree.map(lambda x: global_array(x, sharding), tree)


def topology() -> dict:
    """Fields every benchmark line carries: processes, devices, local devices, device kind."""
    return {"processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "device_kind": jax.devices()[0].device_kind}
