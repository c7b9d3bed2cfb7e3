"""Per-image augmentations on Pillow images / uint8 arrays, drawing from a numpy Generator.

Written here because the reference pipelines use torchvision and timm, which are not dependencies:
the same operations and parameter distributions, on Pillow (C code for the pixel work) so that one
CPU core keeps up. Every function takes the `np.random.Generator` Grain hands to `random_map` (one
per record, seeded from the pipeline seed and the record's position), so a pipeline is
deterministic per seed.

- `random_resized_crop_box`: torchvision RandomResizedCrop.get_params (10 tries, centre fallback).
- `color_jitter`: torchvision ColorJitter (factors U[1-x, 1+x], hue U[-h, h], random order).
- `random_erasing_box`: torchvision RandomErasing.get_params (ratio 0.3-3.3).
- `RandAugment`: timm `rand-m{M}-mstd{S}-inc1` with LAFS's face op list (timm's increasing op set
  without Solarize / SolarizeAdd), each op applied with probability p, fill grey 128.
- DINO extras: `gaussian_blur` (radius U(0.1, 2.0)), `solarize` (threshold 128), `grayscale`.
The resize uses Pillow's `box=` argument, i.e. the crop and resize in one pass.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

BILINEAR = Image.BILINEAR
BICUBIC = Image.BICUBIC


def to_pil(image) -> Image.Image:
    """A Pillow image from a Pillow image or a (possibly strided) uint8 [H, W, 3] array."""
    return image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))


def to_array(image) -> np.ndarray:
    return np.asarray(image) if isinstance(image, Image.Image) else image


# ---- geometry ----

def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop with area fraction U(scale) and log-uniform aspect ratio w/h."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # fallback: the largest centred crop within the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int, resample=BILINEAR) -> Image.Image:
    """The crop box=(top, left, h, w) of `image` resized to size x size."""
    top, left, h, w = box
    return image.resize((size, size), resample, box=(left, top, left + w, top + h))


def random_resized_crop(image: Image.Image, rng: np.random.Generator, size: int, scale: Sequence[float],
                        resample=BILINEAR) -> Image.Image:
    box = random_resized_crop_box(rng, image.height, image.width, scale)
    return resized_crop(image, box, size, resample)


def hflip(image):
    """Mirror left-right (Pillow image or [H, W, C] array)."""
    if isinstance(image, Image.Image):
        return image.transpose(Image.FLIP_LEFT_RIGHT)
    return image[:, ::-1]


# ---- colour ----

def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """Rotate the hue by hue_factor (in [-0.5, 0.5] of a full turn), as torchvision's PIL path."""
    h, s, v = image.convert("HSV").split()
    shift = int(hue_factor * 255)  # C cast semantics: truncation towards zero
    h = h.point([(i + shift) % 256 for i in range(256)])  # uint8 hue wraps around
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0) -> Image.Image:
    """torchvision ColorJitter: each enabled adjustment with a random factor, in a random order."""
    factors = [rng.uniform(max(0.0, 1 - x), 1 + x) if x > 0 else None for x in (brightness, contrast, saturation)]
    factors.append(rng.uniform(-hue, hue) if hue > 0 else None)
    for op in rng.permutation(4):
        f = factors[op]
        if f is None:
            continue
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(f)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(f)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(f)
        else:
            image = adjust_hue(image, f)
    return image


def grayscale(image: Image.Image) -> Image.Image:
    """Luma (ITU-R 601-2) replicated to 3 channels."""
    return image.convert("L").convert("RGB")


def gaussian_blur(image: Image.Image, rng: np.random.Generator, radius: Sequence[float] = (0.1, 2.0)) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(radius[0], radius[1])))


def solarize(image: Image.Image, threshold: int = 128) -> Image.Image:
    return ImageOps.solarize(image, threshold)


# ---- random erasing ----

def random_erasing_box(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                       ratio: Sequence[float] = (0.3, 3.3)) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the rectangle to erase, or None when 10 tries found none that fits."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if h < height and w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def random_erasing(image: np.ndarray, rng: np.random.Generator, scale: Sequence[float],
                   ratio: Sequence[float] = (0.3, 3.3), value: int = 0) -> np.ndarray:
    """A copy of uint8 [H, W, C] `image` with one random rectangle set to `value` (when one fits)."""
    box = random_erasing_box(rng, image.shape[0], image.shape[1], scale, ratio)
    if box is None:
        return image
    top, left, h, w = box
    out = np.array(image)
    out[top:top + h, left:left + w] = value
    return out


# ---- RandAugment (timm rand_augment_transform, 'inc1' ops) ----

MAX_LEVEL = 10.0
FACE_RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "ColorIncreasing",
                        "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                        "TranslateXRel", "TranslateYRel")


