"""Differentiable bilinear patch extraction at landmark centres (Part fViT's tokeniser).

Written by hand: no JAX library reproduces torch's `grid_sample` exactly (per-corner zero padding,
the half-pixel shift of `align_corners=False`, and its gradients with respect to the sampling
positions). `jax.scipy.ndimage.map_coordinates` has no per-corner zero padding with coordinate
gradients of the same form, so the sampler is one vectorised gather of the four bilinear corners.

Geometry (official `extract_patches_pytorch_gridsample`, reference/lafs.md §1.3):
  - a patch of P x P taps around centre (cx, cy) uses offsets o = -P/2 ... P/2 - 1 (pixel units);
    tap (i, j) sits at x = cx + o_i, y = cy + o_j: **the first patch axis runs along x (width)**;
  - positions are normalised as u = pos / (H / 2) - 1 with the image height H for *both* axes, then
    un-normalised the way grid_sample(align_corners=False) does it, per axis: p = ((u + 1) * size - 1) / 2.
    For a square image that is p = pos - 0.5, the half-pixel shift;
  - each tap blends the four neighbouring pixels; a neighbour outside the image contributes 0.
The token of landmark n is the patch flattened in (x-offset, y-offset, channel) order, i.e. element
`(i * P + j) * C + c`: the order the official `patch_to_embedding` weights expect.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def patch_offsets(patch_size: int, dtype=jnp.float32) -> jax.Array:
    """Tap offsets in pixels, [P]: -P/2, ..., P/2 - 1 (torch.arange(-P/2, P/2))."""
    return jnp.arange(patch_size, dtype=dtype) - patch_size / 2


def _check_shapes(images: jax.Array, centers: jax.Array, patch_size: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"sample_patches: images must be [B,H,W,C], got shape {images.shape}")
    if centers.ndim != 3 or centers.shape[-1] != 2:
        raise ValueError(f"sample_patches: centers must be [B,N,2] (x, y) pixel coordinates, got shape "
                         f"{centers.shape}")
    if centers.shape[0] != images.shape[0]:
        raise ValueError(f"sample_patches: batch of centers ({centers.shape[0]}) differs from batch of "
                         f"images ({images.shape[0]})")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"sample_patches: patch_size must be a positive int, got {patch_size!r}")


def sample_positions(centers: jax.Array, height: int, width: int, patch_size: int):
    """Continuous pixel-centre sampling positions of every tap, as grid_sample computes them.

    Args:
      centers: [B, N, 2] landmark centres (x, y) in pixel-index units.
      height, width: image size in pixels.
      patch_size: P.
    Returns:
      (ix [B, N, P], iy [B, N, P]): x positions along the first patch axis i, y positions along the
      second patch axis j, in units where pixel k covers [k - 0.5, k + 0.5) around its centre k.
    """
    offsets = patch_offsets(patch_size, centers.dtype)
    half_h = height * 0.5
    u = (centers[..., 0:1] + offsets) / half_h - 1.0  # official normalisation: H for both axes
    v = (centers[..., 1:2] + offsets) / half_h - 1.0
    ix = ((u + 1.0) * width - 1.0) / 2.0  # grid_sample un-normalisation, align_corners=False
    iy = ((v + 1.0) * height - 1.0) / 2.0
    return ix, iy


def sample_patches(images: jax.Array, centers: jax.Array, patch_size: int = 8) -> jax.Array:
    """Bilinear P x P patches around each centre, as tokens.

    Args:
      images: [B, H, W, C] float images (already normalised; zero padding means the value 0).
      centers: [B, N, 2] centres (x = column, y = row) in pixels; any real value, also off-image.
      patch_size: P, taps per side.
    Returns:
      tokens [B, N, P*P*C] in the images' dtype, element (i*P + j)*C + c = channel c of the tap at
      x-offset i and y-offset j. Differentiable with respect to images and centers (the gradient of
      a tap's value with respect to its position is the bilinear slope, as in torch).
    """
    _check_shapes(images, centers, patch_size)
    b, h, w, c = images.shape
    n, p = centers.shape[1], patch_size
    # Positions in at least float32 even for bf16 images: bf16 cannot resolve sub-pixel offsets at 111.
    pos_dtype = jnp.promote_types(centers.dtype, jnp.float32)
    ix, iy = sample_positions(centers.astype(pos_dtype), h, w, p)

    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    wx1 = ix - x0  # weight of column x0 + 1; carries the gradient with respect to the centre
    wy1 = iy - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)

    # The four corners, stacked on a leading axis: (x0,y0), (x0+1,y0), (x0,y0+1), (x0+1,y0+1).
    # x varies along the patch axis i, y along j, so broadcast x over [..., P, 1] and y over [..., 1, P].
    dx = jnp.array([0, 1, 0, 1], jnp.int32)[:, None, None, None, None]
    dy = jnp.array([0, 0, 1, 1], jnp.int32)[:, None, None, None, None]
    cx = x0[None, :, :, :, None] + dx  # [4, B, N, P, 1]
    cy = y0[None, :, :, None, :] + dy  # [4, B, N, 1, P]
    wx = jnp.where(dx == 1, wx1[None, :, :, :, None], 1.0 - wx1[None, :, :, :, None])
    wy = jnp.where(dy == 1, wy1[None, :, :, None, :], 1.0 - wy1[None, :, :, None, :])
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)  # [4, B, N, P, P]
    weight = jnp.where(inside, wx * wy, 0.0)

    flat_index = jnp.clip(cy, 0, h - 1) * w + jnp.clip(cx, 0, w - 1)  # [4, B, N, P, P]
    flat_index = jnp.moveaxis(flat_index, 0, 1).reshape(b, 4 * n * p * p)
    pixels = images.reshape(b, h * w, c)
    corners = jnp.take_along_axis(pixels, flat_index[..., None], axis=1)  # one gather: [B, 4*N*P*P, C]
    corners = jnp.moveaxis(corners.reshape(b, 4, n, p, p, c), 1, 0)

    patches = jnp.sum(weight[..., None] * corners.astype(weight.dtype), axis=0)  # [B, N, P(i), P(j), C]
    return patches.reshape(b, n, p * p * c).astype(images.dtype)


def standard_grid_centers(image_size: int, patch_size: int) -> jax.Array:
    """[g*g, 2] centres (x, y) of the official `use_standcoord` grid, g = image_size // patch_size.

    Centre n = i*g + j is (x, y) = (i*P + P/2, j*P + P/2) (torch.meshgrid 'ij' order: x-major), e.g.
    4, 12, ..., 108 at 112 px and P = 8.
    """
    g = image_size // patch_size
    coords = jnp.arange(g, dtype=jnp.float32) * patch_size + patch_size / 2
    x, y = jnp.meshgrid(coords, coords, indexing="ij")
    return jnp.stack([x, y], -1).reshape(g * g, 2)


def grid_layout(tokens: jax.Array, patch_size: int) -> jax.Array:
    """Tokens sampled at the x-major standard grid -> the plain-fViT layout, as `use_standcoord` does.

    tokens [B, g*g, P*P*C] in slot order n = i*g + j with (x-offset, y-offset, channel) vectors (what
    `sample_patches` gives for `standard_grid_centers`) -> [B, g*g, P*P*C] row-major over (row j,
    column i) with (row, col, channel) vectors: the official transpose of its patch mosaic before the
    einops patchify. At the unperturbed grid this equals `vit.patchify` of the half-pixel-shifted image.
    """
    b, n, t = tokens.shape
    g = int(round(n ** 0.5))
    c = t // (patch_size * patch_size)
    if g * g != n or c * patch_size * patch_size != t:
        raise ValueError(f"grid_layout: {n} tokens of {t} values are not a square grid of {patch_size}x{patch_size} "
                         f"patches")
    x = tokens.reshape(b, g, g, patch_size, patch_size, c)  # [B, slot i, slot j, x-offset, y-offset, C]
    return x.transpose(0, 2, 1, 4, 3, 5).reshape(b, n, t)
