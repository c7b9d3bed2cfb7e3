"""Training batches of image-caption pairs (FaRL): CLIP preprocessing, BPE ids and BEiT masks per record.

`image_text_batches(source, dc, *, batch_size, seed, grid, num_masked, min_block, context_length)` over an
`input.captions.ImageCaptionSource`: Grain batches `{'image': f32 [B, S, S, 3] (dc.normalization),
'text': int32 [B, context_length] (CLIP BPE ids), 'mask': bool [B, grid * grid] (BEiT blockwise,
row-major patches), 'truncated': bool [B] (the caption was cut to context_length), 'label': int32 [B]}`;
images cropped and resized to S = dc.image_size with Pillow's bicubic: `crop_scale` None = the centred
square of the short side (CLIP's preprocessing), (lo, hi) = a random resized crop (area fraction
U(lo, hi), aspect ratio log-uniform in [3/4, 4/3]: torchvision's RandomResizedCrop, as open_clip trains
CLIP with scale (0.9, 1.0); FaRL's own training transform is unpublished); then horizontally flipped with
probability 0.5 when `flip` (off by default: neither CLIP, open_clip nor FaRL's known settings flip).

With `dc.augment_on = 'device'` the host only decodes, tokenises and masks: `{'image': uint8 [B, H, W,
3] as decoded (one size per batch: img2dataset's fixed --image_size; `dc.image_size` is that side for the
ahead-of-time shapes), 'index': int32 [B] (the record's global stream position), 'text', 'mask',
'truncated', 'label'}`, and `device_views` (inside the jitted step) crops, resizes to the model's side
(`input.pixel_ops.resized_crop`, Pillow's bicubic arithmetic), flips and normalises, drawing each
sample's crop and flip from fold_in(key, index): the same views on any device count and after a resume. The device's centred crop resizes with the crop box inside the whole image (Pillow's
`resize(box=...)`), the host's resizes the cut-out square: border pixels may differ by a few levels.
"""
from __future__ import annotations

from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from lafs_jax.input import device_augment as DA
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
    """Record -> {'image' uint8 [S, S, 3], 'text', 'truncated', 'mask', 'label'} (per-record rng); with
    `decode_only` the image stays as decoded and the record's 'index' is kept (augment_on='device')."""

    def __init__(self, image_size: int, masker: masking.BlockMasking, context_length: int, flip: bool = False,
                 crop_scale: Sequence[float] | None = None, decode_only: bool = False):
        self.image_size, self.masker, self.context_length, self.flip = int(image_size), masker, context_length, flip
        self.crop_scale = tuple(crop_scale) if crop_scale else None
        self.decode_only = decode_only

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        ids, truncated = tok_lib.default_tokenizer().tokenize([element["caption"]], self.context_length)
        out = {"text": ids[0], "truncated": bool(truncated[0]), "mask": self.masker(rng).reshape(-1),
               "label": int(element["label"])}
        if self.decode_only:
            return {**out, "image": element["image"], "index": element["index"]}
        image = element["image"]
        if self.crop_scale:
            box = T.random_resized_crop_box(rng, image.shape[0], image.shape[1], self.crop_scale)
            image = T.to_array(T.resized_crop(T.to_pil(image), box, self.image_size, Image.BICUBIC))
        else:
            image = center_square(image, self.image_size)
        if self.flip and rng.uniform() < 0.5:
            image = image[:, ::-1]
        return {**out, "image": image}


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


class DecodedImageTextCollate:
    """Records -> the decoded batch of the module docstring (augment_on='device')."""

    def __call__(self, records) -> dict:
        out = pipelines.DecodedCollate()(records)
        return {**out, "text": np.stack([r["text"] for r in records]).astype(np.int32),
                "mask": np.stack([r["mask"] for r in records]),
                "truncated": np.asarray([r["truncated"] for r in records], bool)}


def _with_index(index: int, element: dict) -> dict:
    return {**element, "index": int(index)}


def image_text_batches(source, dc, *, batch_size: int, seed: int, grid: int, num_masked: int, min_block: int,
                       context_length: int = tok_lib.CONTEXT_LENGTH, flip: bool = False,
                       crop_scale: Sequence[float] | None = None, num_epochs: int | None = None,
                       process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """The training batches of the module docstring (per process; `num_epochs` None repeats forever)."""
    device = dc.augment_on == "device"
    augment = ImageTextAugment(dc.image_size, masking.BlockMasking(grid, num_masked, min_block), context_length, flip,
                               crop_scale, decode_only=device)
    if not device:
        return pipelines._train_iterator(source, dc, augment, ImageTextCollate(dc.normalization),  # noqa: SLF001
                                         batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                                         process_index=process_index, process_count=process_count)
    # pipelines._train_iterator's order (shuffle, repeat, stream index, augment, process slice), captions kept
    pipelines.validate_data_config(dc)
    pipelines._check_batch(batch_size, source)  # noqa: SLF001
    pi, pc = pipelines._process(process_index, process_count)  # noqa: SLF001
    ds = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat(num_epochs)
    ds = ds.map_with_index(_with_index).random_map(augment)[pi::pc]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=dc.read_threads, prefetch_buffer_size=dc.read_buffer_size))
    it = it.batch(int(batch_size), drop_remainder=True, batch_fn=DecodedImageTextCollate())
    return pipelines._iterator(it, dc)  # noqa: SLF001


def device_views(dc, key: jax.Array, batch: dict, *, size: int, crop_scale: Sequence[float] | None = None,
                 flip: bool = False) -> dict:
    """The decoded batch -> the host path's batch {'image': f32 [B, size, size, 3] (dc.normalization), 'text',
    'mask', 'truncated', 'label'} inside the step (module docstring); sample b draws its crop (and flip)
    from fold_in(key, index[b])."""
    images = batch["image"].astype(jnp.float32)
    b, h, w, _ = images.shape
    keys = DA.sample_keys(key, batch["index"])
    if crop_scale:
        boxes = jax.vmap(lambda k: DA.crop_box(jax.random.fold_in(k, 0), h, w, tuple(crop_scale)))(keys)
    else:
        s = min(h, w)
        boxes = jnp.broadcast_to(jnp.asarray([(h - s) // 2, (w - s) // 2, s, s], jnp.int32), (b, 4))
    x = DA.resized_crop(images, boxes[:, None], size, "bicubic")[:, 0]
    if flip:
        x = DA.hflip(x, jax.vmap(lambda k: DA.flip_flag(jax.random.fold_in(k, 1)))(keys))
    out = {k: batch[k] for k in ("text", "mask", "truncated", "label") if k in batch}
    return {"image": T.normalize(x, dc.normalization), **out}
