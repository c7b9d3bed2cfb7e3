"""The first orbax save of replicated arrays on 8 CPU devices, with orbax's replica-parallel slicing
(its default on CPU and TPU) and without (its default on GPU; what lafs_jax.train.checkpoint uses on
CPU). Each variant runs in its own process, so neither inherits the other's compiled slice programs.

    python -m bench.replica_slicing [--arrays 100] [--saves 3]

Prints one line per save: variant, save index, CPU seconds, wall seconds."""
import argparse
import os
import subprocess
import sys
import tempfile
import time


def _one_variant(slicing: bool, arrays: int, saves: int) -> None:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    rng = np.random.default_rng(0)
    # distinct shapes, as a model's parameters have: each needs its own slice program
    tree = {f"p{i}": jax.device_put(rng.normal(size=(32, 64 + i)).astype(np.float32), NamedSharding(mesh, P()))
            for i in range(arrays)}
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=slicing), override=True)
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(saves):
            cpu, wall = time.process_time(), time.time()
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(tmp, str(s)), tree)
                ckptr.wait_until_finished()
            print(f"replica_parallel={slicing} save {s}: {time.process_time() - cpu:.2f} s CPU, "
                  f"{time.time() - wall:.2f} s wall", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=100)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--variant", choices=("slicing", "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _one_variant(args.variant == "slicing", args.arrays, args.saves)
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    for variant in ("slicing", "whole"):
        subprocess.run([sys.executable, "-m", "bench.replica_slicing", "--variant", variant,
                        "--arrays", str(args.arrays), "--saves", str(args.saves)], env=env, check=True)


if __name__ == "__main__":
    main()
