"""Test harness: 8 CPU devices so every sharding path is exercised without accelerators."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

assert jax.device_count() == 8, f"conftest expected 8 CPU devices, got {jax.device_count()}"
