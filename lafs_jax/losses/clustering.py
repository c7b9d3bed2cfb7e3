"""Deep-clustering terms of FRA (and SwAV / MSN style methods), pure functions of arrays (float32).

`sinkhorn_knopp(t, iterations)`: the official FRA `distributed_sinkhorn` applied to teacher
probabilities t [N, K] (N rows = every pixel of the global batch; under a sharded jit the sums are
global): normalise the total to 1, then `iterations` times scale each cluster's mass to 1/K and each
row's to 1/N, finally x N (rows sum to 1).
`cluster_loss(student_logits, teacher_logits, ...)`: CE of the Sinkhorn-balanced teacher softmax
against the student log-softmax, mean over rows, and the ME-MAX regulariser sum pbar log pbar + log K
of the mean student probability pbar.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sinkhorn_knopp(t: jax.Array, iterations: int = 3) -> jax.Array:
    """[N, K] non-negative -> [N, K] balanced assignments (rows sum to 1, columns to N / K)."""
    n, k = t.shape
    q = t / jnp.sum(t)
    for _ in range(iterations):
        q = q / jnp.sum(q, axis=0, keepdims=True) / k
        q = q / jnp.sum(q, axis=1, keepdims=True) / n
    return q * n


def cluster_loss(student_logits: jax.Array, teacher_logits: jax.Array, *, student_temp: float,
                 teacher_temp: float, sinkhorn_iterations: int = 3, me_max: bool = True) -> dict:
    """{'ce', 'me_max', 'usage'} of logits [N, K] (the teacher's gradient is stopped): ce = mean_n sum_k
    -A_nk log softmax(s_n / student_temp)_k with A = sinkhorn_knopp(softmax(t / teacher_temp));
    me_max = sum pbar log pbar + log K (0 when off); usage = exp(H(pbar)) / K in (0, 1], the effective
    fraction of clusters the student uses (a monitor)."""
    s = student_logits.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    k = s.shape[-1]
    logp = jax.nn.log_softmax(s / student_temp, axis=-1)
    a = jax.lax.stop_gradient(sinkhorn_knopp(jax.nn.softmax(t / teacher_temp, axis=-1), sinkhorn_iterations))
    ce = jnp.mean(jnp.sum(-a * logp, axis=-1))
    pbar = jnp.mean(jax.nn.softmax(s / student_temp, axis=-1), axis=0)
    neg_entropy = jnp.sum(pbar * jnp.log(pbar))
    reg = neg_entropy + math.log(k) if me_max else jnp.zeros((), jnp.float32)
    return {"ce": ce, "me_max": reg, "usage": jnp.exp(-neg_entropy) / k}
