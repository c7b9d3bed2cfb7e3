"""Pillow's pixel arithmetic on the accelerator: float32 [N, H, W, 3] images holding integers 0..255,
per-sample parameters [N] (what `device_augment`'s recipes compose; the ops and their exactness against
Pillow are described in its docstring).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
RESAMPLE_METHODS = ("bicubic", "bilinear")
_PRECISION_BITS = 22  # Pillow's Resample.c for 8-bit images: 32 - 8 - 2
BLUR_PASSES = 3  # Pillow's GaussianBlur: three box blurs per axis



def _uint8(x: jax.Array) -> jax.Array:
    """Round half up and clip to 0..255 (Pillow's fixed-point `clip8`)."""
    return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _kernel(method: str, x: jax.Array) -> tuple[jax.Array, float]:
    x = jnp.abs(x)
    if method == "bicubic":  # Pillow's bicubic_filter, a = -0.5
        a = -0.5
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0)), 2.0
    if method == "bilinear":
        return jnp.where(x < 1.0, 1.0 - x, 0.0), 1.0
    raise ValueError(f"resample method {method!r}; choose one of {RESAMPLE_METHODS}")


def resample_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int,
                     method: str = "bicubic") -> jax.Array:
    """f32 [out_size, in_size]: Pillow's resampling coefficients for the input span
    [start, start + length) (pixels) onto out_size outputs (Resample.c `precompute_coeffs` +
    `normalize_coeffs_8bpc`: support scaled by max(length / out_size, 1), taps in
    [trunc(centre - support + 0.5), trunc(centre + support + 0.5)), normalised, then rounded to
    22-bit fixed point)."""
    start = jnp.asarray(start, jnp.float32)
    scale = jnp.asarray(length, jnp.float32) / out_size
    filterscale = jnp.maximum(scale, 1.0)
    _, base_support = _kernel(method, jnp.zeros(()))
    support = base_support * filterscale
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale  # [out]
    xmin = jnp.maximum(jnp.trunc(centre - support + 0.5), 0.0)
    xmax = jnp.minimum(jnp.trunc(centre + support + 0.5), float(in_size))
    x = jnp.arange(in_size, dtype=jnp.float32)[None, :]  # [1, in]
    w, _ = _kernel(method, (x - centre[:, None] + 0.5) / filterscale)
    w = jnp.where((x >= xmin[:, None]) & (x < xmax[:, None]), w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = jnp.where(total != 0, w / jnp.where(total != 0, total, 1.0), 0.0)
    one = float(1 << _PRECISION_BITS)
    return jnp.trunc(w * one + jnp.where(w < 0, -0.5, 0.5)) / one  # C (int)(w * 2^22 +- 0.5)


def resized_crop(images: jax.Array, boxes: jax.Array, size: int, method: str = "bicubic") -> jax.Array:
    """Crops resized to size x size, Pillow's `resize((size, size), method, box=...)`.

    Args:
      images: f32 [B, H, W, C], values 0..255 (one source image per sample).
      boxes: int [B, V, 4] (top, left, h, w) crop boxes, V views per source image.
      size: output side (px).
      method: 'bicubic' (DINO / LAFS views) or 'bilinear' (fine-tuning).
    Returns:
      f32 [B, V, size, size, C], integers 0..255.
    """
    b, h_in, w_in, _ = images.shape
    boxes = boxes.astype(jnp.float32)
    weights = jax.vmap(jax.vmap(lambda s, n, n_in: resample_weights(s, n, n_in, size, method),
                                in_axes=(0, 0, None)), in_axes=(0, 0, None))
    wx = weights(boxes[..., 1], boxes[..., 3], w_in)  # [B, V, S, W]
    wy = weights(boxes[..., 0], boxes[..., 2], h_in)  # [B, V, S, H]
    rows = _uint8(jnp.einsum("bvsw,bhwc->bvhsc", wx, images, precision=HIGHEST))  # horizontal pass first
    return _uint8(jnp.einsum("bvth,bvhsc->bvtsc", wy, rows, precision=HIGHEST))


def hflip(images: jax.Array, flags: jax.Array) -> jax.Array:
    """images [N, H, W, C] mirrored left-right where flags (bool [N])."""
    return jnp.where(flags[:, None, None, None], images[:, :, ::-1], images)


def luma(images: jax.Array) -> jax.Array:
    """[N, H, W] Pillow's 'L' conversion: (R*19595 + G*38470 + B*7471 + 2^15) >> 16 (exact in f32)."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    return jnp.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _blend(degenerate: jax.Array, images: jax.Array, factor: jax.Array) -> jax.Array:
    """Pillow's Image.blend(degenerate, image, f): deg + f * (img - deg), truncated, clipped."""
    f = factor[:, None, None, None]
    # the product rounded on its own, as Pillow's C: a max between the product and the sum keeps
    # the compiler from contracting them into a fused multiply-add (|f * (img - deg)| < 2^16 here)
    scaled = jnp.maximum(f * (images - degenerate), -65536.0)
    return jnp.clip(jnp.floor(degenerate + scaled), 0.0, 255.0)


def adjust_brightness(images: jax.Array, factor: jax.Array) -> jax.Array:
    """ImageEnhance.Brightness: blend with black, factor f32 [N]."""
    return _blend(jnp.zeros_like(images), images, factor)


def adjust_contrast(images: jax.Array, factor: jax.Array) -> jax.Array:
    """ImageEnhance.Contrast: blend with the grey image at the rounded mean luma."""
    grey = luma(images).astype(jnp.int32)
    count = grey.shape[1] * grey.shape[2]
    mean = ((2 * grey.sum(axis=(1, 2)) + count) // (2 * count)).astype(jnp.float32)  # int(mean + 0.5), exactly
    return _blend(jnp.broadcast_to(mean[:, None, None, None], images.shape), images, factor)


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
    """ImageEnhance.Color: blend with the luma image."""
    return _blend(jnp.broadcast_to(luma(images)[..., None], images.shape), images, factor)


def _pillow_rgb_to_hsv_np(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hue, saturation) uint8 of Pillow's rgb2hsv_row (Convert.c) in numpy, with its exact mix of
    float and double arithmetic: (maxc - x) / cr and cr / maxc in float, `2.0 + rc - bc` and
    `4.0 + gc - rc` in double rounded to float, fmod(h / 6.0 + 1.0, 1.0) in double, then
    (int)(float * 255.0). r, g, b: int arrays, not all equal."""
    f32, f64 = np.float32, np.float64
    maxc = np.maximum(r, np.maximum(g, b))
    minc = np.minimum(r, np.minimum(g, b))
    cr = (maxc - minc).astype(f32)
    s = (cr / maxc.astype(f32)).astype(f32)
    rc, gc, bc = ((maxc - x).astype(f32) / cr for x in (r, g, b))
    h = np.where(r == maxc, (bc - gc).astype(f32),
                 np.where(g == maxc, (2.0 + rc.astype(f64) - bc.astype(f64)).astype(f32),
                          (4.0 + gc.astype(f64) - rc.astype(f64)).astype(f32)))
    h = np.fmod(h.astype(f64) / 6.0 + 1.0, 1.0).astype(f32)
    hue = np.clip(np.trunc(h.astype(f64) * 255.0), 0, 255).astype(np.uint8)
    sat = np.clip(np.trunc(s.astype(f64) * 255.0), 0, 255).astype(np.uint8)
    return hue, sat


def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    """Pillow's uint8 hue as a table [6 * 256 * 256] over (case, cr, n) and saturation [256 * 256] over
    (cr, maxc). The hue depends only on which channel is the maximum (first of r, g, b on ties),
    which of the other two is the minimum, cr = max - min and n = max - (the remaining channel):
    the six cases are built with max = 255 and evaluated by `_pillow_rgb_to_hsv_np`. Tabulating
    keeps the device result bit-exact whatever the compiler does to float expressions."""
    cr, n = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    cr = np.maximum(cr, 1)  # cr = 0 is grey, handled apart
    hi, lo, other = np.full_like(cr, 255), 255 - cr, 255 - np.minimum(n, cr)
    cases = [(hi, other, lo), (hi, lo, other), (other, hi, lo), (lo, hi, other), (lo, other, hi), (other, lo, hi)]
    hue = np.stack([_pillow_rgb_to_hsv_np(*rgb)[0] for rgb in cases]).reshape(-1)
    maxc, c = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")  # [maxc, cr]
    valid = (c >= 1) & (c <= maxc)
    sat = np.zeros((256, 256), np.uint8)
    sat[valid] = _pillow_rgb_to_hsv_np(maxc[valid], maxc[valid] - c[valid], maxc[valid] - c[valid])[1]
    return hue, sat.T.reshape(-1).copy()  # indexed cr * 256 + maxc


_HUE_TABLE, _SAT_TABLE = _hsv_tables()


def rgb_to_hsv(images: jax.Array) -> jax.Array:
    """Pillow's uint8 RGB -> HSV (Convert.c rgb2hsv_row), [..., 3] -> [..., 3] integers 0..255
    (f32), bit-exact: hue and saturation looked up in `_hsv_tables`."""
    x = images.astype(jnp.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.maximum(r, jnp.maximum(g, b))
    minc = jnp.minimum(r, jnp.minimum(g, b))
    cr = maxc - minc
    # case and the numerator of the channel that is neither the maximum nor the minimum
    case = jnp.where(r == maxc, jnp.where(b == minc, 0, 1),
                     jnp.where(g == maxc, jnp.where(b == minc, 2, 3), jnp.where(r == minc, 4, 5)))
    mid = jnp.select([case == 0, case == 1, case == 2, case == 3, case == 4], [g, b, r, b, g], r)
    n = maxc - mid
    hue = jnp.asarray(_HUE_TABLE)[case * 65536 + cr * 256 + n].astype(jnp.float32)
    sat = jnp.asarray(_SAT_TABLE)[cr * 256 + maxc].astype(jnp.float32)
    grey = cr == 0
    return jnp.stack([jnp.where(grey, 0.0, hue), jnp.where(grey, 0.0, sat), maxc.astype(jnp.float32)], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Pillow's uint8 HSV -> RGB (Convert.c hsv2rgb), integers 0..255; the rounding of
    v * (1 - s/255 * f) done in exact integer arithmetic (f = 6h/255 - i), as C's double gets it."""
    hsv = hsv.astype(jnp.int32)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = (h * 6) // 255
    frac = h * 6 - 255 * i  # f = frac / 255
    p = (2 * v * (255 - s) + 255) // 510  # round(v * (1 - s/255))
    q = (2 * v * (65025 - s * frac) + 65025) // 130050  # round(v * (1 - s/255 * f))
    t = (2 * v * (65025 - s * (255 - frac)) + 65025) // 130050  # round(v * (1 - s/255 * (1 - f)))
    sector = i % 6
    r = jnp.select([sector == k for k in range(6)], [v, q, p, p, t, v])
    g = jnp.select([sector == k for k in range(6)], [t, v, v, q, p, p])
    b = jnp.select([sector == k for k in range(6)], [p, p, t, v, v, q])
    rgb = jnp.clip(jnp.stack([r, g, b], axis=-1), 0, 255)
    return jnp.where((s == 0)[..., None], v[..., None], rgb).astype(jnp.float32)


def adjust_hue(images: jax.Array, factor: jax.Array) -> jax.Array:
    """Hue rotated by factor (f32 [N] in [-0.5, 0.5] of a turn): the uint8 hue plus int(f * 255) mod 256."""
    hsv = rgb_to_hsv(images)
    shift = jnp.trunc(factor * 255.0)[:, None, None]
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 256.0))
    return hsv_to_rgb(hsv)


