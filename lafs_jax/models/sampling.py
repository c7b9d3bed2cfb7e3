"""Differentiable bilinear patch extraction at landmark centres (Part fViT's tokeniser).

The sampling is `jax.scipy.ndimage.map_coordinates(order=1, mode='constant', cval=0)`: bilinear
with each of the four neighbours that lies outside the image contributing 0 (torch's
`grid_sample(padding_mode='zeros')`), differentiable with respect to the image and the positions
(the gradient of a tap's value with respect to its position is the bilinear slope, as in torch).
What is written here is only the geometry: the positions grid_sample(align_corners=False) samples
at, and the token layout. tests/test_sampling.py checks values and gradients against torch's
grid_sample (float64, 1e-10) and against map_coordinates called on hand-derived positions.

Speed (CPU): map_coordinates (four gathers, vmapped over channels and batch) beats the previous
hand-written single gather of the four corners (`take_along_axis` of [B, 4*N*P*P] pixel indices
with the channels as slices): at batch 32, 196 landmarks, P = 8, 112 x 112 x 3 images, on the
2-core shared CPU this was measured on (load ~16), median ms one-gather / map_coordinates: forward
123 / 20 (6.2x), forward + gradient w.r.t. the centres 362 / 188 (1.9x), with
`python -m bench.sampling --iters 45` (bench/sampling.py keeps the one-gather version as its
baseline; run it on an accelerator before assuming the same there, it was not measured on one).
Compile time is the same for the forward pass and ~0.4 s longer for the gradient w.r.t. the
centres; the gradient w.r.t. the images (per-channel scatter-adds, which training never needs:
images are data) compiles ~1.8 s longer and runs about as fast as before.

Geometry (official `extract_patches_pytorch_gridsample` in the LAFS Part fViT model):
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
from jax.scipy.ndimage import map_coordinates


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
    ix, iy = sample_positions(centers.astype(pos_dtype), h, w, p)  # [B, N, P]: x along axis i, y along j
    xs = jnp.broadcast_to(ix[..., :, None], (b, n, p, p))
    ys = jnp.broadcast_to(iy[..., None, :], (b, n, p, p))

    def one_channel(image2d, y, x):  # [H, W], [N, P, P] rows / columns -> [N, P, P]
        return map_coordinates(image2d, [y, x], order=1, mode="constant", cval=0.0)

    per_image = jax.vmap(one_channel, in_axes=(2, None, None), out_axes=-1)  # [H, W, C] -> [N, P, P, C]
    patches = jax.vmap(per_image)(images, ys, xs)  # [B, N, P(i), P(j), C], the images' dtype
    return patches.reshape(b, n, p * p * c)

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
