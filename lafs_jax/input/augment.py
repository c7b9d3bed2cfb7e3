"""Per-record augmentation recipes (Grain `RandomMap`s) of the four pipelines; uint8 in, uint8 out.

- `FinetuneAugment` (the official `image_iter.py`, official order): flip -> RandAugment -> RandomResizedCrop (bilinear)
  -> ColorJitter -> RandomErasing; it also draws the record's mixup numbers (`mix_u`, `mix_lam`), which
  the batch collation of the first record of a batch uses, so mixup is deterministic per seed too.
- `DinoAugment` (DINO's DataAugmentationDINO): G global crops (bicubic, scale 0.4-1) and L local crops
  (scale 0.05-0.4, lafs_train.py's default), each with flip, jitter p=0.8, grayscale p=0.2; blur
  p=1.0 / 0.1 on the two global crops (solarise p=0.2 on the second) and p=0.5 on the locals.
- `LafsAugment` (`DataAugmentation_LAFS` in the official `lafs_train.py`): every view is a RandomResizedCrop of one size and scale range + flip;
  its clean copy is the crop, its augmented copy the same crop after jitter p=0.8, grayscale p=0.2 and
  the per-view blur / solarisation of DINO.
- `SameIdentityViews` (`data.ssl_positives='identity'`, a diagnostic that uses labels): DINO's or LAFS's
  views of a record with the last half of its global and local views made from another image of the
  same identity.
- `FinetuneHostAugment`: fine-tuning's host part with `augment_on='device'`: flip and RandAugment only.
- `EvalPrepare`: resize to the evaluation size; optionally the mirrored copy.
Normalisation to float happens per batch (pipelines), where it is one vectorised operation.
"""
from __future__ import annotations

from typing import Sequence

import grain
import numpy as np
from PIL import Image

from lafs_jax.input import transforms as T


class FinetuneAugment(grain.transforms.RandomMap):
    """{'image', 'label'} -> {'image': uint8 [S, S, 3], 'label', 'mix_u', 'mix_lam'}.

    Each augmentation is off when its field is None / 0: `flip` (bool), `crop_scale` (RandomResizedCrop
    scale range, else a plain resize to S), `randaugment` (a transforms.RandAugment), `jitter`
    (brightness = contrast = saturation = hue strength), `erasing_prob` with `erasing_scale`.
    """

    def __init__(self, image_size: int, flip: bool = True, crop_scale: Sequence[float] | None = (0.9, 1.0),
                 randaugment: T.RandAugment | None = None, jitter: float = 0.1, erasing_prob: float = 0.5,
                 erasing_scale: Sequence[float] = (0.02, 0.1), mixup_alpha: float = 0.2):
        self.image_size, self.flip, self.crop_scale = int(image_size), bool(flip), crop_scale
        self.randaugment, self.jitter = randaugment, float(jitter)
        self.erasing_prob, self.erasing_scale = float(erasing_prob), tuple(erasing_scale)
        self.mixup_alpha = float(mixup_alpha)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        size = self.image_size
        if self.flip and rng.random() < 0.5:
            image = T.hflip(image)
        if self.randaugment is not None:
            image = self.randaugment(T.to_pil(image), rng)
        if self.crop_scale is not None:
            image = T.random_resized_crop(T.to_pil(image), rng, size, self.crop_scale, T.BILINEAR)
        elif T.to_array(image).shape[:2] != (size, size):
            image = T.to_pil(image).resize((size, size), T.BILINEAR)
        if self.jitter > 0:
            image = T.color_jitter(T.to_pil(image), rng, self.jitter, self.jitter, self.jitter, self.jitter)
        image = T.to_array(image)
        if self.erasing_prob > 0 and rng.random() < self.erasing_prob:
            image = T.random_erasing(image, rng, self.erasing_scale, value=0)
        mix_lam = rng.beta(self.mixup_alpha, self.mixup_alpha) if self.mixup_alpha > 0 else 1.0
        return {"image": image, "label": element["label"], "mix_u": rng.random(), "mix_lam": float(mix_lam)}


