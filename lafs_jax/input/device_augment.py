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
from lafs_jax.input.pixel_ops import (  # noqa: F401  (the recipes' ops, also used from here)
    BLUR_PASSES, HIGHEST, RESAMPLE_METHODS, resample_weights, resized_crop, hflip, luma, adjust_brightness, adjust_contrast, adjust_saturation, rgb_to_hsv, hsv_to_rgb, adjust_hue, color_jitter, grayscale, solarize, box_blur_radius, max_blur_taps, gaussian_blur, erase)



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
