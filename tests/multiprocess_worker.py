"""One of two processes of tests/test_multiprocess.py (argv: address, process count, process id, repo root,
mode, directory). Mode 'sum': builds a global array from its local half. Mode 'preemption': a step loop
in which process 1 gets SIGTERM; prints where each process stopped and what it saved."""
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, sys.argv[4])
from lafs_jax import sharding as mesh_lib  # noqa: E402
from lafs_jax.train import loop_utils  # noqa: E402
from lafs_jax.train.checkpoint import TrainCheckpointer  # noqa: E402

SIGTERM_AT = 5  # process 1 signals itself at this step


def global_sum(pid: int) -> dict:
    mesh = mesh_lib.make_mesh(None)
    rows = mesh_lib.local_batch_size(8, mesh)
    local = np.arange(rows, dtype=np.float32) + rows * pid + 1  # process 0: 1..4, process 1: 5..8
    batch = mesh_lib.global_batch({"x": local}, mesh)["x"]
    total = jax.jit(jnp.sum, out_shardings=mesh_lib.replicated(mesh))(batch)
    gathered = jax.jit(lambda x: x, out_shardings=mesh_lib.replicated(mesh))(batch)
    return {"pid": pid, "devices": jax.device_count(), "sum": float(total),
            "global_shape": list(batch.shape), "gathered": np.asarray(gathered).tolist()}


def preemption(pid: int, directory: str) -> dict:
    """The loops' protocol: every step ask the checkpointer and the guard; save and stop when told."""
    mesh = mesh_lib.make_mesh(None)
    state = {"w": jax.device_put(np.arange(4, dtype=np.float32), mesh_lib.replicated(mesh))}
    stop, policy_saved = None, False
    with TrainCheckpointer(directory, keep=3, save_every=1000) as ckpt, loop_utils.preemption_guard() as guard:
        python_handler = signal.getsignal(signal.SIGTERM) == guard._handle
        for step in range(1, 500):
            time.sleep(0.02)  # a training step
            if pid == 1 and step == SIGTERM_AT:
                os.kill(os.getpid(), signal.SIGTERM)
            if ckpt.should_save(step):
                policy_saved = ckpt.save(step, state)
            if guard.should_stop(step):
                ckpt.save(step, state, force=True)  # skipped when the policy already saved it
                stop = step
                break
        saved = ckpt.all_steps()
    return {"pid": pid, "stop": stop, "saved": saved, "policy_saved": policy_saved, "python_handler": python_handler}


if __name__ == "__main__":
    address, num, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mode = sys.argv[5] if len(sys.argv) > 5 else "sum"
    jax.distributed.initialize(address, num, pid)
    result = global_sum(pid) if mode == "sum" else preemption(pid, sys.argv[6])
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()
