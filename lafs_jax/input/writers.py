"""Writers of face data sets: InsightFace-layout .rec/.idx and ArrayRecord (with a labels sidecar).

The InsightFace layout (read back by sources.FaceRecordSource) is written in key order, so even a
reader without the .idx (a sequential scan) numbers the records right:

    key 0               header: flag 2, label [id_lo, id_hi]
    keys 1..id_lo-1     image records: label = class, id = key, then the encoded image
    keys id_lo..id_hi-1 identity records: label [img_lo, img_hi) of that class's image records
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import numpy as np

from lafs_jax.input import recordio
from lafs_jax.input.sources import ARRAYRECORD_LABELS_SUFFIX


def write_face_rec(prefix: str, counts: Sequence[int], images: Iterable[bytes],
                   progress: Callable[[int], None] | None = None) -> dict:
    """Write prefix.rec / prefix.idx in InsightFace layout.

    Args:
      counts: number of images of each identity, in class order (class c has counts[c] images).
      images: the encoded images, identity by identity (sum(counts) of them).
      progress: called with 1 after each image (e.g. a tqdm bar's update).
    Returns {'num_images', 'num_classes'}.
    """
    counts = [int(c) for c in counts]
    if any(c < 1 for c in counts):
        raise ValueError(f"{prefix}: identity {next(i for i, c in enumerate(counts) if c < 1)} has no images")
    num_images = sum(counts)
    id_lo = num_images + 1
    id_hi = id_lo + len(counts)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with recordio.RecordWriter(prefix + ".rec", prefix + ".idx") as w:
        w.write(0, recordio.pack((2, [float(id_lo), float(id_hi)], 0, 0), b""))
        key = 1
        labels = np.repeat(np.arange(len(counts)), counts)
        for image in images:
            if key > num_images:
                raise ValueError(f"{prefix}: more images than the {num_images} the counts announce")
            w.write(key, recordio.pack((0, float(labels[key - 1]), key, 0), image))
            key += 1
            if progress is not None:
                progress(1)
        if key != id_lo:
            raise ValueError(f"{prefix}: {key - 1} images written but the counts announce {num_images}")
        start = 1
        for cls, c in enumerate(counts):
            w.write(id_lo + cls, recordio.pack((2, [float(start), float(start + c)], 0, 0), b""))
            start += c
    return {"num_images": num_images, "num_classes": len(counts)}


def write_property(directory: str, num_classes: int, height: int, width: int) -> str:
    """The InsightFace `property` file ('num_classes,H,W') in `directory`; returns its path."""
    path = os.path.join(directory, "property")
    with open(path, "w") as f:
        f.write(f"{num_classes},{height},{width}\n")
    return path


def rec_to_arrayrecord(source, out_path: str, progress: Callable[[int], None] | None = None) -> dict:
    """Copy the images of a FaceRecordSource into one ArrayRecord file (+ FILE.labels.npz).

    Each ArrayRecord record is recordio.pack(IRHeader(0, label, original key, 0), image bytes): the
    image bytes are copied, not re-encoded. Returns {'num_images', 'num_classes'}.
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = ArrayRecordWriter(os.fspath(out_path), "group_size:1")
    keys, labels = source.keys, source.labels
    try:
        for i in range(len(source)):
            _, payload = source.record(i)
            writer.write(recordio.pack((0, float(labels[i]), int(keys[i]), 0), payload))
            if progress is not None:
                progress(1)
    finally:
        writer.close()
    np.savez(out_path + ARRAYRECORD_LABELS_SUFFIX, labels=np.asarray(labels, np.int64),
             num_classes=np.int64(source.num_classes))
    return {"num_images": len(source), "num_classes": int(source.num_classes)}
