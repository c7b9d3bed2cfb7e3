"""RecordIO framing and IRHeader packing, checked against the format written out by hand (struct)."""
import pickle
import struct

import numpy as np
import pytest

from lafs_jax.input import recordio
from lafs_jax.input.recordio import IRHeader, RecordFile, RecordIOError, RecordWriter, pack, unpack

MAGIC = struct.pack("<I", 0xCED7230A)


def chunk(cflag, payload):
    """One chunk as dmlc writes it: magic, (cflag << 29) | length, payload (no padding here)."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(payload)) + payload


def test_pack_scalar_label_matches_struct_layout():
    rec = pack(IRHeader(7, 3.0, 11, 12), b"JPEG")  # a scalar label forces flag 0
    assert rec == struct.pack("<IfQQ", 0, 3.0, 11, 12) + b"JPEG"
    header, payload = unpack(rec)
    assert header == IRHeader(0, 3.0, 11, 12) and payload == b"JPEG"
    assert recordio.scalar_label(header) == 3.0


def test_pack_array_label_matches_struct_layout():
    rec = pack((0, [5.0, 9.0], 0, 0), b"xyz")
    assert rec == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5.0, 9.0) + b"xyz"
    header, payload = unpack(rec)
    assert header.flag == 2 and payload == b"xyz"
    np.testing.assert_array_equal(header.label, np.float32([5, 9]))
    assert recordio.scalar_label(header) == 5.0


def test_unpack_rejects_short_records():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte IRHeader"):
        unpack(b"abc", where="x.rec key 3")
    with pytest.raises(RecordIOError, match="3 float labels"):
        unpack(struct.pack("<IfQQ", 3, 0, 0, 0) + b"1234", where="x.rec key 3")


def test_small_file_bytes_are_exactly_the_dmlc_format(tmp_path):
    plain = b"abcde"  # 5 bytes -> 3 bytes of zero padding
    aligned_magic = b"ABCD" + MAGIC + b"EFGHIJ"  # magic at offset 4 -> split into start + end chunks
    unaligned_magic = b"AB" + MAGIC + b"CD"  # magic at offset 2 -> not a split point
    two_magics = MAGIC + MAGIC  # magic at 0 and 4 -> empty start, empty middle, empty end chunks
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordWriter(str(rec), str(idx)) as w:
        for key, r in [(0, plain), (1, aligned_magic), (2, unaligned_magic), (3, two_magics)]:
            w.write(key, r)
    expected = [
        chunk(0, plain) + b"\0\0\0",
        chunk(1, b"ABCD") + chunk(3, b"EFGHIJ") + b"\0\0",
        chunk(0, unaligned_magic),
        chunk(1, b"") + chunk(2, b"") + chunk(3, b""),
    ]
    assert rec.read_bytes() == b"".join(expected)
    offsets = np.cumsum([0] + [len(e) for e in expected[:-1]])
    assert idx.read_text() == "".join(f"{k}\t{o}\n" for k, o in enumerate(offsets))
    f = RecordFile(str(rec))
    assert len(f) == 4 and list(f.keys()) == [0, 1, 2, 3]
    for key, r in enumerate([plain, aligned_magic, unaligned_magic, two_magics]):
        assert f.read(key) == r
        assert f.offset(key) == offsets[key]


@pytest.mark.parametrize("with_idx", [True, False])
def test_round_trip_random_records_with_many_parts(tmp_path, with_idx):
    rng = np.random.default_rng(0)
    records = []
    for n in range(12):
        body = bytearray(rng.integers(0, 256, size=int(rng.integers(0, 64))).astype(np.uint8).tobytes())
        for _ in range(n % 4):  # plant aligned and unaligned magic words
            pos = int(rng.integers(0, len(body) + 1))
            body[pos:pos] = MAGIC
        records.append(pack(IRHeader(0, float(n), n, 0), bytes(body)))
    rec = tmp_path / "r.rec"
    with RecordWriter(str(rec)) as w:
        for k, r in enumerate(records):
            w.write(k, r)
    if not with_idx:
        (tmp_path / "r.idx").unlink()  # then a sequential scan builds the index: keys 0..N-1
    f = RecordFile(str(rec))
    assert (f.idx_path is not None) == with_idx
    assert list(f.keys()) == list(range(12))
    for k, r in enumerate(records):
        assert f.read(k) == r
        assert f.read_header(k) == unpack(r)[0]


def test_non_contiguous_keys_and_header_records(tmp_path):
    rec = tmp_path / "k.rec"
    with RecordWriter(str(rec)) as w:
        w.write(9, pack((0, [1.0, 3.0], 0, 0), b""))
        w.write(2, pack((0, 1.0, 2, 0), b"img2"))
        w.write(5, pack((0, 0.0, 5, 0), b"img5"))
    f = RecordFile(str(rec))
    assert list(f.keys()) == [9, 2, 5]
    assert unpack(f.read(5))[1] == b"img5"
    np.testing.assert_array_equal(f.read_header(9).label, [1, 3])
    assert 2 in f and 3 not in f
    with pytest.raises(KeyError, match="no record with key 3"):
        f.read(3)


def test_record_file_pickles_and_reads_in_copy(tmp_path):
    rec = tmp_path / "p.rec"
    with RecordWriter(str(rec)) as w:
        w.write(0, b"hello world")
    f = RecordFile(str(rec))
    f.read(0)  # opens the file
    g = pickle.loads(pickle.dumps(f))
    assert g.read(0) == b"hello world"


def _write(tmp_path, records):
    rec = tmp_path / "e.rec"
    with RecordWriter(str(rec)) as w:
        for k, r in enumerate(records):
            w.write(k, r)
    return rec, tmp_path / "e.idx"


def test_bad_magic_names_file_and_key(tmp_path):
    rec, idx = _write(tmp_path, [b"aaaa", b"bbbb"])
    idx.write_text("0\t0\n1\t4\n")  # key 1 points into the middle of record 0
    f = RecordFile(str(rec))
    with pytest.raises(RecordIOError, match=r"e\.rec: record key 1: bad magic"):
        f.read(1)


def test_truncated_record_names_file_and_key(tmp_path):
    rec, _ = _write(tmp_path, [b"a" * 40, b"b" * 40])
    rec.write_bytes(rec.read_bytes()[:-10])
    f = RecordFile(str(rec))
    assert f.read(0) == b"a" * 40
    with pytest.raises(RecordIOError, match=r"e\.rec: record key 1: truncated"):
        f.read(1)


def test_truncated_file_without_idx_fails_in_scan(tmp_path):
    rec, idx = _write(tmp_path, [b"a" * 40, b"b" * 40])
    idx.unlink()
    rec.write_bytes(rec.read_bytes()[:-3])
    with pytest.raises(RecordIOError, match=r"e\.rec: record key 1: truncated"):
        RecordFile(str(rec))


def test_continuation_without_start_is_an_error(tmp_path):
    rec = tmp_path / "c.rec"
    rec.write_bytes(chunk(2, b"abcd"))
    with pytest.raises(RecordIOError, match="record key 0: chunk at byte 0 has continuation flag 2"):
        RecordFile(str(rec))


def test_idx_offset_past_end_names_idx_and_key(tmp_path):
    rec, idx = _write(tmp_path, [b"aaaa"])
    idx.write_text("0\t0\n7\t4096\n")
    with pytest.raises(RecordIOError, match=r"e\.idx: record key 7: offset 4096 is past the end"):
        RecordFile(str(rec))


def test_malformed_idx_line_names_line(tmp_path):
    rec, idx = _write(tmp_path, [b"aaaa"])
    idx.write_text("0\t0\nnot a line\n")
    with pytest.raises(RecordIOError, match=r"e\.idx:2: expected 'key<TAB>offset'"):
        RecordFile(str(rec))


def test_duplicate_idx_key(tmp_path):
    rec, idx = _write(tmp_path, [b"aaaa", b"bbbb"])
    idx.write_text("0\t0\n0\t12\n")
    with pytest.raises(RecordIOError, match="record key 0 appears more than once"):
        RecordFile(str(rec))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        RecordFile(str(tmp_path / "nope.rec"))
    rec, _ = _write(tmp_path, [b"aaaa"])
    with pytest.raises(FileNotFoundError, match="other.idx"):
        RecordFile(str(rec), str(tmp_path / "other.idx"))


def test_writer_rejects_duplicate_key(tmp_path):
    with RecordWriter(str(tmp_path / "d.rec")) as w:
        w.write(1, b"x")
        with pytest.raises(RecordIOError, match="record key 1 written twice"):
            w.write(1, b"y")
