"""The environment of the CPU processes the tests run: N simulated devices.

The test processes themselves (tests/conftest.py) compile with XLA's default flags, as users run.
The subprocesses the tests start (the topology matrix, jax.distributed pairs, main.py, lock holders)
test plumbing between processes and topologies and compare runs with runs compiled the same way, so
they compile with `--xla_backend_optimization_level=0`: a third less compile CPU (a topology-matrix
fine-tuning leg: 23.5 s -> 15.8 s user CPU). It changes float rounding (the device-side augmentation
then differs from Pillow by 4 grey levels instead of at most 2), which is why the in-process tests,
which compare against independent references, keep the default."""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices}"


def cpu_env(devices: int, **extra: str) -> dict:
    """os.environ with JAX on `devices` CPU devices compiled at backend optimisation level 0 (plus
    `extra` variables), for a subprocess."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{xla_flags(devices)} {FAST_COMPILE}", **extra)