def _negate(rng: np.random.Generator, v: float) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(image, rng, matrix, fill):
    resample = BILINEAR if rng.random() < 0.5 else BICUBIC  # timm picks one of the two at random
    return image.transform(image.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def apply_randaugment_op(name: str, image: Image.Image, level: float, rng: np.random.Generator,
                         fill: tuple[int, int, int] = (128, 128, 128), translate_pct: float = 0.45) -> Image.Image:
    """One timm RandAugment op at magnitude `level` in [0, 10] (signs drawn from `rng`)."""
    frac = level / MAX_LEVEL
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        degrees = _negate(rng, frac * 30.0)
        resample = BILINEAR if rng.random() < 0.5 else BICUBIC
        return image.rotate(degrees, resample=resample, fillcolor=fill)
    if name == "PosterizeIncreasing":
        bits = 4 - int(frac * 4)
        return image if bits >= 8 else ImageOps.posterize(image, bits)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        factor = 1.0 + _negate(rng, frac * 0.9)
        enhancer = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                    "BrightnessIncreasing": ImageEnhance.Brightness,
                    "SharpnessIncreasing": ImageEnhance.Sharpness}[name]
        return enhancer(image).enhance(factor)
    if name == "ShearX":
        return _affine(image, rng, (1, _negate(rng, frac * 0.3), 0, 0, 1, 0), fill)
    if name == "ShearY":
        return _affine(image, rng, (1, 0, 0, _negate(rng, frac * 0.3), 1, 0), fill)
    if name == "TranslateXRel":
        return _affine(image, rng, (1, 0, _negate(rng, frac * translate_pct) * image.size[0], 0, 1, 0), fill)
    if name == "TranslateYRel":
        return _affine(image, rng, (1, 0, 0, 0, 1, _negate(rng, frac * translate_pct) * image.size[1]), fill)
    raise ValueError(f"unknown RandAugment op {name!r}; known: {FACE_RANDAUGMENT_OPS}")


class RandAugment:
    """`num_ops` ops drawn with replacement; each runs with probability `prob` at a magnitude drawn
    from N(magnitude, magnitude_std) clipped to [0, 10] (timm's mstd > 0 behaviour)."""

    def __init__(self, magnitude: float, num_ops: int = 2, prob: float = 0.5, magnitude_std: float = 0.5,
                 fill: int = 128, ops: Sequence[str] = FACE_RANDAUGMENT_OPS):
        for op in ops:
            if op not in FACE_RANDAUGMENT_OPS:
                raise ValueError(f"unknown RandAugment op {op!r}; known: {FACE_RANDAUGMENT_OPS}")
        self.magnitude, self.num_ops, self.prob, self.magnitude_std = magnitude, num_ops, prob, magnitude_std
        self.fill = (int(fill),) * 3
        self.ops = tuple(ops)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for op in rng.choice(len(self.ops), self.num_ops, replace=True):
            if rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = rng.normal(self.magnitude, self.magnitude_std)
            level = min(MAX_LEVEL, max(0.0, level))
            image = apply_randaugment_op(self.ops[op], image, level, rng, self.fill)
        return image


# ---- normalisation ----

NORMALIZATIONS = ("[-1,1]", "[-0.5,0.5]", "imagenet", "vggface2", "clip")
# torchvision Normalize of DINO (and of the official DataAugmentationDINO), on x/255, per channel
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# FRA's VGGFace2 statistics (official README / data/transforms.py), on x/255, per channel
VGGFACE2_MEAN = (0.5231, 0.4044, 0.3489)
VGGFACE2_STD = (0.2536, 0.2194, 0.2070)
# OpenAI CLIP's (and FaRL's) per-channel statistics on x/255, RGB
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN_STD = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "vggface2": (VGGFACE2_MEAN, VGGFACE2_STD),
            "clip": (CLIP_MEAN, CLIP_STD)}


def normalize(images, normalization: str):
    """float32 images from uint8 [..., 3]: '[-1,1]' is x/255*2-1, '[-0.5,0.5]' is x/255-0.5,
    'imagenet' / 'vggface2' / 'clip' are (x/255 - mean) / std per channel (MEAN_STD).

    NumPy in -> NumPy out (on the host, in place on one float32 copy); a jax array in -> jax array
    out, the same float32 operations in the same order (on the device: `lafs_jax.eval.embed` and the
    device-side views)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; choose one of {NORMALIZATIONS}")
    if isinstance(images, jax.Array):
        x = images.astype(jnp.float32)
        if normalization == "[-1,1]":
            return x * jnp.float32(2.0 / 255.0) - jnp.float32(1.0)
        if normalization == "[-0.5,0.5]":
            return x * jnp.float32(1.0 / 255.0) - jnp.float32(0.5)
        mean, std = MEAN_STD[normalization]
        return (x * jnp.float32(1.0 / 255.0) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    x = images.astype(np.float32)
    if normalization == "[-1,1]":
        x *= np.float32(2.0 / 255.0)
        x -= np.float32(1.0)
    elif normalization == "[-0.5,0.5]":
        x *= np.float32(1.0 / 255.0)
        x -= np.float32(0.5)
    else:
        mean, std = MEAN_STD[normalization]
        x *= np.float32(1.0 / 255.0)
        x -= np.asarray(mean, np.float32)
        x /= np.asarray(std, np.float32)
    return x
