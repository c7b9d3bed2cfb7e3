"""Image bytes <-> uint8 HxWx3 RGB arrays with Pillow, and the per-dataset colour order.

Decoding goes through Pillow (libjpeg-turbo); this module only adds the error that names the record,
grey -> RGB replication and the channel swap that some .rec files need.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

COLOR_ORDERS = ("rgb", "bgr")


class UndecodableImageError(ValueError):
    """Image bytes Pillow cannot decode; the message names the file and record."""


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] RGB from encoded bytes (JPEG, PNG, PGM, ...); grey is replicated to 3 channels.

    Raises UndecodableImageError naming `where` (e.g. 'train.rec: record key 17') for bytes that are
    not a complete image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img)
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise UndecodableImageError(f"{where}: cannot decode image ({len(data)} bytes): {e}") from e


def apply_color_order(image: np.ndarray, color_order: str) -> np.ndarray:
    """RGB from decoded pixels. 'rgb': the decoded pixels are already RGB (InsightFace .rec/.bin);
    'bgr': the file was encoded from channel-swapped arrays (e.g. LAFS img2rec), so swap them back."""
    if color_order == "rgb":
        return image
    if color_order == "bgr":
        return image[..., ::-1]
    raise ValueError(f"color_order={color_order!r}; choose one of {COLOR_ORDERS}")


def encode_image(image: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    """Encoded bytes of a uint8 [H, W, 3] (or [H, W]) array; fmt 'JPEG' or 'PNG'."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"expected uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    kwargs = {"quality": quality} if fmt.upper() == "JPEG" else {}
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def resize(image: np.ndarray, size: tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
    """uint8 [h, w, 3] resized to size=(H, W) with Pillow (no-op when already that size)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: pad the short side by edge replication to a square, then resize (bilinear)."""
    h, w = image.shape[:2]
    if h != w:
        extra = abs(h - w)
        before, after = extra // 2, extra - extra // 2
        pad = ((0, 0), (before, after), (0, 0)) if w < h else ((before, after), (0, 0), (0, 0))
        image = np.pad(image, pad, mode="edge")
    return resize(image, (size, size))
