"""BYOL's regression loss and UniGrad-style decorrelation, pure functions of arrays (float32).

`byol_loss(p, t)` = 2 - 2 mean_n cos(p_n, t_n) over the rows of [N, d] (BYOL; the official FRA / LEWEL
`mse_loss`). `decorrelation(p, t)` = mean_{b,q} sum_{q' != q} cos(p_bq, t_bq')^2 / Q over [B, Q, d]: the
off-diagonal term of FRA's `compute_unigrad_loss` (divided by Q, not Q - 1, as the official code).
Cosines use F.normalize's floor (norm >= 1e-12) through `numerics.l2_normalize`, whose gradient stays finite
at a zero row (as torch's; a BatchNorm over one sample gives such rows).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lafs_jax.numerics import l2_normalize as _normalize


def byol_loss(p: jax.Array, t: jax.Array) -> jax.Array:
    """2 - 2 mean cos over rows; p, t [..., d] (leading axes flattened into rows) -> scalar."""
    d = p.shape[-1]
    p, t = _normalize(p.reshape(-1, d).astype(jnp.float32)), _normalize(t.reshape(-1, d).astype(jnp.float32))
    return 2.0 - 2.0 * jnp.sum(p * t) / p.shape[0]


def decorrelation(p: jax.Array, t: jax.Array) -> jax.Array:
    """mean_{b,q} sum_{q' != q} cos(p_bq, t_bq')^2 / Q; p, t [B, Q, d] -> scalar."""
    q = p.shape[1]
    corr = jnp.einsum("bqc,bkc->bqk", _normalize(p.astype(jnp.float32)), _normalize(t.astype(jnp.float32)))
    corr = corr * (1.0 - jnp.eye(q, dtype=corr.dtype))
    return jnp.mean(jnp.sum(corr ** 2, axis=-1) / q)
