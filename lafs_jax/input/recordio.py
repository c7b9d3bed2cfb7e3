"""MXNet / dmlc RecordIO (`.rec` + `.idx`) read and written without mxnet.

InsightFace ships its training sets (MS1MV3, Glint360K, WebFace4M/42M) in this format, mxnet does not
install beside numpy 2, and no maintained library reads it, so the framing is written here by hand.

On disk (little-endian), every record is one or more *chunks*:

    uint32 magic 0xCED7230A | uint32 lrec | `length` payload bytes | zero padding to a multiple of 4

with `cflag = lrec >> 29` and `length = lrec & (2**29 - 1)`. cflag 0 is a whole record; 1, 2, 3 are
the start, middle and end of a record that the writer split because the magic word occurred,
4-byte aligned, inside the payload. The magic word itself is dropped at each split point and put
back by the reader. Only the last chunk of a record is padded (the others end on a 4-byte boundary
by construction). The `.idx` file is text, one `key<TAB>byte offset` line per record, in write order.

A record's payload is `IRHeader` (struct '<IfQQ': flag, label, id, id2; 24 bytes), then, if
flag > 0, `flag` float32 labels (the scalar label field is then 0), then the image bytes.
`RecordWriter` reproduces byte for byte what MXNet's `MXIndexedRecordIO` + `recordio.pack` write.
"""
from __future__ import annotations

import numbers
import os
import struct
import warnings
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = 1 << 29  # dmlc refuses records of 2**29 bytes or more
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24 bytes


class RecordIOError(ValueError):
    """A .rec/.idx file is malformed; the message names the file, the record key and the byte offset."""


class IRHeader(NamedTuple):
    """Image-record header. `label` is a float, or a float32 array when `flag` > 0."""
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """Header + payload as one record, exactly as `mxnet.recordio.pack`.

    A scalar label forces flag 0; an array label is stored after the header, flag = its size and
    the scalar field 0.
    """
    header = IRHeader(*header)
    if isinstance(header.label, numbers.Number):
        header = header._replace(flag=0, label=float(header.label))
        prefix = b""
    else:
        labels = np.asarray(header.label, dtype="<f4").ravel()
        header = header._replace(flag=int(labels.size), label=0.0)
        prefix = labels.tobytes()
    return struct.pack(_IR_FORMAT, *header) + prefix + bytes(payload)


def unpack(record: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """(IRHeader, payload) of a record written by `pack`; `where` names the record in errors."""
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(record)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(_IR_FORMAT, record, 0)
    payload_start = IR_SIZE
    if flag > 0:
        payload_start += 4 * flag
        if len(record) < payload_start:
            raise RecordIOError(f"{where}: header says {flag} float labels but the record has only "
                                f"{len(record) - IR_SIZE} bytes after the header")
        label = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, label, id_, id2), record[payload_start:]


def scalar_label(header: IRHeader) -> float:
    """The class label as InsightFace reads it: the scalar, or the first entry of a label array."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


def _chunk_header(cflag: int, length: int) -> bytes:
    return _MAGIC_BYTES + struct.pack("<I", (cflag << 29) | length)


def frame(record: bytes) -> bytes:
    """The on-disk bytes of one record: split at aligned magic words, framed and padded (dmlc)."""
    record = bytes(record)
    size = len(record)
    if size >= MAX_RECORD_BYTES:
        raise RecordIOError(f"record of {size} bytes is too large for RecordIO (limit {MAX_RECORD_BYTES - 1})")
    out = []
    start = 0
    pos = record.find(_MAGIC_BYTES)
    while pos != -1 and pos + 4 <= size:
        if pos % 4 == 0:  # only 4-byte-aligned occurrences split the record
            out.append(_chunk_header(1 if start == 0 else 2, pos - start))
            out.append(record[start:pos])
            start = pos + 4
            pos = record.find(_MAGIC_BYTES, start)
        else:
            pos = record.find(_MAGIC_BYTES, pos + 1)
    out.append(_chunk_header(0 if start == 0 else 3, size - start))
    out.append(record[start:])
    out.append(b"\0" * (-size % 4))
    return b"".join(out)


def _read_exact(fd: int, n: int, offset: int, path: str, key, file_size: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise RecordIOError(f"{path}: record key {key}: truncated, needs {n} bytes at offset {offset} "
                            f"but the file has {file_size} bytes")
    return data


def read_framed(fd: int, offset: int, path: str, key, file_size: int) -> tuple[bytes, int]:
    """(record, offset after it) of the record whose first chunk starts at `offset` in open file `fd`."""
    parts = []
    pos = offset
    expected = (0, 1)  # cflags a record may start with
    while True:
        head = _read_exact(fd, 8, pos, path, key, file_size)
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{path}: record key {key}: bad magic 0x{magic:08X} at byte {pos} "
                                f"(expected 0x{MAGIC:08X}); is the .idx from another .rec?")
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if cflag not in expected:
            raise RecordIOError(f"{path}: record key {key}: chunk at byte {pos} has continuation flag "
                                f"{cflag}, expected one of {expected}")
        padded = (length + 3) & ~3
        body = _read_exact(fd, padded, pos + 8, path, key, file_size) if padded else b""
        parts.append(body[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts), pos
        expected = (2, 3)


def _default_idx_path(rec_path: str) -> str:
    return os.path.splitext(rec_path)[0] + ".idx"


def _parse_idx_fast(data: bytes) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Vectorised parse of a well-formed .idx (millions of lines in about a second), else (None, None).

    Well-formed: every line is 'key<TAB>offset' with no blank lines; anything else goes to the
    line-by-line parser, which names the offending line.
    """
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    num_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if data.count(b"\t") != num_lines:
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # older numpy warns (and stops) on text it cannot parse
            values = np.fromstring(data.decode("ascii", errors="replace"), dtype=np.int64, sep=" ")
    except ValueError:  # numpy 2.4 raises on text it cannot parse
        return None, None
    if values.size != 2 * num_lines:
        return None, None
    return values[0::2].copy(), values[1::2].copy()