class FinetuneHostAugment(grain.transforms.RandomMap):
    """{'image', 'label', 'index'} -> the same with the image flipped (p=0.5) and RandAugment'ed, uint8 at
    its decoded size: the host part of fine-tuning with augment_on='device' (the device crops,
    jitters, erases and mixes: lafs_jax.input.device_augment.finetune_images)."""

    def __init__(self, flip: bool = True, randaugment: T.RandAugment | None = None):
        self.flip, self.randaugment = bool(flip), randaugment

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        if self.flip and rng.random() < 0.5:
            image = T.hflip(image)
        if self.randaugment is not None:
            image = self.randaugment(T.to_pil(image), rng)
        return {**element, "image": np.ascontiguousarray(T.to_array(image))}


class _ColorAugment:
    """DINO's colour block: jitter with probability p, grayscale with probability p_gray."""

    def __init__(self, jitter: Sequence[float], jitter_prob: float, grayscale_prob: float):
        self.jitter, self.jitter_prob, self.grayscale_prob = tuple(jitter), float(jitter_prob), float(grayscale_prob)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.jitter_prob:
            image = T.color_jitter(image, rng, *self.jitter)
        if rng.random() < self.grayscale_prob:
            image = T.grayscale(image)
        return image


def _blur_solarize(image: Image.Image, rng: np.random.Generator, blur_prob: float, solarize_prob: float,
                   blur_radius: Sequence[float]) -> Image.Image:
    if blur_prob > 0 and rng.random() < blur_prob:
        image = T.gaussian_blur(image, rng, blur_radius)
    if solarize_prob > 0 and rng.random() < solarize_prob:
        image = T.solarize(image)
    return image


def _stack(views: list[np.ndarray], size: int) -> np.ndarray:
    """uint8 [V, size, size, 3] (V may be 0)."""
    return np.stack(views) if views else np.zeros((0, size, size, 3), np.uint8)


def _view_probs(count: int, first_probs: Sequence[float], rest: float) -> list[float]:
    """Per-view probability: first_probs for the first views, `rest` for any further ones."""
    return [float(first_probs[i]) if i < len(first_probs) else float(rest) for i in range(count)]


class DinoAugment(grain.transforms.RandomMap):
    """{'image', 'label'} -> {'global': uint8 [G, Sg, Sg, 3], 'local': uint8 [L, Sl, Sl, 3], 'label'}."""

    def __init__(self, global_size: int = 112, global_crops: int = 2, global_scale=(0.4, 1.0), local_size: int = 48,
                 local_crops: int = 8, local_scale=(0.05, 0.4), jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8,
                 grayscale_prob=0.2, blur_radius=(0.1, 2.0), global_blur_probs=(1.0, 0.1),
                 global_solarize_probs=(0.0, 0.2), local_blur_prob=0.5):
        self.global_size, self.global_crops, self.global_scale = int(global_size), int(global_crops), tuple(global_scale)
        self.local_size, self.local_crops, self.local_scale = int(local_size), int(local_crops), tuple(local_scale)
        self.color = _ColorAugment(jitter, jitter_prob, grayscale_prob)
        self.blur_radius = tuple(blur_radius)
        self.global_blur = _view_probs(self.global_crops, global_blur_probs, global_blur_probs[-1])
        self.global_solarize = _view_probs(self.global_crops, global_solarize_probs, 0.0)
        self.local_blur_prob = float(local_blur_prob)

    def _view(self, image, rng, size, scale, blur_prob, solarize_prob) -> np.ndarray:
        view = T.random_resized_crop(image, rng, size, scale, T.BICUBIC)
        if rng.random() < 0.5:
            view = T.hflip(view)
        view = self.color(view, rng)
        return np.asarray(_blur_solarize(view, rng, blur_prob, solarize_prob, self.blur_radius))

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = T.to_pil(element["image"])
        glob = [self._view(image, rng, self.global_size, self.global_scale, self.global_blur[i],
                           self.global_solarize[i]) for i in range(self.global_crops)]
        local = [self._view(image, rng, self.local_size, self.local_scale, self.local_blur_prob, 0.0)
                 for _ in range(self.local_crops)]
        return {"global": _stack(glob, self.global_size), "local": _stack(local, self.local_size),
                "label": element["label"]}


