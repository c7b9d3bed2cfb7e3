"""The environment of the CPU processes the tests run: N simulated devices, and XLA's CPU backend at
LLVM optimisation level 0. The tests' programs are tiny, so compiling them is most of their cost;
level 0 compiles about a third faster and changes no result a test checks (no fast-math either way,
and every comparison is between programs built with the same flags or against a tolerance)."""
import os

COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"


def cpu_env(devices: int, **extra: str) -> dict:
    """os.environ with JAX on `devices` CPU devices (plus `extra` variables), for a subprocess."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
