"""Face sources (.rec InsightFace layout, ArrayRecord, image folder, TFDS) and subsets."""
import logging
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from lafs_jax.input import images as image_lib
from lafs_jax.input import recordio, sources, subsets, synthetic, writers

COUNTS = [3, 1, 2]  # images per identity


def _images():
    return [[synthetic.face_like_image(c, i, size=16) for i in range(n)] for c, n in enumerate(COUNTS)]


@pytest.fixture
def face_rec(tmp_path):
    """An InsightFace-layout .rec of lossless PNGs: (prefix, images [class][i])."""
    prefix = str(tmp_path / "train")
    ims = _images()
    writers.write_face_rec(prefix, COUNTS, (image_lib.encode_image(im, "PNG") for cls in ims for im in cls))
    return prefix, ims


def test_insightface_layout_bytes_and_reading(face_rec):
    prefix, ims = face_rec
    f = recordio.RecordFile(prefix + ".rec")
    # header record 0: flag 2, scalar 0, labels [id_lo, id_hi] = [7, 10] (6 images, 3 identities)
    assert f.read(0) == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 7, 10)
    assert f.read(8) == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 4, 5)  # identity 1: image 4
    assert list(f.keys()) == list(range(10))
    src = sources.FaceRecordSource(prefix)
    assert src.identity_layout and len(src) == 6 and src.num_classes == 3
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 2, 2])
    flat = [im for cls in ims for im in cls]
    for i in range(6):
        item = src[i]
        assert item["image"].dtype == np.uint8 and item["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(item["image"], flat[i])
        assert item["label"] == src.labels[i]
    assert src.describe(3).endswith("train.rec: record key 4")
    fast = src._identity_ranges_fast(7, 10)  # one read of the consecutive identity records...
    assert fast is not None
    for a, b in zip(fast, src._identity_ranges(7, 10)):  # ...equals reading them one by one
        np.testing.assert_array_equal(a, b)
    # the same source from 'train.rec' or the folder
    assert len(sources.FaceRecordSource(prefix + ".rec")) == 6
    assert len(sources.FaceRecordSource(os.path.dirname(prefix))) == 6


def test_identity_records_in_any_order_and_image_ranges_out_of_key_order(tmp_path):
    """Identity records not consecutive on disk (one header read each) and class 0's images after class 1's."""
    prefix = str(tmp_path / "shuffled")
    ims = {k: np.full((4, 4, 3), 10 * k, np.uint8) for k in range(1, 5)}
    classes = {1: 1, 2: 1, 3: 0, 4: 0}
    with recordio.RecordWriter(prefix + ".rec") as w:
        w.write(0, recordio.pack((0, [5.0, 7.0], 0, 0), b""))
        w.write(6, recordio.pack((0, [1.0, 3.0], 0, 0), b""))  # identity 1: keys 1, 2
        for k in (3, 1, 4, 2):
            w.write(k, recordio.pack((0, float(classes[k]), k, 0), image_lib.encode_image(ims[k], "PNG")))
        w.write(5, recordio.pack((0, [3.0, 5.0], 0, 0), b""))  # identity 0: keys 3, 4
    src = sources.FaceRecordSource(prefix)
    np.testing.assert_array_equal(src.keys, [3, 4, 1, 2])
    np.testing.assert_array_equal(src.labels, [0, 0, 1, 1])
    for i, k in enumerate([3, 4, 1, 2]):
        np.testing.assert_array_equal(src[i]["image"], ims[k])
        assert src.describe(i).endswith(f"record key {k}")


def test_bgr_color_order_swaps_channels(face_rec):
    prefix, ims = face_rec
    src = sources.FaceRecordSource(prefix, color_order="bgr")
    np.testing.assert_array_equal(src[0]["image"], ims[0][0][..., ::-1])
    with pytest.raises(ValueError, match="color_order='gbr'"):
        sources.FaceRecordSource(prefix, color_order="gbr")


def test_plain_list_layout_labels_from_image_headers(tmp_path):
    prefix = str(tmp_path / "plain")
    ims = [synthetic.face_like_image(i, 0, size=8) for i in range(4)]
    labels = [2, 0, 2, 5]
    with recordio.RecordWriter(prefix + ".rec") as w:
        for k, (im, lab) in enumerate(zip(ims, labels)):
            w.write(k, recordio.pack((0, float(lab), k, 0), image_lib.encode_image(im, "PNG")))
    src = sources.FaceRecordSource(prefix)
    assert not src.identity_layout and len(src) == 4 and src.num_classes == 6
    np.testing.assert_array_equal(src.labels, labels)
    np.testing.assert_array_equal(src[3]["image"], ims[3])


def test_header_without_identity_records(tmp_path):
    prefix = str(tmp_path / "h")
    with recordio.RecordWriter(prefix + ".rec") as w:
        w.write(0, recordio.pack((0, [3.0, 3.0], 0, 0), b""))  # images 1..2, no identity records
        for k, lab in [(1, 4.0), (2, [1.0, 9.0])]:  # an array label counts by its first entry
            w.write(k, recordio.pack((0, lab, k, 0), image_lib.encode_image(np.zeros((4, 4, 3), np.uint8), "PNG")))
    src = sources.FaceRecordSource(prefix)
    np.testing.assert_array_equal(src.labels, [4, 1])
    assert src.num_classes == 5


def test_identity_range_outside_images_is_an_error(tmp_path):
    prefix = str(tmp_path / "bad")
    with recordio.RecordWriter(prefix + ".rec") as w:
        w.write(0, recordio.pack((0, [2.0, 3.0], 0, 0), b""))
        w.write(1, recordio.pack((0, 0.0, 1, 0), b"x"))
        w.write(2, recordio.pack((0, [1.0, 5.0], 0, 0), b""))
    with pytest.raises(sources.DataSourceError, match=r"bad\.rec: identity record key 2: image range \[1, 5\)"):
        sources.FaceRecordSource(prefix)


def test_header_label_disagreeing_with_identity_range(tmp_path):
    prefix = str(tmp_path / "mis")
    with recordio.RecordWriter(prefix + ".rec") as w:
        w.write(0, recordio.pack((0, [3.0, 4.0], 0, 0), b""))
        w.write(1, recordio.pack((0, 0.0, 1, 0), b"x"))
        w.write(2, recordio.pack((0, 7.0, 2, 0), b"x"))
        w.write(3, recordio.pack((0, [1.0, 3.0], 0, 0), b""))
    with pytest.raises(sources.DataSourceError, match="record key 2 has label 7 in its header"):
        sources.FaceRecordSource(prefix)


def test_missing_idx_and_rec(tmp_path, face_rec):
    prefix, _ = face_rec
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        sources.FaceRecordSource(str(tmp_path / "nothing"))
    os.remove(prefix + ".rec")
    with pytest.raises(FileNotFoundError, match="train.rec"):
        sources.FaceRecordSource(prefix)


def _rec_with_broken_image(tmp_path):
    prefix = str(tmp_path / "broken")
    good = image_lib.encode_image(np.full((8, 8, 3), 50, np.uint8), "JPEG")
    writers.write_face_rec(prefix, [3], [good, good[: len(good) // 2], good])
    return prefix


def test_undecodable_image_names_file_and_key(tmp_path):
    src = sources.FaceRecordSource(_rec_with_broken_image(tmp_path))
    assert src[0]["image"].shape == (8, 8, 3)
    with pytest.raises(image_lib.UndecodableImageError, match=r"broken\.rec: record key 2: cannot decode"):
        src[1]


def test_skip_undecodable_gives_none_and_logs_count(tmp_path, caplog):
    src = sources.FaceRecordSource(_rec_with_broken_image(tmp_path), skip_undecodable=True)
    with caplog.at_level(logging.WARNING):
        assert src[1] is None and src[1] is None
    assert src.skipped == 2
    assert "broken.rec: record key 2" in caplog.text and "2 undecodable records skipped" in caplog.text
    assert src[2]["label"] == 0


def test_sources_pickle(face_rec):
    prefix, _ = face_rec
    src = sources.FaceRecordSource(prefix)
    src[0]
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy[5]["image"], src[5]["image"])
    sub = subsets.make_subset(src, k=1, k_draw="random", seed=0)
    assert pickle.loads(pickle.dumps(sub))[0]["label"] == sub[0]["label"]


def test_arrayrecord_source_matches_rec(tmp_path, face_rec):
    prefix, _ = face_rec
    rec_src = sources.FaceRecordSource(prefix)
    out = str(tmp_path / "train.array_record")
    assert writers.rec_to_arrayrecord(rec_src, out) == {"num_images": 6, "num_classes": 3}
    src = sources.ArrayRecordFaceSource(out)
    assert len(src) == 6 and src.num_classes == 3
    np.testing.assert_array_equal(src.labels, rec_src.labels)
    for i in range(6):
        np.testing.assert_array_equal(src[i]["image"], rec_src[i]["image"])
        assert src[i]["label"] == rec_src[i]["label"]
    os.remove(out + sources.ARRAYRECORD_LABELS_SUFFIX)  # without the sidecar: labels from the headers
    np.testing.assert_array_equal(sources.ArrayRecordFaceSource(out).labels, rec_src.labels)
    assert pickle.loads(pickle.dumps(src))[4]["label"] == 2
    with pytest.raises(FileNotFoundError, match="missing.array_record"):
        sources.ArrayRecordFaceSource(str(tmp_path / "missing.array_record"))


def _make_folder(root, ims):
    for c, cls in enumerate(ims):
        os.makedirs(root / f"person_{c}", exist_ok=True)
        for i, im in enumerate(cls):
            (root / f"person_{c}" / f"{i}.png").write_bytes(image_lib.encode_image(im, "PNG"))


def test_image_folder_source(tmp_path):
    ims = _images()
    _make_folder(tmp_path / "faces", ims)
    (tmp_path / "faces" / "person_0" / "notes.txt").write_text("not an image")
    src = sources.ImageFolderSource(str(tmp_path / "faces"))
    assert len(src) == 6 and src.num_classes == 3 and src.class_names == ["person_0", "person_1", "person_2"]
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 2, 2])
    np.testing.assert_array_equal(src[4]["image"], ims[2][0])
    os.makedirs(tmp_path / "faces" / "person_3")
    with pytest.raises(sources.DataSourceError, match="person_3: identity folder has no images"):
        sources.ImageFolderSource(str(tmp_path / "faces"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sources.ImageFolderSource(str(tmp_path / "nowhere"))


def test_grey_images_become_rgb(tmp_path):
    grey = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    os.makedirs(tmp_path / "g" / "a")
    (tmp_path / "g" / "a" / "x.pgm").write_bytes(image_lib.encode_image(grey, "PPM"))
    item = sources.ImageFolderSource(str(tmp_path / "g"))[0]
    np.testing.assert_array_equal(item["image"], np.repeat(grey[..., None], 3, axis=-1))


def _build_tfds(data_dir, dataset_name, encoded: bool):
    import tensorflow_datasets as tfds

    image_feature = (tfds.features.Tensor(shape=(), dtype=np.object_) if encoded
                     else tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8))

    class TinyFaces(tfds.core.GeneratorBasedBuilder):
        name = dataset_name
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"face": image_feature, "id": tfds.features.ClassLabel(num_classes=4)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):  # the pixel value encodes the label (TFDS shuffles the order)
                im = np.full((8, 8, 3), 10 * (i % 3), np.uint8)
                yield i, {"face": image_lib.encode_image(im, "PNG") if encoded else im, "id": i % 3}

    TinyFaces(data_dir=data_dir, file_format="array_record").download_and_prepare()


@pytest.mark.parametrize("encoded", [False, True])
def test_tfds_source(tmp_path, encoded):
    name = f"lafs_faces_{'encoded' if encoded else 'arrays'}"
    _build_tfds(str(tmp_path), name, encoded)
    src = sources.TfdsSource(name, "train", str(tmp_path), image_key="face", label_key="id")
    assert len(src) == 6 and src.num_classes == 4
    for i in range(6):
        item = src[i]
        assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.uint8
        assert item["image"][0, 0, 0] == 10 * item["label"]
        assert src.labels[i] == item["label"]
    assert sorted(src.labels) == [0, 0, 1, 1, 2, 2]
    assert pickle.loads(pickle.dumps(src))[2]["label"] == src[2]["label"]
    if encoded:  # a fresh process (as a Grain worker) where the builder class is not registered
        (tmp_path / "src.pkl").write_bytes(pickle.dumps(src))
        code = "import pickle,sys; s=pickle.load(open(sys.argv[1],'rb')); print(len(s), s[2]['label'])"
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src.pkl")], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.stdout.split() == ["6", str(src[2]["label"])], out.stderr[-2000:]
    with pytest.raises(sources.DataSourceError, match="no feature 'image'"):
        sources.TfdsSource(name, "train", str(tmp_path), image_key="image", label_key="id")


# ---- subsets ----

LABELS = np.repeat(np.arange(20), np.arange(1, 21))  # class c has c+1 images (1..20)


@pytest.mark.parametrize("k", [1, 2, 4, 10])
def test_k_shot_exactly_k_per_kept_identity(k):
    first = subsets.k_shot_indices(LABELS, k, draw="first")
    starts = np.searchsorted(LABELS, np.arange(k - 1, 20))  # each kept identity's first k images
    np.testing.assert_array_equal(first, (starts[:, None] + np.arange(k)).reshape(-1))
    idx = subsets.k_shot_indices(LABELS, k, seed=3)
    assert np.all(np.diff(idx) > 0)
    kept, counts = np.unique(LABELS[idx], return_counts=True)
    np.testing.assert_array_equal(kept, np.arange(k - 1, 20))  # identities with >= k images
    assert np.all(counts == k)
    np.testing.assert_array_equal(idx, subsets.k_shot_indices(LABELS, k, seed=3))  # reproducible
    if k < 10:
        assert not np.array_equal(idx, subsets.k_shot_indices(LABELS, k, seed=4))


def test_k_shot_is_uniform_within_identity():
    # class 19 has 20 images; over many seeds each image is picked about k/20 of the time
    picks = np.zeros(20)
    for seed in range(400):
        idx = subsets.k_shot_indices(LABELS, 4, seed)
        picks += np.bincount(idx[LABELS[idx] == 19] - np.nonzero(LABELS == 19)[0][0], minlength=20)
    np.testing.assert_allclose(picks / 400, 4 / 20, atol=0.07)


@pytest.mark.parametrize("fraction,expected", [(0.01, 1), (0.1, 2), (0.5, 10), (1.0, 20)])
def test_identity_fraction(fraction, expected):
    idx = subsets.identity_fraction_indices(LABELS, fraction, seed=1)
    chosen = np.unique(LABELS[idx])
    assert len(chosen) == expected
    np.testing.assert_array_equal(idx, np.nonzero(np.isin(LABELS, chosen))[0])  # all their images
    np.testing.assert_array_equal(idx, subsets.identity_fraction_indices(LABELS, fraction, seed=1))


def test_partition_is_the_first_fraction_of_the_images_after_k_shot():
    """The official FaceDataset(partition=p): the first int(N * p) images in data set order, here of the
    k-shot subset (the README's "1% with 1-shot"); not a random draw, and the same for every seed."""
    labels = np.repeat(np.arange(200), 5)  # 200 identities x 5 images
    idx = subsets.subset_indices(labels, k=2, partition=0.1, seed=0)
    np.testing.assert_array_equal(idx, (np.arange(20)[:, None] * 5 + np.arange(2)).reshape(-1)[:40])
    np.testing.assert_array_equal(idx, subsets.subset_indices(labels, k=2, partition=0.1, seed=9))
    np.testing.assert_array_equal(subsets.subset_indices(labels, partition=0.013), np.arange(13))  # int(1000 * 0.013)
    assert len(np.unique(labels[idx])) == 20
    rand = subsets.subset_indices(labels, k=2, k_draw="random", identity_fraction=0.1, seed=0)
    assert len(rand) == 40 and len(np.unique(labels[rand])) == 20 and labels[rand].max() > 20  # random identities
    with pytest.raises(ValueError, match="partition must be in"):
        subsets.subset_indices(labels, partition=0.0)


def test_subset_source_remaps_labels(face_rec):
    prefix, ims = face_rec
    src = sources.FaceRecordSource(prefix)
    sub = subsets.make_subset(src, k=2, k_draw="random", seed=0)  # identity 1 has one image: dropped
    assert len(sub) == 4 and sub.num_classes == 2
    np.testing.assert_array_equal(sub.labels, [0, 0, 1, 1])
    for i in range(len(sub)):
        assert sub[i]["label"] == sub.labels[i]
        np.testing.assert_array_equal(sub[i]["image"], src[int(sub.indices[i])]["image"])
    ident = subsets.make_subset(src, identity_fraction=0.34, seed=0)
    assert ident.num_classes == 1 and set(ident.labels) == {0}
    part = subsets.make_subset(src, partition=0.5)  # the first 3 of the 6 images: identity 0 only
    assert part.num_classes == 1 and list(part.indices) == [0, 1, 2]
    assert subsets.make_subset(src) is src
    with pytest.raises(ValueError, match="subset k_draw='half'"):
        subsets.make_subset(src, k=1, k_draw="half")
