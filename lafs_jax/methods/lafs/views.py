"""Token views for self-supervised pretraining: LAFS landmark views and grid-patch views.

Layouts. Pipelines hand views batch-major, `[B, V, S, S, 3]`, and the views stay batch-major here
(`[B, V, N, T]` tokens): flattening `[B, V] -> [B*V]` keeps the batch axis, which is the axis split
over devices, leading, so no data moves between devices. Tokens are in the Part fViT token layout
(x-offset, y-offset, channel) that `lafs_jax.models.sampling.sample_patches` produces, so landmark
tokens and grid tokens go through the same patch embedding.

LAFS landmark views (the official `lafs_train.py`): a frozen landmark CNN predicts R landmarks on each
*clean* crop; Gaussian noise (σ = 5 px) is added to every coordinate; global views keep all R
landmarks, local views draw `num_local` landmark indices uniformly *with replacement*,
independently per view and per sample; the patches are then sampled from the colour-augmented
twin of the crop. The landmark coordinates carry no gradient.

Official ablations: `random_landmark_views` (uniformly random landmarks, `random_coor`) and, through
`num_selected`, global views resampled at all R landmarks with replacement.

Grid views (the "mixed views" ablation option, `lafs.local_views = 'grid'`): the augmented crop is
resized to `grid_size` px (bilinear, antialiased) and cut into a regular grid of P x P patches,
row-major over (y-block, x-block), each patch flattened (x-offset, y-offset, channel). For a 48 px
grid that is DINO's 6 x 6 = 36-token local crop, in the token layout the landmark views use.

Written by hand: the noise + index resampling and the grid patchify are a few lines of jnp each;
the bilinear patch sampler itself is `sample_patches`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from lafs_jax.models.sampling import sample_patches


def perturb_and_select(landmarks: jax.Array, key: jax.Array, *, noise_std: float,
                       num_selected: int | None) -> jax.Array:
    """Landmark augmentation: N(0, noise_std²) px noise on every coordinate, then optional resampling.

    Args:
      landmarks: [N, R, 2] pixel coordinates (x, y).
      key: PRNG key.
      noise_std: σ of the coordinate noise in pixels (LAFS: 5.0; 0 disables it).
      num_selected: None keeps all R landmarks in order; an int n draws n indices in [0, R) uniformly
        with replacement, independently for each of the N rows.
    Returns:
      [N, R, 2] or [N, n, 2] coordinates, float32, without gradient.
    """
    landmarks = jax.lax.stop_gradient(landmarks).astype(jnp.float32)
    noise_key, index_key = jax.random.split(key)
    if noise_std:
        landmarks = landmarks + noise_std * jax.random.normal(noise_key, landmarks.shape, jnp.float32)
    if num_selected is None:
        return landmarks
    n, r, _ = landmarks.shape
    idx = jax.random.randint(index_key, (n, num_selected), 0, r)
    return jnp.take_along_axis(landmarks, idx[..., None], axis=1)


def _row_keys(key: jax.Array, b: int, v: int) -> jax.Array | None:
    """Per-row keys [B*V] from per-sample keys [B] (one per view of each sample); None for one key."""
    if key.ndim == 0:
        return None
    if key.shape != (b,):
        raise ValueError(f"views: key must be one key or one per sample [B={b}], got shape {key.shape}")
    return jax.vmap(lambda k: jax.random.split(k, v))(key).reshape(b * v)


def perturb_and_select_rows(landmarks: jax.Array, keys: jax.Array, *, noise_std: float,
                            num_selected: int | None) -> jax.Array:
    """`perturb_and_select` with one key per row (keys [N]): row n's noise and indices depend on keys[n] only."""
    one = lambda lm, k: perturb_and_select(lm[None], k, noise_std=noise_std, num_selected=num_selected)[0]
    return jax.vmap(one)(landmarks, keys)


