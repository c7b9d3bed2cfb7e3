"""One of two processes of tests/test_multiprocess.py: builds a global array from its local half."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, sys.argv[4])
from lafs_jax import sharding as mesh_lib  # noqa: E402


def main(address: str, num: int, pid: int) -> None:
    jax.distributed.initialize(address, num, pid)
    mesh = mesh_lib.make_mesh(None)
    rows = mesh_lib.local_batch_size(8, mesh)
    local = np.arange(rows, dtype=np.float32) + rows * pid + 1  # process 0: 1..4, process 1: 5..8
    batch = mesh_lib.global_batch({"x": local}, mesh)["x"]
    total = jax.jit(jnp.sum, out_shardings=mesh_lib.replicated(mesh))(batch)
    gathered = jax.jit(lambda x: x, out_shardings=mesh_lib.replicated(mesh))(batch)
    print(json.dumps({"pid": pid, "devices": jax.device_count(), "sum": float(total),
                      "global_shape": list(batch.shape), "gathered": np.asarray(gathered).tolist()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
