"""View augmentation on the accelerator: the host decodes, the jitted step crops, colours, blurs.

`config.data.augment_on = 'device'` makes the Grain pipelines hand over uint8 decoded images plus
each sample's global position in the stream (`index`, int32); the functions here turn such a batch
into the views the host path (lafs_jax.input.augment, Pillow) would have made, inside the train
step. Everything is a pure, batched jnp function (no Python loop over samples; the only Python
loops run over the few taps of a filter or the four jitter stages, at trace time).

Randomness: sample b draws from `fold_in(key, index[b])` (`sample_keys`), so a view depends only on
the key and the sample's position in the global stream: not on the device count, the batch it came
in, or whether the run was resumed. One small function per op draws its parameters from one key
(`crop_box`, `flip_flag`, `jitter_params`, `bernoulli`, `blur_sigma`, `erasing_box`); the
distribution tests call them directly.

Pixel ops follow Pillow's integer arithmetic (the host path is the reference; values are float32
holding integers 0..255 between ops, as Pillow's uint8 images):
- `resized_crop`: Pillow's `Image.resize(size, resample, box)` = separable convolution, horizontal
  pass then vertical, each rounded to uint8; taps, support (scaled by the downscale factor: the
  antialiasing) and the 22-bit fixed-point coefficients as Pillow's Resample.c; 'bicubic' (Keys,
  a = -0.5) or 'bilinear'. Written here as per-sample weight matrices [S, W] and [S, H] contracted
  with the source image (two einsums). `jax.image.scale_and_translate(..., 'cubic', antialias=True)`
  was checked first and differs from Pillow by up to 16 grey levels (mean 0.16-0.18) on the test
  crops, at the image borders (its edge taps and normalisation differ), against at most 1 here; the
  weight matrices also take a different crop box per view at no extra cost.
- `hflip`; `adjust_brightness` / `adjust_contrast` / `adjust_saturation` (Pillow ImageEnhance:
  `Image.blend` with a black / mean-grey / luma image, truncated); `adjust_hue` (Pillow's uint8
  RGB -> HSV -> RGB with the hue shifted by int(f * 255) mod 256, as the host's torchvision-style
  `transforms.adjust_hue`); `color_jitter` (the four in a per-sample random order);
  `grayscale` (ITU-R 601-2 luma, Pillow's integer formula); `gaussian_blur` (Pillow's
  GaussianBlur: three extended box blurs per axis with radius from sigma, uint32 arithmetic as
  BoxBlur.c, edge pixels repeated); `solarize` (threshold 128); `erase` (a rectangle set to 0).
- normalisation to the model's range: `transforms.normalize`, which takes jax arrays too.
Exactness was measured on CPU (tests/test_device_augment.py). The colour ops use integer arithmetic,
tables and one guarded multiply, so they hold elsewhere too; the crop weights and the blur's box
weights use float division, which some accelerators approximate: expect rare 1-level differences there.

Recipes (the host's `augment.DinoAugment`, `LafsAugment`, `FinetuneAugment` minus flip and
RandAugment, which stay on the host for fine-tuning): `dino_views`, `lafs_views`,
`finetune_images`, each `(config.data, key, batch) -> batch` in the host pipeline's layout.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lafs_jax.input import transforms as T

HIGHEST = jax.lax.Precision.HIGHEST
RESAMPLE_METHODS = ("bicubic", "bilinear")
_PRECISION_BITS = 22  # Pillow's Resample.c for 8-bit images: 32 - 8 - 2
BLUR_PASSES = 3  # Pillow's GaussianBlur: three box blurs per axis


# ----------------------------------------------------------------------------------------------
# keys and parameter draws (one key -> one sample's / view's parameters)
# ----------------------------------------------------------------------------------------------

def sample_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """Keys [B] of the samples at global stream positions `index` (int [B]): fold_in(key, index[b])."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index.astype(jnp.uint32))


