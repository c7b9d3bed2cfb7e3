"""Masked image modelling targets and loss (FaRL's BEiT-style MIM).

- `masked_token_loss(logits [B, N, V], targets int [B, N], mask bool [B, N]) -> (loss, accuracy)`: mean
  cross-entropy (float32) over the masked positions of the batch, and the fraction of them predicted
  right.
- Visual tokens from a frozen k-means codebook over raw patch vectors (the offline tokenizer):
  `kmeans(patches [M, T], k, iterations, seed) -> codebook [k, T]` (Lloyd's algorithm, k-means++-free:
  seeded random distinct patches as the start) and `nearest_code(patches [..., T], codebook) -> int
  [...]` (squared Euclidean distance). BEiT (and so FaRL, by its code's module names) uses DALL-E's
  dVAE tokenizer instead; the k-means codebook is this project's offline choice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def masked_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean CE over masked positions, top-1 accuracy over them); a batch without masked positions gives 0."""
    logits = logits.astype(jnp.float32)
    ce = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    w = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    acc = jnp.sum(w * (jnp.argmax(logits, axis=-1) == targets)) / n
    return jnp.sum(w * ce) / n, acc


def nearest_code(patches: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row for each patch vector: [..., T], [K, T] -> int32 [...]."""
    p = patches.astype(jnp.float32)
    c = codebook.astype(jnp.float32)
    d = jnp.sum(c * c, axis=-1) - 2.0 * p @ c.T  # |p|^2 is the same for every code
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def kmeans(patches: np.ndarray, k: int, iterations: int = 20, seed: int = 0) -> np.ndarray:
    """Codebook [k, T] float32 fitted by Lloyd's algorithm on patch vectors [M, T] (M >= k); an empty
    cluster keeps its previous centre."""
    x = np.asarray(patches, np.float64)
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"kmeans: need [M >= k={k}, T] patch vectors, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    centres = x[rng.choice(x.shape[0], k, replace=False)].copy()
    for _ in range(iterations):
        d = (centres ** 2).sum(1)[None] - 2.0 * x @ centres.T
        assign = d.argmin(1)
        sums = np.zeros_like(centres)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres.astype(np.float32)