def _blend_op(x: jax.Array, op: jax.Array, factor: jax.Array) -> jax.Array:
    """Brightness (op 0), contrast (1) or saturation (2) per sample: one blend with the op's degenerate."""
    grey = luma(x)
    count = grey.shape[1] * grey.shape[2]
    mean = ((2 * grey.astype(jnp.int32).sum(axis=(1, 2)) + count) // (2 * count)).astype(jnp.float32)
    o = op[:, None, None, None]
    degenerate = jnp.where(o == 0, 0.0, jnp.where(o == 1, mean[:, None, None, None], grey[..., None]))
    return _blend(jnp.broadcast_to(degenerate, x.shape), x, factor)


def color_jitter(images: jax.Array, factors: jax.Array, order: jax.Array, apply: jax.Array,
                 enabled: Sequence[bool] = (True, True, True, True)) -> jax.Array:
    """ColorJitter with per-sample factors f32 [N, 4] (brightness, contrast, saturation, hue) in the
    per-sample order i32 [N, 4] (a permutation of 0..3), where apply (bool [N]); ops with enabled[i]
    False are skipped.

    The order is split at the hue: the blend ops (brightness, contrast, saturation: one blend with a
    per-sample degenerate image) at the positions before it, the hue once for every sample, then the
    blend ops after it: 3 + 3 cheap blends and one HSV round trip, instead of every op at every
    position."""
    enabled_ops = jnp.asarray(enabled, bool)
    hue_at = jnp.argmax(order == 3, axis=1)  # position of the hue in each sample's order
    x = images

    def blend_stage(x, k, active):
        op = order[:, k]
        run = apply & active & (op != 3) & enabled_ops[op]
        factor = jnp.take_along_axis(factors, op[:, None], axis=1)[:, 0]
        return jnp.where(run[:, None, None, None], _blend_op(x, op, factor), x)

    for k in range(3):  # positions 0..2, before the hue
        x = blend_stage(x, k, k < hue_at)
    if enabled[3]:
        x = jnp.where(apply[:, None, None, None], adjust_hue(x, factors[:, 3]), x)
    for k in range(1, 4):  # positions 1..3, after the hue
        x = blend_stage(x, k, k > hue_at)
    return x


def grayscale(images: jax.Array, apply: jax.Array) -> jax.Array:
    """Pillow convert('L').convert('RGB') where apply (bool [N])."""
    grey = jnp.broadcast_to(luma(images)[..., None], images.shape)
    return jnp.where(apply[:, None, None, None], grey, images)


def solarize(images: jax.Array, apply: jax.Array, threshold: float = 128.0) -> jax.Array:
    """ImageOps.solarize: values >= threshold inverted (255 - x), where apply (bool [N])."""
    sol = jnp.where(images >= threshold, 255.0 - images, images)
    return jnp.where(apply[:, None, None, None], sol, images)


def box_blur_radius(sigma):
    """Pillow's `_gaussian_blur_radius(sigma, 3)`: the extended box radius of one of 3 passes."""
    xp = jnp if isinstance(sigma, jax.Array) else np
    sigma = xp.asarray(sigma, xp.float32)
    sigma2 = sigma * sigma / BLUR_PASSES
    length = xp.sqrt(12.0 * sigma2 + 1.0)
    l = xp.floor((length - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) * (l + 1)))
    return (l + a).astype(xp.float32)