CROP_TRIES = 10
CROP_UNIFORMS = 2 * CROP_TRIES + 2  # area and ratio per try, then top and left
JITTER_UNIFORMS = 8  # four factors, four sort keys of the order


def _randint(u: jax.Array, low, high) -> jax.Array:
    """int32 uniform on [low, high) from u ~ U[0, 1) (high may be traced)."""
    return jnp.minimum(low + jnp.floor(u * (high - low)).astype(jnp.int32), high - 1)


def crop_box_from_uniform(u: jax.Array, height: int, width: int, scale: Sequence[float],
                          ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
    """int32 [4] (top, left, h, w): torchvision RandomResizedCrop.get_params, as the host's
    `transforms.random_resized_crop_box` (area fraction U(scale), log-uniform ratio w/h, the first of
    10 candidates that fits, else the largest centred crop within the ratio range), from
    u ~ U[0, 1) [CROP_UNIFORMS]."""
    area = float(height * width)
    target = area * (scale[0] + u[:CROP_TRIES] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(lo + u[CROP_TRIES:2 * CROP_TRIES] * (hi - lo))
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # round half to even, as Python's round
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(ok)
    in_ratio = width / height  # the fallback, static
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    found = ok.any()
    h = jnp.where(found, h[first], fh)
    w = jnp.where(found, w[first], fw)
    top = jnp.where(found, _randint(u[-2], 0, height - h + 1), (height - fh) // 2)
    left = jnp.where(found, _randint(u[-1], 0, width - w + 1), (width - fw) // 2)
    return jnp.stack([top, left, h, w]).astype(jnp.int32)


def crop_box(key: jax.Array, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
    """`crop_box_from_uniform` with its uniforms drawn from `key`."""
    return crop_box_from_uniform(jax.random.uniform(key, (CROP_UNIFORMS,)), height, width, scale, ratio)


def bernoulli(key: jax.Array, p) -> jax.Array:
    """bool []: U[0, 1) < p (the host's `rng.random() < p`)."""
    return jax.random.uniform(key, (), jnp.float32) < p


def flip_flag(key: jax.Array) -> jax.Array:
    """bool []: mirror with probability 0.5."""
    return bernoulli(key, 0.5)


def jitter_from_uniform(u: jax.Array, brightness: float, contrast: float, saturation: float,
                        hue: float) -> tuple[jax.Array, jax.Array]:
    """(factors f32 [4], order i32 [4]) of torchvision ColorJitter from u ~ U[0, 1) [JITTER_UNIFORMS]:
    brightness / contrast / saturation factors U[max(0, 1 - x), 1 + x], hue U[-h, h], and a uniformly
    random permutation of the four ops (argsort of four uniforms). A disabled op (strength 0) gets
    factor 1 (0 for hue) and is skipped by `color_jitter`."""
    lo = jnp.asarray([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue], jnp.float32)
    hi = jnp.asarray([1 + brightness, 1 + contrast, 1 + saturation, hue], jnp.float32)
    return lo + u[:4] * (hi - lo), jnp.argsort(u[4:8]).astype(jnp.int32)


def jitter_params(key: jax.Array, brightness: float, contrast: float, saturation: float,
                  hue: float) -> tuple[jax.Array, jax.Array]:
    """`jitter_from_uniform` with its uniforms drawn from `key`."""
    return jitter_from_uniform(jax.random.uniform(key, (JITTER_UNIFORMS,)), brightness, contrast, saturation, hue)


def blur_sigma(key: jax.Array, radius: Sequence[float]) -> jax.Array:
    """f32 []: the Gaussian blur's sigma (Pillow's `radius`), U(radius[0], radius[1]) px."""
    return jax.random.uniform(key, (), jnp.float32, radius[0], radius[1])


def erasing_box_from_uniform(u: jax.Array, height: int, width: int, scale: Sequence[float],
                             ratio: Sequence[float] = (0.3, 3.3)) -> jax.Array:
    """int32 [4] (top, left, h, w) of torchvision RandomErasing.get_params as the host's
    `transforms.random_erasing_box`, from u ~ U[0, 1) [CROP_UNIFORMS]; h = w = 0 when no candidate
    fits (nothing erased)."""
    target = float(height * width) * (scale[0] + u[:CROP_TRIES] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(lo + u[CROP_TRIES:2 * CROP_TRIES] * (hi - lo))
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    ok = (h < height) & (w < width)
    first = jnp.argmax(ok)
    found = ok.any()
    h = jnp.where(found, h[first], 0)
    w = jnp.where(found, w[first], 0)
    return jnp.stack([_randint(u[-2], 0, height - h + 1), _randint(u[-1], 0, width - w + 1), h, w]).astype(jnp.int32)


def erasing_box(key: jax.Array, height: int, width: int, scale: Sequence[float],
                ratio: Sequence[float] = (0.3, 3.3)) -> jax.Array:
    """`erasing_box_from_uniform` with its uniforms drawn from `key`."""
    return erasing_box_from_uniform(jax.random.uniform(key, (CROP_UNIFORMS,)), height, width, scale, ratio)


# ----------------------------------------------------------------------------------------------
# pixel ops: float32 [N, H, W, 3] holding integers 0..255, per-sample parameters [N]
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------

class SSLColor:
    """DINO's colour block (config.data.ssl_color): jitter strengths (b, c, s, h) applied with
    jitter_prob, grayscale with grayscale_prob, the blur sigma range (px); the per-view blur and
    solarisation probabilities are `ssl_views` arguments."""

    def __init__(self, jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2, blur_radius=(0.1, 2.0)):
        self.jitter, self.jitter_prob = tuple(float(j) for j in jitter), float(jitter_prob)
        self.grayscale_prob, self.blur_radius = float(grayscale_prob), tuple(float(r) for r in blur_radius)

    @classmethod
    def from_config(cls, dc) -> "SSLColor":
        c = dc.ssl_color
        return cls(tuple(c.jitter), c.jitter_prob, c.grayscale_prob, tuple(c.blur_radius))


VIEW_UNIFORMS = CROP_UNIFORMS + JITTER_UNIFORMS + 6


def view_params(key: jax.Array, height: int, width: int, scale: Sequence[float], color: SSLColor,
                blur_prob, solarize_prob) -> dict:
    """One view's random parameters from one uniform draw of VIEW_UNIFORMS numbers (one threefry
    call: fast to compile): crop box, flip, jitter (applied?, factors, order), grayscale, blur
    (applied?, sigma), solarise."""
    u = jax.random.uniform(key, (VIEW_UNIFORMS,), jnp.float32)
    c, j = CROP_UNIFORMS, CROP_UNIFORMS + JITTER_UNIFORMS
    factors, order = jitter_from_uniform(u[c:j], *color.jitter)
    r0, r1 = color.blur_radius
    return {"box": crop_box_from_uniform(u[:c], height, width, scale), "flip": u[j] < 0.5,
            "jitter": u[j + 1] < color.jitter_prob, "factors": factors, "order": order,
            "gray": u[j + 2] < color.grayscale_prob, "blur": u[j + 3] < blur_prob,
            "sigma": r0 + u[j + 4] * (r1 - r0), "solarize": u[j + 5] < solarize_prob}


def _per_view(count: int, first: Sequence[float], rest: float) -> np.ndarray:
    return np.asarray([float(first[i]) if i < len(first) else float(rest) for i in range(count)], np.float32)


def ssl_views(images: jax.Array, keys: jax.Array, *, count: int, size: int, scale: Sequence[float],
              color: SSLColor, blur_probs: np.ndarray, solarize_probs: np.ndarray,
              method: str = "bicubic") -> tuple[jax.Array, jax.Array]:
    """(clean, aug) views, each f32 [B, count, size, size, 3] with values 0..255.

    clean = bicubic RandomResizedCrop + flip (LAFS's landmark-CNN input); aug = clean after jitter
    (jitter_prob), grayscale, blur (blur_probs[v]) and solarisation (solarize_probs[v]).
    images: f32 / uint8 [B, H, W, 3]; keys [B] (one per sample: `sample_keys`).
    """
    b, h, w, _ = images.shape
    if count == 0:
        empty = jnp.zeros((b, 0, size, size, 3), jnp.float32)
        return empty, empty
    view_keys = jax.vmap(lambda k: jax.random.split(k, count))(keys)  # [B, V]
    draw = lambda k, pb, ps: view_params(k, h, w, scale, color, pb, ps)
    p = jax.vmap(jax.vmap(draw, in_axes=(0, 0, 0)), in_axes=(0, None, None))(
        view_keys, jnp.asarray(blur_probs), jnp.asarray(solarize_probs))
    p = jax.tree.map(lambda a: a.reshape(b * count, *a.shape[2:]), p)
    clean = resized_crop(images.astype(jnp.float32), p["box"].reshape(b, count, 4), size, method)
    clean = hflip(clean.reshape(b * count, size, size, 3), p["flip"])
    enabled = tuple(j > 0 for j in color.jitter)
    aug = color_jitter(clean, p["factors"], p["order"], p["jitter"], enabled)
    aug = grayscale(aug, p["gray"])
    if np.any(blur_probs > 0):
        aug = gaussian_blur(aug, p["sigma"], p["blur"], max(color.blur_radius))
    if np.any(solarize_probs > 0):
        aug = solarize(aug, p["solarize"])
    shape = (b, count, size, size, 3)
    return clean.reshape(shape), aug.reshape(shape)


def _group_keys(keys: jax.Array, group: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, group))(keys)


def dino_views(dc, key: jax.Array, batch: dict) -> dict:
    """{'image': uint8 [B, H, W, 3], 'index': int [B], 'label'} -> the host's `dino_batches` layout:
    {'global': f32 [B, G, Sg, Sg, 3], 'local': f32 [B, L, Sl, Sl, 3], 'label'} (+ 'index'), normalised."""
    d, c = dc.dino, dc.ssl_color
    color = SSLColor.from_config(dc)
    keys = sample_keys(key, batch["index"])
    g = d.global_crops
    _, glob = ssl_views(batch["image"], _group_keys(keys, 0), count=g, size=d.global_size, scale=d.global_scale,
                        color=color, blur_probs=_per_view(g, c.global_blur_probs, c.global_blur_probs[-1]),
                        solarize_probs=_per_view(g, c.global_solarize_probs, 0.0))
    n = d.local_crops
    _, local = ssl_views(batch["image"], _group_keys(keys, 1), count=n, size=d.local_size, scale=d.local_scale,
                         color=color, blur_probs=np.full(n, c.local_blur_prob, np.float32),
                         solarize_probs=np.zeros(n, np.float32))
    return {"global": T.normalize(glob, dc.normalization), "local": T.normalize(local, dc.normalization),
            "label": batch["label"], "index": batch["index"]}


def lafs_views(dc, key: jax.Array, batch: dict) -> dict:
    """{'image': uint8 [B, H, W, 3], 'index', 'label'} -> the host's `lafs_batches` layout:
    {'global_clean', 'global_aug': f32 [B, G, S, S, 3], 'local_clean', 'local_aug': f32 [B, L, S, S, 3],
    'label'} (+ 'index': the LAFS landmark noise and subsets are then drawn per sample), normalised;
    clean and aug of a view share the crop and flip."""
    v, c = dc.lafs, dc.ssl_color
    color = SSLColor.from_config(dc)
    keys = sample_keys(key, batch["index"])
    g, n = v.global_views, v.local_views
    g_clean, g_aug = ssl_views(batch["image"], _group_keys(keys, 0), count=g, size=v.view_size,
                               scale=v.global_scale, color=color,
                               blur_probs=_per_view(g, c.global_blur_probs, c.global_blur_probs[-1]),
                               solarize_probs=_per_view(g, c.global_solarize_probs, 0.0))
    l_clean, l_aug = ssl_views(batch["image"], _group_keys(keys, 1), count=n, size=v.view_size,
                               scale=v.local_scale, color=color, blur_probs=np.full(n, c.local_blur_prob, np.float32),
                               solarize_probs=np.zeros(n, np.float32))
    norm = lambda x: T.normalize(x, dc.normalization)
    return {"global_clean": norm(g_clean), "global_aug": norm(g_aug), "local_clean": norm(l_clean),
            "local_aug": norm(l_aug), "label": batch["label"], "index": batch["index"]}


def finetune_params(key: jax.Array, height: int, width: int, dc) -> dict:
    """One fine-tuning sample's parameters: crop box, jitter factors / order, erasing (applied?, box),
    mixup (u, lam: only the batch's first sample's are used)."""
    f = dc.finetune
    k_u, k_beta = jax.random.split(key)
    u = jax.random.uniform(k_u, (2 * CROP_UNIFORMS + JITTER_UNIFORMS + 2,), jnp.float32)
    c, j = CROP_UNIFORMS, CROP_UNIFORMS + JITTER_UNIFORMS
    if f.random_resized_crop:
        box = crop_box_from_uniform(u[:c], height, width, tuple(f.crop_scale))
    else:
        box = jnp.asarray([0, 0, height, width], jnp.int32)
    factors, order = jitter_from_uniform(u[c:j], *(float(f.color_jitter),) * 4)
    alpha = float(f.mixup_alpha)
    lam = jax.random.beta(k_beta, alpha, alpha) if alpha > 0 else jnp.float32(1.0)
    return {"box": box, "factors": factors, "order": order, "erase": u[j] < f.random_erasing_prob,
            "erase_box": erasing_box_from_uniform(u[j + 2:], dc.image_size, dc.image_size,
                                                  tuple(f.random_erasing_scale)),
            "mix_u": u[j + 1], "mix_lam": jnp.asarray(lam, jnp.float32)}


def finetune_images(dc, key: jax.Array, batch: dict) -> dict:
    """{'image': uint8 [B, H, W, 3] (decoded, flipped, RandAugment'ed on the host), 'index', 'label'} ->
    the host's `finetune_batches` layout {'image': f32 [B, S, S, 3], 'label', 'label2', 'lam'}:
    bilinear RandomResizedCrop (or resize) to S = dc.image_size, ColorJitter, RandomErasing, then
    batch mixup with the batch reversed (decided by the first sample's draws, as the host's collate)."""
    f = dc.finetune
    images = batch["image"].astype(jnp.float32)
    b, h, w, _ = images.shape
    size = dc.image_size
    p = jax.vmap(lambda k: finetune_params(k, h, w, dc))(sample_keys(key, batch["index"]))
    x = resized_crop(images, p["box"][:, None], size, "bilinear")[:, 0]
    if f.color_jitter > 0:
        x = color_jitter(x, p["factors"], p["order"], jnp.ones((b,), bool))
    if f.random_erasing_prob > 0:
        x = erase(x, p["erase_box"], p["erase"])
    x = T.normalize(x, dc.normalization)
    label = batch["label"].astype(jnp.int32)
    if f.mixup_prob > 0:
        mix = p["mix_u"][0] < f.mixup_prob
        lam = jnp.where(mix, p["mix_lam"][0], 1.0)
        x = lam * x + (1.0 - lam) * x[::-1]
        label2 = jnp.where(mix, label[::-1], label)
        return {"image": x, "label": label, "label2": label2, "lam": jnp.full((b,), lam, jnp.float32)}
    return {"image": x, "label": label, "label2": label, "lam": jnp.ones((b,), jnp.float32)}


RECIPES = {"dino": dino_views, "lafs": lafs_views, "finetune": finetune_images}
