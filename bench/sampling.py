"""Patch sampler speed: `sample_patches` (jax.scipy.ndimage.map_coordinates) vs a single hand-written gather.

    python -m bench.sampling [--batch 32] [--landmarks 196] [--patch 8] [--image 112] [--iters 30]

Both compute the same tokens from the same grid_sample positions (`sample_positions`):
`lafs_jax.models.sampling.sample_patches` interpolates each channel with
`map_coordinates(order=1, mode='constant')`, vmapped over channels and batch; `one_gather_patches`
(below, the package's implementation before this benchmark) fetches the four corners of every tap
with one `take_along_axis`. The numbers are quoted in lafs_jax/models/sampling.py.
For each it times, jitted, the forward pass and forward + gradient with respect to the centres
(what training needs: the landmark CNN learns through the sampling positions), as the median of
`--iters` runs after one warm-up, the two implementations interleaved so that load on a shared
machine hits both alike. Prints one JSON line per (implementation, mode) with ms per call and
the ratio map_coordinates / one-gather. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from lafs_jax.models.sampling import sample_patches, sample_positions


def one_gather_patches(images: jax.Array, centers: jax.Array, patch_size: int) -> jax.Array:
    """The sampler's previous implementation (until this benchmark): the four bilinear corners of
    every tap fetched with one `take_along_axis` over flattened pixel indices, channels as slices."""
    b, h, w, c = images.shape
    n, p = centers.shape[1], patch_size
    ix, iy = sample_positions(centers, h, w, p)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    wx1, wy1 = ix - x0, iy - y0
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    # corners on a leading axis: (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
    dx = jnp.array([0, 1, 0, 1], jnp.int32)[:, None, None, None, None]
    dy = jnp.array([0, 0, 1, 1], jnp.int32)[:, None, None, None, None]
    cx = x0[None, :, :, :, None] + dx  # [4, B, N, P, 1]
    cy = y0[None, :, :, None, :] + dy  # [4, B, N, 1, P]
    wx = jnp.where(dx == 1, wx1[None, :, :, :, None], 1.0 - wx1[None, :, :, :, None])
    wy = jnp.where(dy == 1, wy1[None, :, :, None, :], 1.0 - wy1[None, :, :, None, :])
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    weight = jnp.where(inside, wx * wy, 0.0)
    flat_index = jnp.clip(cy, 0, h - 1) * w + jnp.clip(cx, 0, w - 1)  # [4, B, N, P, P]
    flat_index = jnp.moveaxis(flat_index, 0, 1).reshape(b, 4 * n * p * p)
    corners = jnp.take_along_axis(images.reshape(b, h * w, c), flat_index[..., None], axis=1)
    corners = jnp.moveaxis(corners.reshape(b, 4, n, p, p, c), 1, 0)
    patches = jnp.sum(weight[..., None] * corners.astype(weight.dtype), axis=0)
    return patches.reshape(b, n, p * p * c).astype(images.dtype)


def timed(fn, args, iters: int) -> list[float]:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--landmarks", type=int, default=196)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--image", type=int, default=112)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args(argv)

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    images = jax.random.normal(k1, (args.batch, args.image, args.image, 3), jnp.float32)
    centers = jax.random.uniform(k2, (args.batch, args.landmarks, 2), jnp.float32, -4.0, args.image + 4.0)
    cot = jax.random.normal(k3, (args.batch, args.landmarks, args.patch * args.patch * 3), jnp.float32)
    impls = {"one_gather": one_gather_patches, "map_coordinates": sample_patches}
    fns = {}
    for name, impl in impls.items():
        fwd = jax.jit(lambda im, ce, impl=impl: impl(im, ce, args.patch))
        grad = jax.jit(jax.value_and_grad(lambda ce, im, impl=impl: jnp.sum(impl(im, ce, args.patch) * cot)))
        fns[(name, "forward")] = (fwd, (images, centers))
        fns[(name, "forward+grad_centers")] = (grad, (centers, images))
    times = {key: [] for key in fns}
    for _ in range(3):  # interleave rounds so that machine load is shared
        for key, (fn, fargs) in fns.items():
            times[key] += timed(fn, fargs, max(1, args.iters // 3))
    base = {"device": f"{jax.device_count()} x {jax.devices()[0].platform}", "batch": args.batch,
            "landmarks": args.landmarks, "patch": args.patch, "image": args.image}
    for mode in ("forward", "forward+grad_centers"):
        ms = {name: statistics.median(times[(name, mode)]) for name in impls}
        for name in impls:
            print(json.dumps({**base, "impl": name, "mode": mode, "ms": round(ms[name], 3),
                              "map_coordinates_over_one_gather": round(ms["map_coordinates"] / ms["one_gather"], 2)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
