"""Verification .bin files: round trips, a Python-2 style pickle written opcode by opcode, errors."""
import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from lafs_jax.input import images as image_lib
from lafs_jax.input import synthetic
from lafs_jax.input.verification_bin import VerificationBinError, load_bin, save_bin


def _pairs(n=3, size=16):
    ims = np.stack([synthetic.face_like_image(i // 2, i, size) for i in range(2 * n)])
    return ims, np.array([True, False, True][:n])


def test_round_trip_png_is_exact(tmp_path):
    ims, same = _pairs()
    save_bin(str(tmp_path / "v.bin"), ims, same, fmt="PNG")
    got, got_same = load_bin(str(tmp_path / "v.bin"), image_size=16)
    assert got.dtype == np.uint8 and got.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(got, ims)
    assert got_same.dtype == bool and list(got_same) == [True, False, True]
    bins, flags = pickle.load(open(tmp_path / "v.bin", "rb"))
    assert isinstance(bins[0], bytes) and flags == [True, False, True]


def test_round_trip_jpeg_and_resize(tmp_path):
    ims, same = _pairs()
    save_bin(str(tmp_path / "v.bin"), ims, same)
    got, _ = load_bin(str(tmp_path / "v.bin"), image_size=16)
    bins, _ = pickle.load(open(tmp_path / "v.bin", "rb"))
    direct = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins])
    np.testing.assert_array_equal(got, direct)
    assert np.abs(got.astype(int) - ims).mean() < 8  # lossy JPEG q95 of a noisy 16 px image
    big, _ = load_bin(str(tmp_path / "v.bin"), image_size=(24, 20))
    assert big.shape == (6, 24, 20, 3)
    bgr, _ = load_bin(str(tmp_path / "v.bin"), image_size=16, color_order="bgr")
    np.testing.assert_array_equal(bgr, got[..., ::-1])


def test_python2_pickle_with_byte_strings(tmp_path):
    """A .bin as Python 2 wrote it: protocol 2, images as BINSTRING (Py2 str), flags NEWTRUE/NEWFALSE."""
    ims, _ = _pairs(n=2)
    encoded = [image_lib.encode_image(im, "PNG") for im in ims]
    blob = b"\x80\x02" + b"]("  # PROTO 2, EMPTY_LIST, MARK
    for e in encoded:
        blob += b"T" + struct.pack("<i", len(e)) + e  # BINSTRING
    blob += b"e]("  # APPENDS, EMPTY_LIST, MARK
    blob += b"\x88\x89e\x86."  # NEWTRUE, NEWFALSE, APPENDS, TUPLE2, STOP
    (tmp_path / "py2.bin").write_bytes(blob)
    with pytest.raises(UnicodeDecodeError):  # what a default pickle.load does with such a file
        pickle.loads(blob)
    got, same = load_bin(str(tmp_path / "py2.bin"), 16)
    np.testing.assert_array_equal(got, ims)
    assert list(same) == [True, False]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.bin"):
        load_bin(str(tmp_path / "none.bin"))
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(VerificationBinError, match="junk.bin: not a pickled"):
        load_bin(str(tmp_path / "junk.bin"))
    with open(tmp_path / "count.bin", "wb") as f:
        pickle.dump(([b"a", b"b", b"c"], [True]), f)
    with pytest.raises(VerificationBinError, match=r"count.bin: 3 images for 1 pairs"):
        load_bin(str(tmp_path / "count.bin"))
    ims, _ = _pairs(n=1)
    with open(tmp_path / "bad.bin", "wb") as f:
        pickle.dump(([image_lib.encode_image(ims[0], "PNG"), b"\xff\xd8garbage"], [True]), f)
    with pytest.raises(image_lib.UndecodableImageError, match=r"bad.bin: image 1"):
        load_bin(str(tmp_path / "bad.bin"), 16)
    with pytest.raises(ValueError, match="4 images for 1 pairs"):
        save_bin(str(tmp_path / "x.bin"), np.zeros((4, 8, 8, 3), np.uint8), [True])


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): a pickle that writes a file while it loads."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_that_would_create_a_file_is_refused(tmp_path):
    target = tmp_path / "created_by_pickle.txt"
    blob = pickle.dumps(([_CreatesFile(str(target)), b"x"], [True]), protocol=2)
    pickle.loads(blob)[0][0].close()  # a plain pickle.load runs it: the file appears
    assert target.exists()
    target.unlink()
    (tmp_path / "evil.bin").write_bytes(blob)
    with pytest.raises(VerificationBinError, match=r"evil.bin: refused to unpickle the global 'io.open'"):
        load_bin(str(tmp_path / "evil.bin"), 16)
    assert not target.exists()
    (tmp_path / "system.bin").write_bytes(b"cos\nsystem\n(S'touch " + str(target).encode() + b"'\ntR.")
    with pytest.raises(VerificationBinError, match=r"system.bin: refused to unpickle the global 'os.system'"):
        load_bin(str(tmp_path / "system.bin"), 16)
    assert not target.exists()


def test_numpy_arrays_and_protocol2_bytes_are_allowed(tmp_path):
    """Some published .bin files hold the JPEGs as numpy uint8 arrays and numpy bools; Python 3 at
    protocol 2 writes bytes through _codecs.encode. All of these load."""
    ims, _ = _pairs(n=2)
    encoded = [np.frombuffer(image_lib.encode_image(im, "PNG"), np.uint8) for im in ims]
    encoded[1] = encoded[1].tobytes()
    with open(tmp_path / "np.bin", "wb") as f:
        pickle.dump((encoded, np.array([True, False])), f, protocol=2)
    got, same = load_bin(str(tmp_path / "np.bin"), 16)
    np.testing.assert_array_equal(got, ims)
    assert list(same) == [True, False]
