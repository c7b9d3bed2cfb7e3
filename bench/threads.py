"""`--threads N` for the benchmarks that compare frameworks: read from argv and applied before jax or torch
start their thread pools (import this module first). Imports nothing but the standard library."""
from __future__ import annotations

import os
import sys


def threads_from_argv(argv) -> int | None:
    """The value of --threads N / --threads=N in argv, else None."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


def single_thread_xla() -> None:
    """XLA:CPU on one thread (its Eigen pool and intra-op parallelism off)."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


THREADS = threads_from_argv(sys.argv[1:])
