"""Grain random-access sources of face images: InsightFace .rec/.idx, ArrayRecord, image folder, TFDS.

Every source has `len()`, `source[i] -> {'image': uint8 [H, W, 3] RGB, 'label': int}`, `num_classes`,
`labels` (int [N], the label of every item, read without decoding images where the format allows)
and `describe(i)` (which file / record item i is, for error messages). With `skip_undecodable=True`
an image that does not decode gives `None` instead of an error (the pipelines drop it) and a warning
with the running count of skipped records, up to a bound: more than `max_skip_fraction` of the
last SKIP_WINDOW (1000) records read by one process (each Grain worker counts its own reads) raises
DataSourceError naming the file and the count, so a data set that is all or mostly undecodable
fails fast instead of being skipped through forever. All sources are picklable, for Grain worker
processes.

InsightFace layout (`FaceRecordSource`, InsightFace RecordIO as the official `image_iter.py` reads it): record 0 may be a header with flag > 0 and
label [id_lo, id_hi]; records id_lo..id_hi-1 are identity records whose label [img_lo, img_hi) is the
range of that identity's image records; image records are 1..id_lo-1 with the class id as label.
The class of identity record j is j - id_lo. Without a header (record 0 with flag 0, or no key 0)
every record is an image and labels come from the image headers.
"""
from __future__ import annotations

import abc
import collections
import logging
import os
import threading
from typing import Any

import numpy as np

from lafs_jax.input import images as image_lib
from lafs_jax.input import recordio

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pnm", ".webp", ".tif", ".tiff")
ARRAYRECORD_LABELS_SUFFIX = ".labels.npz"  # sidecar of an ArrayRecord file: labels[N], num_classes


SKIP_WINDOW = 1000  # reads of one process that max_skip_fraction is measured over


class DataSourceError(ValueError):
    """A data set on disk is not in the expected layout; the message names the file or folder."""


class SkipBudget:
    """How many of the last `window` reads of this process were skipped as undecodable (thread-safe).

    `record(skipped)` returns the skips in the window once they exceed max_fraction x window, else
    None. Pickles (into a Grain worker) with an empty window: each process counts its own reads.
    """

    def __init__(self, max_fraction: float, window: int = SKIP_WINDOW):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction={max_fraction!r}: must be in [0, 1]")
        self.max_fraction, self.window = float(max_fraction), int(window)
        self.limit = int(self.max_fraction * self.window)  # skips allowed among `window` reads
        self._reset()

    def _reset(self) -> None:
        self._recent: collections.deque = collections.deque(maxlen=self.window)
        self._skips = 0
        self._lock = threading.Lock()

    def record(self, skipped: bool) -> tuple[int, int] | None:
        """Count one read; (skips, reads) in the window when the skips exceed the limit, else None."""
        with self._lock:
            if len(self._recent) == self.window:
                self._skips -= self._recent[0]
            self._recent.append(bool(skipped))
            self._skips += bool(skipped)
            return (self._skips, len(self._recent)) if self._skips > self.limit else None

    def __getstate__(self):
        return {"max_fraction": self.max_fraction, "window": self.window, "limit": self.limit}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()