def max_blur_taps(max_sigma: float) -> int:
    """Half-width (px) of the widest box pass for sigma <= max_sigma: integer radius + the far tap."""
    return int(np.floor(box_blur_radius(max_sigma))) + 1


def _box_pass(x: jax.Array, radius: jax.Array, axis: int, half_width: int) -> jax.Array:
    """One Pillow box-blur pass (BoxBlur.c ImagingLineBoxBlur) along `axis` of uint32 [N, H, W, C],
    per-sample float radius [N]; edge pixels repeated; exact uint32 arithmetic."""
    n = x.shape[0]
    lint = jnp.floor(radius).astype(jnp.uint32)  # integer part
    ww = jnp.floor(jnp.float32(1 << 24) / (radius * 2 + 1)).astype(jnp.uint32)
    fw = ((jnp.uint32(1 << 24) - (lint * 2 + 1) * ww) // 2).astype(jnp.uint32)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (half_width, half_width)
    xp = jnp.pad(x, pad, mode="edge")
    size = x.shape[axis]
    shape = [n] + [1] * (x.ndim - 1)
    acc = jnp.zeros_like(x)
    far = jnp.zeros_like(x)
    for k in range(-half_width, half_width + 1):
        tap = jax.lax.slice_in_dim(xp, half_width + k, half_width + k + size, axis=axis)
        inside = (jnp.uint32(abs(k)) <= lint).astype(jnp.uint32).reshape(shape)
        edge = (jnp.uint32(abs(k)) == lint + 1).astype(jnp.uint32).reshape(shape)
        acc = acc + tap * inside
        far = far + tap * edge
    bulk = acc * ww.reshape(shape) + far * fw.reshape(shape) + jnp.uint32(1 << 23)
    return bulk >> 24


def gaussian_blur(images: jax.Array, sigma: jax.Array, apply: jax.Array, max_sigma: float) -> jax.Array:
    """Pillow's ImageFilter.GaussianBlur(sigma) where apply (bool [N]): 3 extended box passes along
    x, then 3 along y, each rounded to uint8. sigma f32 [N] <= max_sigma (static: the taps)."""
    half_width = max_blur_taps(max_sigma)
    radius = box_blur_radius(sigma)
    x = images.astype(jnp.uint32)
    for axis in (2, 1):  # the passes of an axis in a loop: compiled once
        x = jax.lax.fori_loop(0, BLUR_PASSES, lambda _, y, a=axis: _box_pass(y, radius, a, half_width), x)
    return jnp.where(apply[:, None, None, None], x.astype(jnp.float32), images)


def erase(images: jax.Array, boxes: jax.Array, apply: jax.Array, value: float = 0.0) -> jax.Array:
    """images [N, H, W, C] with the rectangle boxes int [N, 4] (top, left, h, w) set to value, where apply."""
    _, h, w, _ = images.shape
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    top, left, bh, bw = (boxes[:, i][:, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw) & apply[:, None, None]
    return jnp.where(inside[..., None], value, images)
