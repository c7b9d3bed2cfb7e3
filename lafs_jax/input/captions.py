"""Image-caption pairs on disk: the ArrayRecord record format, its Grain source, img2dataset shards.

Record (one ArrayRecord record per pair): b'LJIT', little-endian uint32 caption bytes, uint32 key bytes,
int64 label (-1 = none), the UTF-8 caption, the UTF-8 key, then the encoded image (JPEG / PNG bytes,
copied, never re-encoded). `pack_pair` / `unpack_pair`; `write_pairs(pairs, out)` writes a file and
its `.labels.npz` sidecar.

`ImageCaptionSource(paths)` (format 'image_text' of `pipelines.make_source`): `src[i] -> {'image': uint8
[H, W, 3] RGB, 'label': int, 'caption': str}` with the face sources' undecodable-image policy.

`read_webdataset(tar_paths)` yields (shard, key, image bytes, caption) from img2dataset's webdataset
shards (KEY.jpg|png|webp + KEY.txt (+ KEY.json, ignored)); a key with only one half, an empty or
non-UTF-8 caption is a DataSourceError naming the shard and the key.

`ParquetPairs(parquet_paths, image_root, key_column, caption_column)` yields (file, key,
image bytes, caption) from caption tables (parquet: one row per pair, as img2dataset's per-shard
`.parquet` with `--output_format files` writes them) and a folder of images found by key (ROOT/**/KEY.jpg
|.jpeg|.png|.webp, any depth, e.g. img2dataset's ROOT/00000/000000012.jpg). Rows with a `status` column
other than 'success' (img2dataset's failed downloads) are skipped and counted in `skipped`. A missing
column, a row whose image is not in the folder, an empty or null caption, a key found twice in the
folder: a DataSourceError naming the file, the row and the key.
"""
from __future__ import annotations

import os
import struct
import tarfile
from typing import Iterable, Iterator

import grain
import numpy as np
import pyarrow.parquet as pq

from lafs_jax.input import sources as S

MAGIC = b"LJIT"
_HEADER = struct.Struct("<IIq")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def pack_pair(image: bytes, caption: str, label: int = -1, key: str = "") -> bytes:
    """One record of the format in the module docstring."""
    cap, k = caption.encode("utf-8"), key.encode("utf-8")
    return MAGIC + _HEADER.pack(len(cap), len(k), int(label)) + cap + k + bytes(image)


def unpack_pair(record: bytes, where: str) -> tuple[bytes, str, int, str]:
    """(image bytes, caption, label, key) of a record; DataSourceError naming `where` otherwise."""
    if record[:4] != MAGIC or len(record) < 4 + _HEADER.size:
        raise S.DataSourceError(f"{where}: not an image-caption record (written by `python -m data.prepare "
                                f"captions`)")
    n_cap, n_key, label = _HEADER.unpack_from(record, 4)
    start = 4 + _HEADER.size
    cap = record[start:start + n_cap].decode("utf-8")
    key = record[start + n_cap:start + n_cap + n_key].decode("utf-8")
    return record[start + n_cap + n_key:], cap, int(label), key


def write_pairs(pairs: Iterable[tuple[bytes, str, int, str]], out_path: str) -> dict:
    """Write (image bytes, caption, label, key) pairs to one ArrayRecord file + sidecar; {'num_pairs', 'num_classes'}."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = ArrayRecordWriter(os.fspath(out_path), "group_size:1")
    labels = []
    try:
        for image, caption, label, key in pairs:
            writer.write(pack_pair(image, caption, label, key))
            labels.append(int(label))
    finally:
        writer.close()
    labels = np.asarray(labels, np.int64)
    classes = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    np.savez(out_path + S.ARRAYRECORD_LABELS_SUFFIX, labels=labels, num_classes=np.int64(classes))
    return {"num_pairs": int(len(labels)), "num_classes": classes}


def read_webdataset(tar_paths: Iterable[str]) -> Iterator[tuple[str, str, bytes, str]]:
    """(shard, key, image bytes, caption) of img2dataset webdataset shards, in shard and key order."""
    for path in tar_paths:
        images, captions = {}, {}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, ext = os.path.splitext(member.name)
                ext = ext.lower()
                if ext in IMAGE_SUFFIXES:
                    images[key] = tar.extractfile(member).read()
                elif ext == ".txt":
                    captions[key] = tar.extractfile(member).read()
        for key in sorted(set(images) | set(captions)):
            if key not in captions or key not in images:
                half = "caption (.txt)" if key not in captions else "image (.jpg/.png/.webp)"
                raise S.DataSourceError(f"{path}: key {key!r} has no {half}: every pair needs both halves")
            try:
                caption = captions[key].decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise S.DataSourceError(f"{path}: {key}.txt is not UTF-8 text ({e})") from None
            if not caption:
                raise S.DataSourceError(f"{path}: {key}.txt is an empty caption")
            yield path, key, images[key], caption


def image_index(root: str) -> dict[str, str]:
    """{file stem: path} of the images under `root` (any depth); a stem found twice is a DataSourceError."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    index: dict[str, str] = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_SUFFIXES:
                continue
            path = os.path.join(dirpath, name)
            if stem in index:
                raise S.DataSourceError(f"{root}: image key {stem!r} found twice ({index[stem]} and {path})")
            index[stem] = path
    return index


