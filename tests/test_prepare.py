"""data.prepare and lafs_jax.input.orl: the ORL demo set end to end, folder -> .rec, .rec -> ArrayRecord,
pairs -> .bin."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import prepare
from lafs_jax.input import images as image_lib
from lafs_jax.input import orl, sources, synthetic, verification_bin
from lafs_jax.input.recordio import RecordFile, unpack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small(images):
    """[N, 28, 28] grey thumbnails (float) for nearest-neighbour identity checks."""
    return images[..., 0].reshape(len(images), 28, 4, 28, 4).mean(axis=(2, 4))


def test_orl_end_to_end(tmp_path):
    out = tmp_path / "orl"
    run = subprocess.run([sys.executable, "-m", "data.prepare", "orl", "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["train"]["images"] == 250 and summary["validation"]["pairs"] == 450
    assert summary["test"]["pairs"] == 900
    train_ids = manifest["train"]["identities"]
    val_ids, test_ids = manifest["validation"]["identities"], manifest["test"]["identities"]
    assert (len(train_ids), len(val_ids), len(test_ids)) == (25, 5, 10)
    assert len(set(train_ids) | set(val_ids) | set(test_ids)) == 40
    # the test people of the earlier 30 / 10 split (seed 0): earlier test numbers stay comparable
    old_held_out = sorted(f"s{i + 1}" for i in np.random.default_rng(0).permutation(40)[30:])
    assert sorted(test_ids) == old_held_out
    assert (out / "property").read_text().strip() == "25,112,112"

    src = sources.FaceRecordSource(str(out / "train"))
    assert src.identity_layout and len(src) == 250 and src.num_classes == 25
    np.testing.assert_array_equal(np.bincount(src.labels), [10] * 25)
    train_images = np.stack([src[i]["image"] for i in range(250)])
    assert train_images.shape == (250, 112, 112, 3)
    assert np.abs(train_images[..., 0].astype(int) - train_images[..., 2]).max() <= 2  # grey replicated

    # identities by content: nearest original ORL image decides whose face each stored image is
    faces = orl.read_orl(orl.orl_root())
    names = [p for p in faces for _ in faces[p]]
    originals = _small(np.stack([im for p in faces for im in faces[p]]).astype(float)).reshape(400, -1)

    def owners(images):
        a = _small(images.astype(float)).reshape(len(images), -1)
        d = ((a ** 2).sum(1)[:, None] + (originals ** 2).sum(1)[None] - 2 * a @ originals.T) / a.shape[1]
        assert np.all(d.min(axis=1) < 10.0)  # each stored image is a (JPEG) copy of an original
        return [names[j] for j in d.argmin(axis=1)]

    train_owner = owners(train_images)
    assert set(train_owner) == set(train_ids)
    assert all(train_owner[i] == train_ids[src.labels[i]] for i in range(250))  # label = identity order
    for file, ids, people in (("validation.bin", val_ids, 5), ("test.bin", test_ids, 10)):
        ver, issame = verification_bin.load_bin(str(out / file), 112)
        n = people * 45  # every genuine pair (C(10, 2) per person) and as many distinct impostors
        assert ver.shape == (4 * n, 112, 112, 3) and issame.sum() == n and (~issame).sum() == n
        assert 0.3 < issame[:n].mean() < 0.7  # shuffled: 10-fold splits see both kinds
        ver_owner = owners(ver)
        assert set(ver_owner) == set(ids)
        same = np.array([ver_owner[2 * k] == ver_owner[2 * k + 1] for k in range(2 * n)])
        np.testing.assert_array_equal(same, issame)
        pairs = {tuple(sorted((ver[2 * k].tobytes(), ver[2 * k + 1].tobytes()))) for k in range(2 * n)}
        assert len(pairs) == 2 * n


def test_split_people_refuses_sets_without_impostors():
    people = [f"s{i}" for i in range(1, 41)]
    with pytest.raises(ValueError, match="at least two people"):
        orl.split_people(people, 0, validation_people=1, test_people=10)
    with pytest.raises(ValueError, match="leave no training person"):
        orl.split_people(people, 0, validation_people=20, test_people=20)


def test_verification_pairs_are_complete_and_balanced():
    pairs, issame = orl.verification_pairs([3, 4, 2], seed=1)
    genuine = {tuple(p) for p, s in zip(pairs, issame) if s}
    assert genuine == {(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (3, 6), (4, 5), (4, 6), (5, 6), (7, 8)}
    owner = np.repeat([0, 1, 2], [3, 4, 2])
    impostors = [tuple(p) for p, s in zip(pairs, issame) if not s]
    assert len(impostors) == len(set(impostors)) == 10
    assert all(owner[a] != owner[b] for a, b in impostors)
    p2, s2 = orl.verification_pairs([3, 4, 2], seed=1)
    np.testing.assert_array_equal(p2, pairs)


def _folder(root, fmt_of):
    originals = {}
    for c in range(3):
        os.makedirs(root / f"id{c}")
        for i in range(2):
            im = synthetic.face_like_image(c, i, 24)
            fmt = fmt_of(c, i)
            path = root / f"id{c}" / f"{i}.{fmt.lower().replace('jpeg', 'jpg')}"
            path.write_bytes(image_lib.encode_image(im, fmt))
            originals[(c, i)] = path
    return originals


def test_folder_command(tmp_path):
    files = _folder(tmp_path / "faces", lambda c, i: "JPEG" if i == 0 else "PNG")
    prefix = tmp_path / "out" / "train"
    assert prepare.main(["folder", "--root", str(tmp_path / "faces"), "--out", str(prefix)]) == 0
    src = sources.FaceRecordSource(str(prefix))
    assert len(src) == 6 and src.num_classes == 3
    np.testing.assert_array_equal(src.labels, [0, 0, 1, 1, 2, 2])
    assert unpack(RecordFile(str(prefix) + ".rec").read(1))[1] == files[(0, 0)].read_bytes()  # JPEG copied
    png = image_lib.decode_image(files[(0, 1)].read_bytes())
    assert np.abs(src[1]["image"].astype(int) - png).mean() < 8  # PNG re-encoded as JPEG
    assert (tmp_path / "out" / "property").read_text().strip() == "3,24,24"
    prepare.main(["folder", "--root", str(tmp_path / "faces"), "--out", str(tmp_path / "r" / "t"), "--image-size", "16"])
    assert sources.FaceRecordSource(str(tmp_path / "r" / "t"))[0]["image"].shape == (16, 16, 3)


def test_folder_command_errors(tmp_path):
    _folder(tmp_path / "faces", lambda c, i: "PNG")
    (tmp_path / "faces" / "id1" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(image_lib.UndecodableImageError, match=r"id1/1\.png"):
        prepare.main(["folder", "--root", str(tmp_path / "faces"), "--out", str(tmp_path / "o")])
    os.makedirs(tmp_path / "faces" / "id9")
    with pytest.raises(sources.DataSourceError, match="id9: identity folder has no images"):
        prepare.main(["folder", "--root", str(tmp_path / "faces"), "--out", str(tmp_path / "o")])


def test_to_arrayrecord_command(tmp_path):
    prefix = str(tmp_path / "train")
    synthetic.write_synthetic_rec(prefix, 3, 2, size=16)
    out = str(tmp_path / "train.array_record")
    assert prepare.main(["to-arrayrecord", "--rec", prefix, "--out", out]) == 0
    rec, arr = sources.FaceRecordSource(prefix), sources.ArrayRecordFaceSource(out)
    assert len(arr) == 6 and arr.num_classes == 3
    for i in range(6):
        np.testing.assert_array_equal(arr[i]["image"], rec[i]["image"])
        assert arr[i]["label"] == rec[i]["label"]


def test_pairs_command_lfw_and_plain_formats(tmp_path):
    root = tmp_path / "lfw"
    ims = {}
    for name, n in (("Ann_A", 2), ("Bob_B", 1)):
        os.makedirs(root / name)
        for k in range(1, n + 1):
            ims[(name, k)] = synthetic.face_like_image(len(ims), k, 30)
            (root / name / f"{name}_{k:04d}.jpg").write_bytes(image_lib.encode_image(ims[(name, k)], "PNG"))
    (tmp_path / "pairs.txt").write_text("1\t2\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t1\n")
    out = str(tmp_path / "lfw.bin")
    assert prepare.main(["pairs", "--pairs", str(tmp_path / "pairs.txt"), "--root", str(root), "--out", out,
                         "--image-size", "32"]) == 0
    images, issame = verification_bin.load_bin(out, 32)
    assert list(issame) == [True, False] and images.shape == (4, 32, 32, 3)
    expected = image_lib.square(ims[("Bob_B", 1)], 32)
    assert np.abs(images[3].astype(int) - expected).mean() < 8  # JPEG inside the .bin
    (tmp_path / "plain.txt").write_text("Ann_A/Ann_A_0002.jpg Bob_B/Bob_B_0001.jpg 0\n")
    prepare.main(["pairs", "--pairs", str(tmp_path / "plain.txt"), "--root", str(root), "--out", out])
    assert list(verification_bin.load_bin(out, 112)[1]) == [False]
    (tmp_path / "missing.txt").write_text("Ann_A 1 3\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt:1: image not found: .*Ann_A_0003\.jpg"):
        prepare.main(["pairs", "--pairs", str(tmp_path / "missing.txt"), "--root", str(root), "--out", out])
    (tmp_path / "bad.txt").write_text("Ann_A/Ann_A_0001.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: cannot parse"):
        prepare.main(["pairs", "--pairs", str(tmp_path / "bad.txt"), "--root", str(root), "--out", out])