def landmark_views(landmark_fn: Callable[[jax.Array], jax.Array], clean: jax.Array, aug: jax.Array,
                   key: jax.Array, *, noise_std: float, num_selected: int | None,
                   patch_size: int) -> jax.Array:
    """Tokens of V landmark views.

    Args:
      landmark_fn: images [N, S, S, 3] -> landmarks [N, R, 2] (pixel (x, y)); the frozen landmark
        CNN in eval mode. Its output is treated as a constant (stop_gradient).
      clean, aug: [B, V, S, S, 3] the clean crops and their colour-augmented twins (same geometry).
      key: PRNG key for the noise and the landmark resampling, or one key per sample [B] (device
        augmentation: each sample's draws then depend on its own key only, not on the batch).
      noise_std, num_selected: see `perturb_and_select`.
      patch_size: P, side of each sampled patch in pixels.
    Returns:
      tokens [B, V, n, P*P*3] with n = R (num_selected None) or num_selected.
    """
    if clean.shape != aug.shape or clean.ndim != 5:
        raise ValueError(f"landmark_views: clean {clean.shape} and aug {aug.shape} must both be [B, V, S, S, 3]")
    b, v = clean.shape[:2]
    landmarks = landmark_fn(clean.reshape(b * v, *clean.shape[2:]))
    rows = _row_keys(key, b, v)
    if rows is None:
        centers = perturb_and_select(landmarks, key, noise_std=noise_std, num_selected=num_selected)
    else:
        centers = perturb_and_select_rows(landmarks, rows, noise_std=noise_std, num_selected=num_selected)
    tokens = sample_patches(aug.reshape(b * v, *aug.shape[2:]), centers.astype(aug.dtype), patch_size)
    return tokens.reshape(b, v, *tokens.shape[1:])


def random_landmark_views(aug: jax.Array, key: jax.Array, *, num_landmarks: int, patch_size: int) -> jax.Array:
    """Tokens of V views at uniformly random landmarks (the official `random_coor` ablation); key: one
    key or one per sample [B], as `landmark_views`.

    aug [B, V, S, S, 3] -> [B, V, num_landmarks, P*P*3]: every coordinate U[0, S - 1) independently
    per landmark, view and sample (official torch.rand * 111 at 112 px), no noise, no landmark CNN;
    patches from the augmented crops.
    """
    if aug.ndim != 5:
        raise ValueError(f"random_landmark_views: aug must be [B, V, S, S, 3], got {aug.shape}")
    b, v, s = aug.shape[:3]
    rows = _row_keys(key, b, v)
    if rows is None:
        centers = jax.random.uniform(key, (b * v, num_landmarks, 2), jnp.float32, 0.0, s - 1.0)
    else:
        centers = jax.vmap(lambda k: jax.random.uniform(k, (num_landmarks, 2), jnp.float32, 0.0, s - 1.0))(rows)
    tokens = sample_patches(aug.reshape(b * v, *aug.shape[2:]), centers.astype(aug.dtype), patch_size)
    return tokens.reshape(b, v, *tokens.shape[1:])


def grid_tokens(images: jax.Array, *, grid_size: int, patch_size: int) -> jax.Array:
    """Regular-grid patches of `images[..., S, S, C]` resized to grid_size px.

    Returns [..., (grid_size/P)², P*P*C]: tokens row-major over (y-block, x-block), each patch vector
    in (x-offset, y-offset, channel) order, the layout of `sample_patches`.
    """
    if grid_size % patch_size:
        raise ValueError(f"grid_tokens: grid_size={grid_size} must be a multiple of patch_size={patch_size}")
    *lead, s, s2, c = images.shape
    if s != s2:
        raise ValueError(f"grid_tokens: images must be square, got {images.shape}")
    flat = images.reshape(-1, s, s, c)
    if s != grid_size:
        flat = jax.image.resize(flat, (flat.shape[0], grid_size, grid_size, c), "bilinear", antialias=True)
    g = grid_size // patch_size
    # [N, y-block, y-offset, x-block, x-offset, C] -> [N, y-block, x-block, x-offset, y-offset, C]
    patches = flat.reshape(-1, g, patch_size, g, patch_size, c).transpose(0, 1, 3, 4, 2, 5)
    return patches.reshape(*lead, g * g, patch_size * patch_size * c)