class ParquetPairs:
    """Iterable of (file, key, image bytes, caption) over caption tables + an image folder (module
    docstring); `skipped` counts the rows whose `status` is not 'success' once iterated."""

    def __init__(self, parquet_paths: Iterable[str], image_root: str, key_column: str = "key",
                 caption_column: str = "caption"):
        self.paths, self.root = list(parquet_paths), image_root
        self.key_column, self.caption_column = key_column, caption_column
        self.images = image_index(image_root)
        self.skipped = 0

    def __iter__(self) -> Iterator[tuple[str, str, bytes, str]]:
        for path in self.paths:
            names = pq.read_schema(path).names
            for column in (self.key_column, self.caption_column):
                if column not in names:
                    raise S.DataSourceError(f"{path}: no column {column!r} (columns {names}); choose it with "
                                            "--key-column / --caption-column")
            columns = [self.key_column, self.caption_column] + (["status"] if "status" in names else [])
            table = pq.read_table(path, columns=columns).to_pydict()
            statuses = table.get("status")
            for row, (key, caption) in enumerate(zip(table[self.key_column], table[self.caption_column])):
                if statuses is not None and statuses[row] != "success":
                    self.skipped += 1
                    continue
                key = str(key)
                if caption is None or not str(caption).strip():
                    raise S.DataSourceError(f"{path}: row {row} (key {key!r}) has an empty caption")
                if key not in self.images:
                    raise S.DataSourceError(f"{path}: row {row} (key {key!r}): no image {key}.jpg/.jpeg/.png/.webp "
                                            f"under {self.root}")
                with open(self.images[key], "rb") as f:
                    yield path, key, f.read(), str(caption).strip()


class ImageCaptionSource(S.FaceSource):
    """Image-caption pairs in ArrayRecord files (see the module docstring)."""

    def __init__(self, paths: str | list[str], color_order: str = "rgb", skip_undecodable: bool = False,
                 max_skip_fraction: float = 0.01):
        super().__init__(color_order, skip_undecodable, max_skip_fraction)
        self.paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"image-caption ArrayRecord file not found: {p}")
        self.reader = grain.sources.ArrayRecordDataSource(self.paths)
        sidecars = [p + S.ARRAYRECORD_LABELS_SUFFIX for p in self.paths]
        if all(os.path.isfile(s) for s in sidecars):
            self._labels = np.concatenate([np.load(s)["labels"].astype(np.int64) for s in sidecars])
        else:
            self._labels = np.asarray([unpack_pair(self.reader[i], self.describe(i))[2]
                                       for i in range(len(self.reader))], np.int64)
        if len(self._labels) != len(self.reader):
            raise S.DataSourceError(f"{sidecars[0]}: {len(self._labels)} labels for {len(self.reader)} records")
        self.num_classes = int(self._labels.max()) + 1 if len(self._labels) else 0

    def __len__(self) -> int:
        return len(self.reader)

    def describe(self, index: int) -> str:
        return f"{','.join(self.paths)}: record {int(index)}"

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        image, caption, label, _ = unpack_pair(self.reader[index], self.describe(index))
        item = self._item(image, label, index)
        return None if item is None else {**item, "caption": caption}

    def __repr__(self) -> str:
        return f"ImageCaptionSource({self.paths}, {len(self)} pairs)"
