"""Training batches of image-caption pairs (FaRL): CLIP preprocessing, BPE ids and BEiT masks per record.

`image_text_batches(source, dc, *, batch_size, seed, grid, num_masked, min_block, context_length)` over an
`input.captions.ImageCaptionSource`: Grain batches `{'image': f32 [B, S, S, 3] (dc.normalization),
'text': int32 [B, context_length] (CLIP BPE ids), 'mask': bool [B, grid * grid] (BEiT blockwise,
row-major patches), 'truncated': bool [B] (the caption was cut to context_length), 'label': int32 [B]}`;
images centre-cropped to a square and resized to S = dc.image_size (Pillow bicubic, CLIP's
preprocessing), horizontally flipped with probability 0.5 when `flip` (off by default: neither CLIP nor
FaRL's known settings flip). Host augmentation only (`dc.augment_on = 'host'`).
"""
from __future__ import annotations

import grain
import numpy as np
from PIL import Image

from lafs_jax.input import masking
from lafs_jax.input import pipelines
from lafs_jax.input import tokenizer as tok_lib
from lafs_jax.input import transforms as T


def center_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the centred square crop of the short side, resized bicubically (Pillow)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = image[top:top + s, left:left + s]
    if s == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


class ImageTextAugment(grain.transforms.RandomMap):
    """Record -> {'image' uint8 [S, S, 3], 'text', 'truncated', 'mask', 'label'} (per-record rng)."""

    def __init__(self, image_size: int, masker: masking.BlockMasking, context_length: int, flip: bool = False):
        self.image_size, self.masker, self.context_length, self.flip = int(image_size), masker, context_length, flip

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = center_square(element["image"], self.image_size)
        if self.flip and rng.uniform() < 0.5:
            image = image[:, ::-1]
        ids, truncated = tok_lib.default_tokenizer().tokenize([element["caption"]], self.context_length)
        return {"image": image, "text": ids[0], "truncated": bool(truncated[0]),
                "mask": self.masker(rng).reshape(-1), "label": int(element["label"])}


class ImageTextCollate:
    """Records -> the batch of the module docstring (images normalised here, on the host)."""

    def __init__(self, normalization: str):
        self.normalization = normalization

    def __call__(self, records) -> dict:
        return {"image": T.normalize(np.stack([r["image"] for r in records]), self.normalization),
                "text": np.stack([r["text"] for r in records]).astype(np.int32),
                "mask": np.stack([r["mask"] for r in records]),
                "truncated": np.asarray([r["truncated"] for r in records], bool),
                "label": np.asarray([r["label"] for r in records], np.int32)}


def image_text_batches(source, dc, *, batch_size: int, seed: int, grid: int, num_masked: int, min_block: int,
                       context_length: int = tok_lib.CONTEXT_LENGTH, flip: bool = False,
                       num_epochs: int | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
    """The training batches of the module docstring (per process; `num_epochs` None repeats forever)."""
    augment = ImageTextAugment(dc.image_size, masking.BlockMasking(grid, num_masked, min_block), context_length, flip)
    return pipelines._train_iterator(source, dc, augment, ImageTextCollate(dc.normalization),  # noqa: SLF001
                                     batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                                     process_index=process_index, process_count=process_count)
