"""The user commands `python -m lafs_jax.embed` and `python -m lafs_jax.compare` on a tiny backbone:
folder / .npy / .rec / ArrayRecord inputs, resizing, 5-point alignment, bad images, thresholds, the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cpu_env import cpu_env
from lafs_jax import compare as compare_cli
from lafs_jax import embed as embed_cli
from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import ijb, roc
from lafs_jax.input import images as image_lib
from lafs_jax.input import sources, writers
from lafs_jax.input.synthetic import face_like_image
from lafs_jax.input.verification_bin import save_bin
from test_evaluate import write_tiny_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A randomly initialised tiny Part fViT saved as fine-tuning saves its backbone."""
    d = str(tmp_path_factory.mktemp("backbone") / "backbone")
    write_tiny_backbone(d)
    return d


@pytest.fixture(scope="module")
def embedder(backbone):
    return embed_lib.Embedder.from_variables_dir(backbone, batch_size=BATCH)


def _faces(n=6):
    return np.stack([face_like_image(i // 2, i) for i in range(n)])


def _folder(root, faces):
    """Files in an order that differs from their sorted relative paths; lossless formats, a grey .pgm and
    a non-square .png. Returns {relative path: the uint8 [112, 112, 3] image the command should see}."""
    names = ["zeta/b.png", "alpha/c.bmp", "alpha/a.png", "beta.PNG", "grey.pgm", "wide.png"]
    want = {}
    for name, face in zip(names, faces):
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name.endswith(".pgm"):
            Image.fromarray(face[..., 1]).save(path)
            want[name] = np.repeat(face[..., 1:2], 3, axis=-1)
        elif name == "wide.png":
            wide = np.concatenate([face[:, :20], face, face[:, -30:]], axis=1)  # 112 x 162
            Image.fromarray(wide).save(path)
            want[name] = wide[:, 25:137]
        else:
            Image.fromarray(face).save(path)
            want[name] = face
    open(os.path.join(root, "notes.txt"), "w").write("not an image")
    return want


def test_fit_size_centre_crops_then_resizes_bicubic():
    image = np.random.default_rng(0).integers(0, 256, (200, 160, 3), np.uint8)
    want = np.asarray(Image.fromarray(image[20:180]).resize((112, 112), Image.BICUBIC))
    np.testing.assert_array_equal(embed_cli.fit_size(image, 112), want)
    square = image[:112, :112]
    assert embed_cli.fit_size(square, 112) is square


def test_folder_embeddings_match_embedder_in_sorted_order(tmp_path, backbone, embedder):
    want = _folder(str(tmp_path / "imgs"), _faces())
    out = str(tmp_path / "out" / "emb.npy")
    info = embed_cli.run(backbone, str(tmp_path / "imgs"), out, batch=BATCH)
    order = sorted(want)
    assert info["sources"] == order == ["alpha/a.png", "alpha/c.bmp", "beta.PNG", "grey.pgm", "wide.png", "zeta/b.png"]
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape[0] == 6
    np.testing.assert_allclose(got, embedder.embed(np.stack([want[k] for k in order]), flip=True), rtol=1e-5, atol=1e-5)
    meta = json.load(open(str(tmp_path / "out" / "emb.json")))
    assert meta["sources"] == order and meta["flip"] is True and meta["image_size"] == 112
    assert meta["skipped"] == [] and meta["backbone"] == os.path.abspath(backbone)
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def test_npy_rec_and_arrayrecord_inputs_read_the_same_images(tmp_path, embedder):
    faces = _faces(4)
    np.save(tmp_path / "faces.npy", faces)
    writers.write_face_rec(str(tmp_path / "faces"), [2, 2], [image_lib.encode_image(f, "PNG") for f in faces])
    writers.rec_to_arrayrecord(sources.FaceRecordSource(str(tmp_path / "faces")), str(tmp_path / "faces.ar"))
    outs = {}
    for name in ("faces.npy", "faces.rec", "faces", "faces.ar"):
        images, srcs, skipped = embed_cli.read_images(str(tmp_path / name), 112)
        np.testing.assert_array_equal(images, faces)
        assert srcs == [0, 1, 2, 3] and skipped == []
        outs[name] = embed_cli.embed_images(embedder, images, flip=False)
    np.testing.assert_array_equal(outs["faces.npy"], outs["faces.rec"])
    np.testing.assert_allclose(outs["faces.npy"], embedder.embed(faces, flip=False), rtol=1e-5, atol=1e-5)


def test_undecodable_image_is_an_error_or_skipped(tmp_path, backbone):
    folder = tmp_path / "imgs"
    _folder(str(folder), _faces(3))
    (folder / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = str(tmp_path / "emb.npy")
    with pytest.raises(embed_cli.UserError, match=r"alpha/broken\.jpg.*--skip-bad"):
        embed_cli.run(backbone, str(folder), out)
    assert os.listdir(tmp_path) == ["imgs"]
    images, srcs, skipped = embed_cli.read_images(str(folder), 112, skip_bad=True)
    assert len(images) == 3 and "alpha/broken.jpg" not in srcs
    assert [s["source"] for s in skipped] == ["alpha/broken.jpg"] and "broken.jpg" in skipped[0]["error"]


def test_backbone_dir_errors_name_what_is_missing(tmp_path):
    with pytest.raises(embed_cli.UserError, match=r"no metadata\.json and no variables/"):
        embed_cli.check_backbone_dir(str(tmp_path))
    (tmp_path / "metadata.json").write_text("{}")
    (tmp_path / "variables").mkdir()
    with pytest.raises(embed_cli.UserError, match="no 'model' entry"):
        embed_cli.check_backbone_dir(str(tmp_path))


def test_alignment_undoes_a_known_similarity_transform(tmp_path):
    face = _faces(1)[0]
    angle, scale = np.deg2rad(25.0), 1.4
    m = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 30.0],
                  [scale * np.sin(angle), scale * np.cos(angle), 12.0]])  # template frame -> photo
    photo = ijb.warp_affine(face, m, 220)
    points = embed_cli.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
    est = ijb.similarity_transform(points, embed_cli.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(points @ est[:, :2].T + est[:, 2], embed_cli.ARCFACE_TEMPLATE, atol=1e-3)
    aligned = embed_cli.align([photo], points[None], 112)[0]
    inner = (slice(30, 90), slice(30, 90))  # away from the border the warp there and back only blurs
    assert np.mean(np.abs(aligned[inner].astype(float) - face[inner].astype(float))) < 4.0

    # the CSV: a header, rows by relative path and by index, in any order
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photo).save(folder / "p1.png")
    Image.fromarray(photo).save(folder / "p0.png")
    csv = tmp_path / "lm.csv"
    flat = ",".join(f"{v:.6f}" for v in points.reshape(-1))
    csv.write_text(f"image,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5\np1.png,{flat}\n0,{flat}\n")
    lm = embed_cli.read_landmarks(str(csv), ["p0.png", "p1.png"])
    images, _, _ = embed_cli.read_images(str(folder), 112, landmarks=lm)
    np.testing.assert_array_equal(images, np.stack([aligned, aligned]))
    csv.write_text(f"p1.png,{flat}\nnobody.png,{flat}\n")
    with pytest.raises(embed_cli.UserError, match=r"lm\.csv: line 2: 'nobody\.png'"):
        embed_cli.read_landmarks(str(csv), ["p0.png", "p1.png"])
    csv.write_text(f"p1.png,{flat}\n")
    with pytest.raises(embed_cli.UserError, match="no landmark row .* 'p0.png'"):
        embed_cli.read_landmarks(str(csv), ["p0.png", "p1.png"])
    csv.write_text(f"p1.png,1,2,3\n")
    with pytest.raises(embed_cli.UserError, match="line 1: 3 numbers"):
        embed_cli.read_landmarks(str(csv), ["p0.png", "p1.png"])


def test_calibrated_threshold_is_the_at_most_operating_point():
    rng = np.random.default_rng(0)
    issame = rng.random(400) < 0.5
    scores = np.round(np.where(issame, rng.normal(0.5, 0.2, 400), rng.normal(0.0, 0.2, 400)), 2)  # with ties
    for far in (0.01, 0.05, 0.2):
        cal = compare_cli.calibrate_threshold(scores, issame, far)
        assert cal["far"] <= far
        assert cal["tar"] == pytest.approx(roc.tar_at_far(scores, issame, [far], operating_point="at_most")[far])
        lower = scores[scores < cal["threshold"]]
        if len(lower):  # the next lower threshold breaks the FAR
            assert np.mean(scores[~issame] >= lower.max()) > far
    with pytest.raises(embed_cli.UserError, match=r"where\.bin: .* impostor pairs cannot measure FAR 0\.001"):
        compare_cli.calibrate_threshold(scores, issame, 1e-3, "where.bin")


def test_metadata_threshold():
    assert compare_cli.metadata_threshold({}) is None
    assert compare_cli.metadata_threshold({"verification": {"accuracy": 0.9}}) is None
    t, where = compare_cli.metadata_threshold({"verification": {"lfw/best_threshold": 1.2, "cfp/best_threshold": 1.4}})
    assert t == pytest.approx(1 - 1.3 / 2) and "lfw/best_threshold" in where


def test_compare_similarity_and_calibration(tmp_path, backbone, embedder):
    faces = _faces(4)
    for i in (0, 2):
        Image.fromarray(faces[i]).save(tmp_path / f"{i}.png")
    r = compare_cli.compare(str(tmp_path / "0.png"), str(tmp_path / "2.png"), backbone, threshold=0.5, batch=BATCH)
    emb = embedder.embed(faces[[0, 2]], flip=True)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert r["similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
    assert r["threshold_source"] == "given" and r["verdict"] == ("same" if r["similarity"] >= 0.5 else "different")

    pairs, issame = [], []
    for k in range(8):  # 4 genuine, 4 impostor pairs
        same = k % 2 == 0
        pairs += [face_like_image(k, 0), face_like_image(k if same else k + 50, 1)]
        issame.append(same)
    bin_path = str(tmp_path / "pairs.bin")
    save_bin(bin_path, np.stack(pairs), issame, fmt="PNG")
    r = compare_cli.compare(str(tmp_path / "0.png"), str(tmp_path / "2.png"), backbone, calibrate=bin_path, far=0.25,
                            batch=BATCH)
    pe = embedder.embed(np.stack(pairs), flip=True)
    scores = compare_cli.cosine(pe[0::2], pe[1::2])
    assert r["far"] <= 0.25 and r["impostor_pairs"] == 4
    assert r["tar"] == pytest.approx(roc.tar_at_far(scores, issame, [0.25], operating_point="at_most")[0.25])
    assert r["tar"] == r["tar_at_far"] and "calibrated on" in r["threshold_source"]
    with pytest.raises(embed_cli.UserError, match=r"pairs\.bin: 4 impostor pairs cannot measure FAR 0\.1"):
        compare_cli.compare(str(tmp_path / "0.png"), str(tmp_path / "2.png"), backbone, calibrate=bin_path, far=0.1)
    with pytest.raises(embed_cli.UserError, match="pass --threshold T or --calibrate"):
        compare_cli.compare(str(tmp_path / "0.png"), str(tmp_path / "2.png"), backbone)


def _run(cache_options, *args):
    """`python -m args...` from the repo root on 2 CPU devices, sharing the session's compilation cache."""
    env = cpu_env(2, **{name.upper(): str(value) for name, value in cache_options.items()})
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_command_lines(tmp_path, backbone, embedder, compile_cache):
    folder = tmp_path / "imgs"
    want = _folder(str(folder), _faces(4))
    out = tmp_path / "emb.npy"
    p = _run(compile_cache, "lafs_jax.embed", "--backbone", backbone, "--images", str(folder), "--out", str(out), "--batch", "4")
    assert p.returncode == 0, p.stderr
    order = sorted(want)
    np.testing.assert_allclose(np.load(out), embedder.embed(np.stack([want[k] for k in order])), rtol=1e-4, atol=1e-4)
    assert json.load(open(tmp_path / "emb.json"))["sources"] == order

    p = _run(compile_cache, "lafs_jax.compare", str(folder / order[0]), str(folder / order[1]), "--backbone", backbone,
             "--threshold", "0.3", "--json", "--batch", "4")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    e = np.load(out)[:2]
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert r["similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-4) and r["threshold_source"] == "given"

    (folder / "bad.png").write_bytes(b"garbage")
    p = _run(compile_cache, "lafs_jax.embed", "--backbone", backbone, "--images", str(folder), "--out", str(tmp_path / "x.npy"))
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0, p.stderr
    assert p.stderr.startswith("FATAL ") and "bad.png" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.json").exists()


def test_main_fatal_lines(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        embed_cli.main(["--backbone", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "e.npy")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("FATAL ") and "metadata.json" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        compare_cli.main(["a.png", "b.png", "--backbone", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("FATAL --backbone") and err.count("\n") == 1
