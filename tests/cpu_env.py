"""The environment of the test processes: N simulated CPU devices, compiled for a short suite.

Every test process (tests/conftest.py) and every subprocess a test starts (the topology matrix,
jax.distributed pairs, main.py, lock holders) compiles with `--xla_backend_optimization_level=0`
(about a quarter less CPU for the suite: the in-process tests outside the long files 560 -> 421 s,
a topology-matrix fine-tuning leg 23.5 -> 15.8 s) and with XLA:CPU's older loop emitters instead of
its MLIR fusion emitters, `--xla_cpu_use_fusion_emitters=false` (a small LAFS pretraining run to step
4: 15.6 -> 10.4 s CPU, 13.5 -> 8.4 s for DINO, bit-identical losses); the same results to float
rounding. Where rounding is the point, a program compiles as users compile it
(`jax.jit(..., compiler_options=USERS_OPTIMIZATION)`): the device-side augmentation replayed with Pillow
(at level 0 it differs by 4 grey levels instead of at most 2), DINO views on 1 vs 8 devices (bit-equal
with XLA's defaults; the fast flags round 12 of 110,592 pixels one grey level apart) and the gradients
with and without remat (equal to 1e-6 with XLA's defaults, ~4e-6 apart with the fast flags)."""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# jax.jit(..., compiler_options=USERS_OPTIMIZATION): XLA's defaults (what users compile), for one program
USERS_OPTIMIZATION = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` simulated CPU devices compiled fast (FAST_COMPILE)."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def cpu_env(devices: int, **extra: str) -> dict:
    """os.environ with JAX on `devices` CPU devices (plus `extra` variables), for a subprocess."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