class LafsAugment(grain.transforms.RandomMap):
    """{'image', 'label'} -> {'global_clean', 'global_aug': uint8 [G, S, S, 3], 'local_clean', 'local_aug':
    uint8 [L, S, S, 3], 'label'}; clean and aug of a view share one geometric crop (and flip)."""

    def __init__(self, view_size: int = 112, global_views: int = 2, local_views: int = 8, global_scale=(0.4, 1.0),
                 local_scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, grayscale_prob=0.2,
                 blur_radius=(0.1, 2.0), global_blur_probs=(1.0, 0.1), global_solarize_probs=(0.0, 0.2),
                 local_blur_prob=0.5):
        self.view_size, self.global_views, self.local_views = int(view_size), int(global_views), int(local_views)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.color = _ColorAugment(jitter, jitter_prob, grayscale_prob)
        self.blur_radius = tuple(blur_radius)
        self.global_blur = _view_probs(self.global_views, global_blur_probs, global_blur_probs[-1])
        self.global_solarize = _view_probs(self.global_views, global_solarize_probs, 0.0)
        self.local_blur_prob = float(local_blur_prob)

    def _pair(self, image, rng, scale, blur_prob, solarize_prob) -> tuple[np.ndarray, np.ndarray]:
        view = T.random_resized_crop(image, rng, self.view_size, scale, T.BICUBIC)
        if rng.random() < 0.5:
            view = T.hflip(view)
        aug = _blur_solarize(self.color(view, rng), rng, blur_prob, solarize_prob, self.blur_radius)
        return np.asarray(view), np.asarray(aug)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = T.to_pil(element["image"])
        g = [self._pair(image, rng, self.global_scale, self.global_blur[i], self.global_solarize[i])
             for i in range(self.global_views)]
        loc = [self._pair(image, rng, self.local_scale, self.local_blur_prob, 0.0) for _ in range(self.local_views)]
        s = self.view_size
        return {"global_clean": _stack([c for c, _ in g], s), "global_aug": _stack([a for _, a in g], s),
                "local_clean": _stack([c for c, _ in loc], s), "local_aug": _stack([a for _, a in loc], s),
                "label": element["label"]}


class SameIdentityViews(grain.transforms.RandomMap):
    """`augment`'s views of a record, the last floor(n/2) of each view stack ('global*' [G, ...], 'local*'
    [L, ...]: view 2 of 2 global views) made from another image of the same identity, drawn at random.

    A diagnostic, not self-supervision: it reads the labels (`data.ssl_positives='identity'`), to ask
    what the SSL loss learns when its positive views carry identity rather than one image's crops.
    Records need 'source_index' (their index in `source`, before shuffling); an identity with a single
    image keeps its own views.
    """

    def __init__(self, augment: grain.transforms.RandomMap, source):
        self.augment, self.source = augment, source
        labels = np.asarray(source.labels)
        order = np.argsort(labels, kind="stable")
        starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
        self.by_label = {int(labels[order[a]]): order[a:b]
                         for a, b in zip(starts, np.r_[starts[1:], len(order)])}

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        own = self.augment.random_map(element, rng)
        same = self.by_label[int(element["label"])]
        others = same[same != int(element["source_index"])]
        if len(others) == 0:
            return own
        partner = self.augment.random_map(self.source[int(others[rng.integers(len(others))])], rng)
        for key, views in own.items():
            if key.startswith(("global", "local")):
                n = views.shape[0]
                views[n - n // 2:] = partner[key][n - n // 2:]
        return own


class EvalPrepare(grain.transforms.Map):
    """{'image', 'label', 'index', 'valid'} -> the image resized to S (bilinear), plus 'image_flip' if `flip`."""

    def __init__(self, image_size: int, flip: bool = False):
        self.image_size, self.flip = int(image_size), bool(flip)

    def map(self, element: dict) -> dict:
        image = element["image"]
        if image.shape[:2] != (self.image_size, self.image_size):
            image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), T.BILINEAR))
        out = {**element, "image": image}
        if self.flip:
            out["image_flip"] = image[:, ::-1]
        return out