class FaceSource(abc.ABC):
    """Shared item decoding, colour order and undecodable-image policy of the face sources.

    Subclasses set `num_classes` and `_labels` (or override `labels`) and define `__len__`,
    `__getitem__` and `describe`.
    """

    def __init__(self, color_order: str = "rgb", skip_undecodable: bool = False, max_skip_fraction: float = 0.01):
        if color_order not in image_lib.COLOR_ORDERS:
            raise ValueError(f"color_order={color_order!r}; choose one of {image_lib.COLOR_ORDERS}")
        self.color_order = color_order
        self.skip_undecodable = bool(skip_undecodable)
        self.skipped = 0  # undecodable records skipped by this process
        self.skip_budget = SkipBudget(max_skip_fraction)
        self._labels: np.ndarray | None = None
        self.num_classes = 0

    @property
    def labels(self) -> np.ndarray:
        """int [N] (int32 or int64): the label of every item, in item order."""
        return self._labels

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of items."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict | None:
        """{'image': uint8 [H, W, 3] RGB, 'label': int}, or None for a skipped undecodable image."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """Which file / record item `index` is, for error messages."""

    def _item(self, data: Any, label: int, index: int) -> dict | None:
        """The item from encoded bytes (or an already decoded array), or None if skipped."""
        if isinstance(data, np.ndarray) and data.dtype == np.uint8:
            image = data if data.ndim == 3 else np.repeat(data[..., None], 3, axis=-1)
            if image.shape[-1] == 1:
                image = np.repeat(image, 3, axis=-1)
            if image.ndim != 3 or image.shape[-1] != 3:
                raise DataSourceError(f"{self.describe(index)}: image of shape {data.shape} is not HxWx3")
        else:
            try:
                image = image_lib.decode_image(bytes(data), self.describe(index))
            except image_lib.UndecodableImageError as e:
                if not self.skip_undecodable:
                    raise
                self.skipped += 1
                over = self.skip_budget.record(True)
                if over is not None:
                    raise DataSourceError(
                        f"{self.describe(index)}: {over[0]} of the last {over[1]} records read by process "
                        f"{os.getpid()} are undecodable, more than data.max_skip_fraction="
                        f"{self.skip_budget.max_fraction:g} of a {self.skip_budget.window}-record window "
                        f"({self.skip_budget.limit} allowed; {self.skipped} skipped in all); the data set looks "
                        f"broken (or raise data.max_skip_fraction)") from e
                log.warning("skipping undecodable image (%s); %d undecodable records skipped so far in "
                            "process %d", self.describe(index), self.skipped, os.getpid())
                return None
            if self.skip_undecodable:
                self.skip_budget.record(False)
        return {"image": image_lib.apply_color_order(image, self.color_order), "label": int(label)}


def resolve_rec_prefix(prefix: str) -> tuple[str, str]:
    """(rec_path, idx_path) from 'dir/train', 'dir/train.rec' or a directory holding train.rec."""
    prefix = os.fspath(prefix)
    if os.path.isdir(prefix):
        prefix = os.path.join(prefix, "train")
    elif prefix.endswith((".rec", ".idx")):
        prefix = prefix[:-4]
    return prefix + ".rec", prefix + ".idx"


class FaceRecordSource(FaceSource):
    """Images and labels of an InsightFace RecordIO data set (`prefix.rec` + `prefix.idx`).

    Args:
      prefix: 'dir/train' (or 'dir/train.rec', or 'dir' holding train.rec).
      color_order: 'rgb' or 'bgr' (see images.apply_color_order).
      skip_undecodable: give None (and log) for undecodable images instead of raising.
      max_skip_fraction: with skip_undecodable, raise DataSourceError once more than this fraction of
        the last SKIP_WINDOW reads of the process were skipped.
    Attributes: `keys` (int64 [N], the image record keys), `labels` (int32 [N]), `num_classes`,
      `identity_layout` (True when record 0 is a header with identity records).
    The per-image index is kept small (it is pickled into every Grain worker): the usual contiguous
    image keys are not stored, labels are int32, offsets int64 (12 bytes per image in all).
    """

    def __init__(self, prefix: str, color_order: str = "rgb", skip_undecodable: bool = False,
                 max_skip_fraction: float = 0.01):
        super().__init__(color_order, skip_undecodable, max_skip_fraction)
        rec_path, idx_path = resolve_rec_prefix(prefix)
        if not os.path.isfile(idx_path):
            raise FileNotFoundError(f"RecordIO index not found: {idx_path} (next to {rec_path}); "
                                    f"rebuild it with RecordFile(rec).keys() or mxnet's im2rec")
        self.file = recordio.RecordFile(rec_path, idx_path)
        self.rec_path = rec_path
        if len(self.file) == 0:
            raise DataSourceError(f"{rec_path}: the RecordIO file has no records")
        self.identity_layout = False
        self._keys: np.ndarray | None = None  # None: image keys are _key_start, _key_start + 1, ...
        self._key_start = 1
        header0 = self.file.read_header(0) if 0 in self.file else None
        if header0 is not None and header0.flag > 0:
            self._labels, self.num_classes = self._identity_layout(header0)
        else:
            keys = self.file.keys()
            self._key_start = int(keys[0])
            if not np.array_equal(keys, np.arange(self._key_start, self._key_start + len(keys))):
                self._keys = keys.copy()
            self._labels = self._labels_from_image_headers(keys)
            self.num_classes = int(self._labels.max()) + 1
        if len(self._labels) == 0:
            raise DataSourceError(f"{rec_path}: no image records (header record 0 says id range "
                                  f"{header0.label if header0 is not None else None})")

    @property
    def keys(self) -> np.ndarray:
        """int64 [N]: the record key of every item."""
        if self._keys is None:
            return np.arange(self._key_start, self._key_start + len(self._labels), dtype=np.int64)
        return self._keys

    def _key(self, index: int) -> int:
        return self._key_start + index if self._keys is None else int(self._keys[index])

    def _identity_layout(self, header0: recordio.IRHeader) -> tuple[np.ndarray, int]:
        if header0.flag < 2:
            raise DataSourceError(f"{self.rec_path}: record key 0 is a header with {header0.flag} label(s); "
                                  f"expected [id_lo, id_hi]")
        id_lo, id_hi = int(header0.label[0]), int(header0.label[1])
        if not 1 <= id_lo <= id_hi:
            raise DataSourceError(f"{self.rec_path}: record key 0: identity range [{id_lo}, {id_hi}) is invalid")
        missing = [k for k in (1, id_lo - 1) if id_lo > 1 and k not in self.file]
        if missing:
            raise DataSourceError(f"{self.rec_path}: record key {missing[0]} (an image record by the header's "
                                  f"range 1..{id_lo - 1}) is not in the .idx")
        if id_hi == id_lo:  # header without identity records: labels from the image headers
            labels = self._labels_from_image_headers(np.arange(1, id_lo, dtype=np.int64))
            return labels, int(labels.max()) + 1 if len(labels) else 0
        self.identity_layout = True
        ranges = self._identity_ranges_fast(id_lo, id_hi)
        lo, hi = ranges if ranges is not None else self._identity_ranges(id_lo, id_hi)
        bad = np.nonzero(~((1 <= lo) & (lo <= hi) & (hi <= id_lo)))[0]
        if bad.size:
            j = int(bad[0])
            raise DataSourceError(f"{self.rec_path}: identity record key {id_lo + j}: image range [{lo[j]}, {hi[j]}) "
                                  f"is outside the image records 1..{id_lo - 1}")
        counts = hi - lo
        labels = np.repeat(np.arange(len(lo), dtype=np.int32), counts)
        if not (lo[0] == 1 and np.array_equal(lo[1:], hi[:-1]) and hi[-1] == id_lo):
            starts = np.cumsum(counts) - counts
            self._keys = np.repeat(lo - starts, counts) + np.arange(len(labels), dtype=np.int64)
        self._check_labels_match_headers(labels)
        return labels, id_hi - id_lo

    def _identity_ranges(self, id_lo: int, id_hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(img_lo, img_hi) int64 arrays of the identity records, one header read each."""
        lo, hi = np.empty(id_hi - id_lo, np.int64), np.empty(id_hi - id_lo, np.int64)
        for j, id_key in enumerate(range(id_lo, id_hi)):
            if id_key not in self.file:
                raise DataSourceError(f"{self.rec_path}: identity record key {id_key} is not in the .idx")
            h = self.file.read_header(id_key)
            if h.flag < 2:
                raise DataSourceError(f"{self.rec_path}: identity record key {id_key} has no [img_lo, img_hi) "
                                      f"label (flag {h.flag})")
            lo[j], hi[j] = int(h.label[0]), int(h.label[1])
        return lo, hi

    _IDENTITY_RECORD = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                                 ("id", "<u8"), ("id2", "<u8"), ("lo", "<f4"), ("hi", "<f4")])  # 40 bytes

    def _identity_ranges_fast(self, id_lo: int, id_hi: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The identity ranges in one read when the identity records are the usual consecutive
        40-byte chunks (flag 2, no split); None otherwise (then `_identity_ranges` reads them one by one)."""
        n = id_hi - id_lo
        size = self._IDENTITY_RECORD.itemsize
        offsets = self.file.offsets_of(np.arange(id_lo, id_hi))
        if offsets is None or not np.array_equal(offsets, offsets[0] + size * np.arange(n)):
            return None
        if offsets[0] + size * n > self.file.file_size:
            return None
        with open(self.rec_path, "rb") as f:
            f.seek(int(offsets[0]))
            records = np.frombuffer(f.read(size * n), self._IDENTITY_RECORD)
        if not (np.all(records["magic"] == recordio.MAGIC) and np.all(records["lrec"] == 32)
                and np.all(records["flag"] == 2)):
            return None
        return records["lo"].astype(np.int64), records["hi"].astype(np.int64)

    def _labels_from_image_headers(self, keys: np.ndarray) -> np.ndarray:
        labels = np.empty(len(keys), np.int64)
        for i, key in enumerate(keys):
            labels[i] = int(recordio.scalar_label(self.file.read_header(key)))
        if len(labels) and labels.min() < 0:
            bad = int(np.argmin(labels))
            raise DataSourceError(f"{self.rec_path}: record key {keys[bad]} has negative label {labels[bad]}")
        return labels.astype(np.int32)

    def _check_labels_match_headers(self, labels: np.ndarray) -> None:
        """The identity ranges and the image headers must agree; checked on a few records, cheaply."""
        for i in sorted({0, len(labels) // 2, len(labels) - 1}):
            own = int(recordio.scalar_label(self.file.read_header(self._key(i))))
            if own != labels[i]:
                raise DataSourceError(f"{self.rec_path}: record key {self._key(i)} has label {own} in its header "
                                      f"but lies in the image range of class {labels[i]}")

    def __len__(self) -> int:
        return len(self._labels)

    def describe(self, index: int) -> str:
        return f"{self.rec_path}: record key {self._key(int(index))}"

    def record(self, index: int) -> tuple[recordio.IRHeader, bytes]:
        """(IRHeader, encoded image bytes) of item `index`, undecoded."""
        return recordio.unpack(self.file.read(self._key(int(index))), self.describe(index))

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        _, payload = self.record(index)
        return self._item(payload, self._labels[index], index)

    def __repr__(self) -> str:
        return (f"FaceRecordSource({self.rec_path!r}, {len(self)} images, {self.num_classes} classes, "
                f"color_order={self.color_order!r})")


class ArrayRecordFaceSource(FaceSource):
    """Face images in ArrayRecord files whose records are RecordIO-packed (IRHeader + image bytes).

    `python -m data.prepare to-arrayrecord` writes them, with a sidecar `FILE.labels.npz` (labels,
    num_classes) so labels are known without reading every record; without the sidecar the labels
    are read from every record's header once (slow for large sets).
    """

    def __init__(self, paths: str | list[str], color_order: str = "rgb", skip_undecodable: bool = False,
                 max_skip_fraction: float = 0.01):
        super().__init__(color_order, skip_undecodable, max_skip_fraction)
        import grain  # pylint: disable=import-outside-toplevel

        self.paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ArrayRecord file not found: {p}")
        self.reader = grain.sources.ArrayRecordDataSource(self.paths)
        sidecars = [p + ARRAYRECORD_LABELS_SUFFIX for p in self.paths]
        if all(os.path.isfile(s) for s in sidecars):
            labels, classes = [], []
            for s in sidecars:
                with np.load(s) as z:
                    labels.append(z["labels"].astype(np.int64))
                    classes.append(int(z["num_classes"]))
            self._labels = np.concatenate(labels)
            if len(self._labels) != len(self.reader):
                raise DataSourceError(f"{sidecars[0]}: {len(self._labels)} labels for {len(self.reader)} records")
            self.num_classes = max(classes)
        else:
            log.warning("no %s sidecar next to %s: reading every record's header for the labels",
                        ARRAYRECORD_LABELS_SUFFIX, self.paths[0])
            self._labels = np.asarray([int(recordio.scalar_label(recordio.unpack(self.reader[i], self.describe(i))[0]))
                                       for i in range(len(self.reader))], np.int64)
            self.num_classes = int(self._labels.max()) + 1 if len(self._labels) else 0

    def __len__(self) -> int:
        return len(self.reader)

    def describe(self, index: int) -> str:
        return f"{','.join(self.paths)}: record {int(index)}"

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        _, payload = recordio.unpack(self.reader[index], self.describe(index))
        return self._item(payload, self._labels[index], index)


class ImageFolderSource(FaceSource):
    """root/<identity>/<image> files; identities are the sorted sub-folder names, labels 0..C-1."""

    def __init__(self, root: str, color_order: str = "rgb", skip_undecodable: bool = False,
                 max_skip_fraction: float = 0.01):
        super().__init__(color_order, skip_undecodable, max_skip_fraction)
        self.root = os.fspath(root)
        self.files, labels, self.class_names = list_image_folder(self.root)
        self._labels = np.asarray(labels, np.int64)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return os.path.join(self.root, self.files[index])

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        with open(os.path.join(self.root, self.files[index]), "rb") as f:
            data = f.read()
        return self._item(data, self._labels[index], index)


def list_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(relative file paths, labels, class names) of root/<identity>/<image>, sorted.

    Raises FileNotFoundError for a missing root and DataSourceError for a root without identity
    folders or an identity folder without images (naming it).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataSourceError(f"{root}: no identity sub-folders (expected root/<identity>/<image files>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in os.listdir(os.path.join(root, name))
                       if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(root, name, f)))
        if not found:
            raise DataSourceError(f"{os.path.join(root, name)}: identity folder has no images "
                                  f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        files += [os.path.join(name, f) for f in found]
        labels += [label] * len(found)
    return files, labels, classes


class TfdsSource(FaceSource):
    """A `tfds.data_source` data set (ArrayRecord-backed TFDS build) with an image and a label feature.

    The image feature may come decoded (uint8 array) or as encoded bytes (decoded with Pillow).
    `num_classes` comes from a ClassLabel feature, else from the largest label. `labels` reads every
    example once, on first use (subsets need it).
    """

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label", color_order: str = "rgb", skip_undecodable: bool = False,
                 max_skip_fraction: float = 0.01):
        super().__init__(color_order, skip_undecodable, max_skip_fraction)
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        self.name, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        self.data_dir = data_dir or None
        self.ds = tfds.data_source(name, split=split, data_dir=self.data_dir, download=False)
        features = self.ds.dataset_info.features
        for key in (image_key, label_key):
            if key not in features.keys():
                raise DataSourceError(f"tfds dataset {name!r}: no feature {key!r} (has {sorted(features.keys())})")
        num_classes = getattr(features[label_key], "num_classes", None)
        self.num_classes = int(num_classes) if num_classes else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.ds)

    def describe(self, index: int) -> str:
        return f"tfds {self.name}[{self.split}]: example {int(index)}"

    def __getstate__(self):
        # the TFDS source may hold its builder class, which need not be importable in a worker:
        # pickle the arguments and open the data set again there
        state = self.__dict__.copy()
        del state["ds"]
        return state

    def __setstate__(self, state):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        self.__dict__.update(state)
        self.ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:  # every example is read once (images included): TFDS has no label index
            self._labels = np.asarray([int(self.ds[i][self.label_key]) for i in range(len(self.ds))], np.int64)
        return self._labels

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        example = self.ds[index]
        return self._item(example[self.image_key], example[self.label_key], index)