def _parse_idx_lines(data: bytes, idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Line-by-line parse that names the first malformed line."""
    lines = data.splitlines()
    keys = np.empty(len(lines), np.int64)
    offsets = np.empty(len(lines), np.int64)
    n = 0
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            keys[n], offsets[n] = int(fields[0]), int(fields[1])
        except ValueError:
            raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got {line[:80]!r}") from None
        n += 1
    return keys[:n], offsets[:n]


def parse_idx(idx_path: str, rec_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys int64[N], offsets int64[N]) of a .idx file, in file order.

    Raises RecordIOError naming the file and line for a malformed line, and the key for an offset
    past the end of the .rec (when `rec_size` is given).
    """
    with open(idx_path, "rb") as f:
        data = f.read()
    keys, offsets = _parse_idx_fast(data)
    if keys is None:
        keys, offsets = _parse_idx_lines(data, idx_path)
    n = len(keys)
    if n and offsets.min() < 0:
        bad = int(np.argmin(offsets))
        raise RecordIOError(f"{idx_path}: record key {keys[bad]}: negative offset {offsets[bad]}")
    if rec_size is not None and n:
        bad = np.nonzero(offsets + 8 > rec_size)[0]
        if bad.size:
            i = int(bad[0])
            raise RecordIOError(f"{idx_path}: record key {keys[i]}: offset {offsets[i]} is past the end of "
                                f"the .rec ({rec_size} bytes)")
    if np.unique(keys).size != n:
        uniq, counts = np.unique(keys, return_counts=True)
        raise RecordIOError(f"{idx_path}: record key {uniq[counts > 1][0]} appears more than once")
    return keys, offsets


def scan_offsets(rec_path: str) -> np.ndarray:
    """Byte offsets of every record of a .rec, by a sequential scan of the framing (keys = 0..N-1)."""
    size = os.path.getsize(rec_path)
    offsets = []
    fd = os.open(rec_path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            offsets.append(pos)
            _, pos = read_framed(fd, pos, rec_path, len(offsets) - 1, size)
    finally:
        os.close(fd)
    return np.asarray(offsets, np.int64)


class RecordFile:
    """Random access to the records of a .rec through its .idx (or an index built by a scan).

    `len(f)`, `f.keys()` (int64 array, .idx order) and `f.read(key) -> bytes` (the record, framing
    removed). Without an .idx file the keys are 0..N-1 in file order, as MXNet's sequential reader
    numbers them. Picklable: the file is opened lazily in each process (Grain workers) and read with
    `os.pread`, so threads can share one instance.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = os.fspath(rec_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.file_size = os.path.getsize(self.rec_path)
        if idx_path is None and os.path.isfile(_default_idx_path(self.rec_path)):
            idx_path = _default_idx_path(self.rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else None
        if self.idx_path is not None:
            if not os.path.isfile(self.idx_path):
                raise FileNotFoundError(f"RecordIO index file not found: {self.idx_path}")
            keys, self._offsets = parse_idx(self.idx_path, self.file_size)
        else:
            self._offsets = scan_offsets(self.rec_path)
            keys = np.arange(len(self._offsets), dtype=np.int64)
        self._len = len(keys)
        self._first_key = int(keys[0]) if self._len else 0
        # The usual .idx lists keys first_key, first_key+1, ...: then no key array is kept (it would
        # be pickled into every Grain worker: 8 bytes per record).
        contiguous = np.array_equal(keys, np.arange(self._first_key, self._first_key + self._len))
        self._keys = None if contiguous else keys
        if not contiguous:
            self._sort = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[self._sort]
        self._fd = None
        self._pid = None

    def __len__(self) -> int:
        return self._len

    def keys(self) -> np.ndarray:
        """Record keys, int64, in .idx order."""
        if self._keys is None:
            return np.arange(self._first_key, self._first_key + self._len, dtype=np.int64)
        return self._keys

    def __contains__(self, key) -> bool:
        return self._position(key, raise_missing=False) is not None

    def _position(self, key, raise_missing: bool = True) -> int | None:
        key = int(key)
        if self._keys is None:
            pos = key - self._first_key
            if 0 <= pos < self._len:
                return pos
        else:
            pos = int(np.searchsorted(self._sorted_keys, key))
            if pos < len(self._sorted_keys) and self._sorted_keys[pos] == key:
                return int(self._sort[pos])
        if raise_missing:
            where = self.idx_path or self.rec_path
            raise KeyError(f"{where}: no record with key {key}")
        return None

    def offset(self, key) -> int:
        """Byte offset in the .rec of record `key`."""
        return int(self._offsets[self._position(key)])

    def offsets_of(self, keys: np.ndarray) -> np.ndarray | None:
        """int64 byte offsets of many records at once, or None if any key is missing."""
        keys = np.asarray(keys, np.int64)
        if self._keys is None:
            pos = keys - self._first_key
            if len(pos) and (pos.min() < 0 or pos.max() >= self._len):
                return None
            return self._offsets[pos]
        at = np.minimum(np.searchsorted(self._sorted_keys, keys), len(self._sorted_keys) - 1)
        if not np.array_equal(self._sorted_keys[at], keys):
            return None
        return self._offsets[self._sort[at]]

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def read(self, key) -> bytes:
        """The record stored under `key` (multi-part records joined, magic words put back)."""
        record, _ = read_framed(self._file(), self.offset(key), self.rec_path, int(key), self.file_size)
        return record

    def read_header(self, key) -> IRHeader:
        """The IRHeader of record `key` (reads the first chunk only when it holds the whole header)."""
        fd, off = self._file(), self.offset(key)
        where = f"{self.rec_path}: record key {int(key)}"
        head = _read_exact(fd, 8 + IR_SIZE, off, self.rec_path, int(key), self.file_size)
        magic, lrec = struct.unpack_from("<II", head)
        flag = struct.unpack_from("<I", head, 8)[0]
        need = IR_SIZE + 4 * flag
        if magic == MAGIC and (lrec >> 29) == 0 and (lrec & _LENGTH_MASK) >= need:
            return unpack(_read_exact(fd, need, off + 8, self.rec_path, int(key), self.file_size), where)[0]
        return unpack(self.read(key), where)[0]

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def __del__(self):
        try:
            self.close()
        except (OSError, TypeError, AttributeError):  # at interpreter shutdown `os` may already be None
            self._fd = None

    def __repr__(self) -> str:
        return f"RecordFile({self.rec_path!r}, {len(self)} records)"


class RecordWriter:
    """Writes a .rec and its .idx exactly as MXNet's `MXIndexedRecordIO(idx, rec, 'w')`.

    `write(key, record)` appends one record (bytes from `pack`) and its index line. Use as a context
    manager or call `close()`.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path is not None else _default_idx_path(self.rec_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w")
        self._keys: set[int] = set()

    def write(self, key: int, record: bytes) -> None:
        key = int(key)
        if key in self._keys:
            raise RecordIOError(f"{self.rec_path}: record key {key} written twice")
        self._keys.add(key)
        offset = self._rec.tell()
        self._rec.write(frame(record))
        self._idx.write(f"{key}\t{offset}\n")

    def __len__(self) -> int:
        return len(self._keys)

    def close(self) -> None:
        if not self._rec.closed:
            self._rec.close()
            self._idx.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
