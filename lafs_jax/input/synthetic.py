"""Generated face-like images and data sets, for tests and the input benchmark (no real data needed).

Each identity has its own colour and blob layout, each image a small random shift and noise, so the
images are smooth like aligned faces (JPEG sizes and decode times are realistic: about 3-5 KB at
112 px) and identities differ.
"""
from __future__ import annotations

import numpy as np

from lafs_jax.input import images as image_lib
from lafs_jax.input import writers


def face_like_image(identity: int, index: int, size: int = 112, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3]: a smooth picture that depends on (identity, index, seed)."""
    id_rng = np.random.default_rng([seed, identity])
    rng = np.random.default_rng([seed, identity, index + 1])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = id_rng.uniform(40, 200, size=3).astype(np.float32)
    img = base + 40 * (yy[..., None] - 0.5) * id_rng.uniform(-1, 1, size=3).astype(np.float32)
    shift = rng.normal(0, 0.03, size=2)
    for _ in range(4):  # "eyes", "nose", "mouth"-like blobs at identity-specific places
        cy, cx = id_rng.uniform(0.25, 0.8, size=2) + shift
        r = id_rng.uniform(0.05, 0.15)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * id_rng.uniform(-90, 90, size=3).astype(np.float32)
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_rec(prefix: str, num_classes: int, per_class: int, size: int = 112, fmt: str = "JPEG",
                        seed: int = 0) -> list[list[np.ndarray]]:
    """An InsightFace-layout prefix.rec/.idx of generated images; returns the images [class][i]."""
    images = [[face_like_image(c, i, size, seed) for i in range(per_class)] for c in range(num_classes)]
    writers.write_face_rec(prefix, [per_class] * num_classes,
                           (image_lib.encode_image(im, fmt) for cls in images for im in cls))
    return images
