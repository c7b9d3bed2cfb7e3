"""Small numerical helpers every layer shares (models, losses, evaluation); imports nothing of lafs_jax."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: Any, axis: int = -1, eps: float = 1e-12) -> Any:
    """x / max(||x||_2, eps) along `axis` (torch.nn.functional.normalize); rows of zeros stay zero.

    NumPy in, NumPy out (float64 stays float64, for host-side metrics); a jax array or tracer goes
    through jax.numpy as x · rsqrt(max(Σx², eps²)), whose gradient is finite at a zero row (Partial
    FC's padding rows of W are zero).
    """
    if isinstance(x, np.ndarray):
        return x / np.sqrt(np.maximum(np.sum(x * x, axis=axis, keepdims=True), eps * eps))
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))
