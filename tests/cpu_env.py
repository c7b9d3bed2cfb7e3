"""The environment of the CPU processes the tests run: N simulated devices. (XLA's compile flags stay
the ones users run with: `--xla_backend_optimization_level=0` compiles the tests' programs about a third
faster, but it changes float rounding: the device-side augmentation then differs from Pillow by 4 grey
levels instead of at most 2.)"""
import os


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices}"


def cpu_env(devices: int, **extra: str) -> dict:
    """os.environ with JAX on `devices` CPU devices (plus `extra` variables), for a subprocess."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
