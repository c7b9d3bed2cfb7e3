"""Verification pair sets in InsightFace's `.bin` format (LFW, CFP-FP, AgeDB-30, ...).

A `.bin` is a pickle of `(bins, issame_list)`: `bins` holds 2N encoded images (pair k is
bins[2k], bins[2k+1]) and `issame_list` N booleans. Files written under Python 2 hold byte strings,
so they are loaded with encoding='bytes' (InsightFace `eval/verification.py`).

A pickle can name any importable callable and call it while it loads, so a downloaded `.bin` is
read with `BinUnpickler`, which resolves only the globals these files use (`ALLOWED_GLOBALS`: the
builtin containers and scalars, `_codecs.encode` that Python 3 writes for bytes at protocol < 3,
and numpy's array / scalar reconstruction) and refuses every other one before it is imported.
"""
from __future__ import annotations

import os
import pickle
from typing import Callable, Sequence

import numpy as np

from lafs_jax.input import images as image_lib


class VerificationBinError(ValueError):
    """A .bin file is not a (images, issame) pickle; the message names the file (and image index)."""


# (module, name) pairs a .bin may reference, under Python 3 and Python 2 (`__builtin__`) and numpy 1
# (`numpy.core`) and 2 (`numpy._core`) names.
_BUILTINS = ("list", "tuple", "bytes", "str", "bool", "int", "float")
_NUMPY = (("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "scalar"))
ALLOWED_GLOBALS = frozenset({(m, n) for m in ("builtins", "__builtin__") for n in _BUILTINS}
                            | {("_codecs", "encode")} | set(_NUMPY))


class BinUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only ALLOWED_GLOBALS; anything else raises a
    VerificationBinError naming `path` and the refused global (nothing of it is imported or called)."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise VerificationBinError(
                f"{self.path}: refused to unpickle the global '{module}.{name}': a verification .bin holds only "
                "lists of encoded images and booleans (lafs_jax.input.verification_bin.ALLOWED_GLOBALS)")
        return super().find_class(module, name)


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    return (int(image_size), int(image_size)) if np.isscalar(image_size) else (int(image_size[0]), int(image_size[1]))


def load_bin(path: str, image_size: int | Sequence[int] = 112, color_order: str = "rgb",
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [2N, H, W, 3] RGB, issame bool [N]) of a .bin file.

    Images of another size are resized to `image_size` (int or (H, W)) with bilinear filtering.
    `color_order` 'bgr' swaps the channels after decoding (see images.apply_color_order).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin not found: {path}")
    with open(path, "rb") as f:
        try:
            content = BinUnpickler(f, path).load()
        except VerificationBinError:
            raise
        except Exception as e:
            raise VerificationBinError(f"{path}: not a pickled (images, issame) .bin file: {e}") from e
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise VerificationBinError(f"{path}: expected a pickled pair (images, issame), got {type(content).__name__}")
    bins, issame = content
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(bins) != 2 * len(issame):
        raise VerificationBinError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    size = _size(image_size)
    out = np.empty((len(bins), *size, 3), np.uint8)
    for i, data in enumerate(bins):
        if isinstance(data, np.ndarray):
            data = data.tobytes()
        image = image_lib.decode_image(bytes(data), f"{path}: image {i}")
        out[i] = image_lib.resize(image_lib.apply_color_order(image, color_order), size)
        if progress is not None:
            progress(1)
    return out, issame


def save_bin(path: str, images: np.ndarray, issame: Sequence[bool], fmt: str = "JPEG", quality: int = 95) -> None:
    """Write uint8 [2N, H, W, 3] RGB images and N is-same flags as a .bin (images encoded as `fmt`)."""
    images = np.asarray(images)
    issame = [bool(s) for s in np.asarray(issame).reshape(-1)]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"save_bin({path}): images must be uint8 [2N, H, W, 3], got {images.dtype} {images.shape}")
    if len(images) != 2 * len(issame):
        raise ValueError(f"save_bin({path}): {len(images)} images for {len(issame)} pairs")
    bins = [image_lib.encode_image(im, fmt, quality) for im in images]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
