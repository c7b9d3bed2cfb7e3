"""The environment of the test processes: N simulated CPU devices, compiled for a short suite.

Every test process (tests/conftest.py) and every subprocess a test starts (the topology matrix,
jax.distributed pairs, main.py, lock holders) compiles with `--xla_backend_optimization_level=0`:
about a quarter less CPU for the suite (the in-process tests outside the long files: 560 -> 421 s,
a topology-matrix fine-tuning leg: 23.5 -> 15.8 s) and the same results to float rounding. The one
place rounding is the point, the device-side augmentation replayed with Pillow (at level 0 it differs
by 4 grey levels instead of at most 2), compiles its program at XLA's default level instead
(`jax.jit(..., compiler_options=USERS_OPTIMIZATION)`)."""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0"
# jax.jit(..., compiler_options=USERS_OPTIMIZATION): XLA's default backend level, for one program
USERS_OPTIMIZATION = {"xla_backend_optimization_level": 3}


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` simulated CPU devices compiled at backend optimisation level 0."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def cpu_env(devices: int, **extra: str) -> dict:
    """os.environ with JAX on `devices` CPU devices (plus `extra` variables), for a subprocess."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
