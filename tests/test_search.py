"""1:N search (lafs_jax/search.py) against a NumPy brute force: exact indices (ties to the lower
gallery row), on 1 and 8 devices, k = 1 .. G, padded rows never winning; the command line."""
import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cpu_env import cpu_env
from lafs_jax import search as search_lib
from lafs_jax import sharding
from lafs_jax import variables as variables_lib
from lafs_jax.input.synthetic import face_like_image
from lafs_jax.models import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G, D, NUM_PROBES = 203, 32, 37  # G not divisible by 8: 5 padded rows on the 8-device mesh


def brute_force(gallery, probes, k):
    """(scores, indices) from the whole float64 cosine matrix, ties to the lower gallery index."""
    g = gallery.astype(np.float64)
    q = probes.astype(np.float64)
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def data(seed=0):
    """Random gallery and probes with exact ties planted: duplicated gallery rows (in different
    shards on 8 devices) and probes equal to (a multiple of) a duplicated row."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((G, D)).astype(np.float32)
    probes = rng.standard_normal((NUM_PROBES, D)).astype(np.float32)
    gallery[[50, 199]] = gallery[10]
    gallery[7] = gallery[100]
    gallery[[120, 121]] = 4.0 * gallery[60]  # same direction, a power-of-two norm: exactly the same cosine
    probes[0] = gallery[10]
    probes[1] = 2.0 * gallery[100]
    probes[2] = gallery[60]
    return gallery, probes


def mesh_of(devices):
    return sharding.make_mesh(devices=jax.devices()[:devices])


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("k", [1, 5, G])
def test_search_matches_numpy_brute_force(devices, k):
    gallery, probes = data()
    scores, indices = search_lib.search(gallery, probes, k, mesh=mesh_of(devices), batch_size=16)
    ref_scores, ref_indices = brute_force(gallery, probes, k)
    assert scores.shape == indices.shape == (NUM_PROBES, k)
    assert scores.dtype == np.float32 and np.issubdtype(indices.dtype, np.integer)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_ties_go_to_the_lower_gallery_index_on_both_meshes():
    gallery, probes = data()
    results = [search_lib.search(gallery, probes, 4, mesh=mesh_of(n), batch_size=8) for n in (1, 8)]
    for scores, indices in results:
        assert list(indices[0, :3]) == [10, 50, 199] and scores[0, 0] == scores[0, 1] == scores[0, 2]
        assert list(indices[1, :2]) == [7, 100] and scores[1, 0] == scores[1, 1]
        assert list(indices[2, :3]) == [60, 120, 121]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-6)


def test_padded_rows_never_win():
    """9 rows on 8 devices (7 zero padding rows) and probes opposite to every row: each real score is
    negative, below a padding row's 0 if padding were scored, yet all k = G results are real rows."""
    rng = np.random.default_rng(1)
    gallery = np.abs(rng.standard_normal((9, 8))).astype(np.float32) + 0.1
    probes = -np.abs(rng.standard_normal((3, 8))).astype(np.float32) - 0.1
    scores, indices = search_lib.search(gallery, probes, 9, mesh=mesh_of(8))
    assert (scores < 0).all() and np.isfinite(scores).all()
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.tile(np.arange(9), (3, 1)))
    np.testing.assert_array_equal(indices, brute_force(gallery, probes, 9)[1])


def test_one_gallery_serves_many_probe_sets():
    gallery, probes = data()
    index = search_lib.shard_gallery(gallery, mesh_of(8))
    assert index.size == G and index.rows.shape == (208, D)
    for batch in (1, 7, 64):
        _, indices = index.search(probes, 3, batch_size=batch)
        np.testing.assert_array_equal(indices, brute_force(gallery, probes, 3)[1])


def test_bad_arguments_are_value_errors():
    gallery, probes = data()
    mesh = mesh_of(8)
    with pytest.raises(ValueError, match="between 1 and the gallery size 203"):
        search_lib.search(gallery, probes, G + 1, mesh=mesh)
    with pytest.raises(ValueError, match="between 1 and the gallery size"):
        search_lib.search(gallery, probes, 0, mesh=mesh)
    with pytest.raises(ValueError, match=r"\(203, 32\).*\(37, 16\)"):
        search_lib.search(gallery, probes[:, :16], 1, mesh=mesh)
    bad = gallery.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        search_lib.search(bad, probes, 1, mesh=mesh)


def _write(tmp_path, name, array, sources=None):
    path = str(tmp_path / f"{name}.npy")
    np.save(path, array)
    if sources is not None:
        with open(str(tmp_path / f"{name}.json"), "w") as f:
            json.dump({"sources": sources, "note": "as lafs_jax.embed writes it"}, f)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lafs_jax.search", *args], cwd=ROOT, env=cpu_env(8),
                          capture_output=True, text=True, timeout=120)


def test_command_line_writes_the_matches_csv(tmp_path):
    gallery, probes = data()
    gallery_path = _write(tmp_path, "gallery", gallery, [f"g/{i:03d}.jpg" for i in range(G)])
    probes_path = _write(tmp_path, "probes", probes[:4])  # no sidecar: row numbers
    out = str(tmp_path / "matches.csv")
    proc = _cli("--gallery", gallery_path, "--probes", probes_path, "--top-k", "3", "--out", out, "--batch", "3")
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["probe", "rank", "gallery", "score"]
    assert len(rows) == 1 + 4 * 3
    ref_scores, ref_indices = brute_force(gallery, probes[:4], 3)
    for p in range(4):
        for r in range(3):
            probe, rank, name, score = rows[1 + 3 * p + r]
            assert (probe, rank, name) == (str(p), str(r + 1), f"g/{ref_indices[p, r]:03d}.jpg")
            assert abs(float(score) - ref_scores[p, r]) < 1e-5
    assert [row[2] for row in rows[1:4]] == ["g/010.jpg", "g/050.jpg", "g/199.jpg"]  # the planted tie
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_command_line_fatal_errors(tmp_path, capsys):
    gallery, probes = data()
    gallery_path = _write(tmp_path, "gallery", gallery)
    probes_path = _write(tmp_path, "probes", probes[:, :16])
    out = str(tmp_path / "matches.csv")
    proc = _cli("--gallery", gallery_path, "--probes", probes_path, "--out", out)
    assert proc.returncode == 1
    assert proc.stderr.startswith("FATAL ") and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert all(s in proc.stderr for s in (gallery_path, probes_path, "(203, 32)", "(37, 16)"))
    assert not os.path.exists(out)

    def fatal(*args):
        assert search_lib.main(list(args) + ["--out", out]) == 1
        err = capsys.readouterr().err
        assert err.startswith("FATAL ") and err.count("\n") == 1, err
        return err

    small = _write(tmp_path, "small", gallery[:4], ["a", "b", "c", "d"])
    assert "--top-k 5" in fatal("--gallery", small, "--probes", small)
    assert "--top-k 0" in fatal("--gallery", small, "--probes", small, "--top-k", "0")
    assert "missing.npy" in fatal("--gallery", str(tmp_path / "missing.npy"), "--probes", small, "--top-k", "1")
    assert "folder" in fatal("--gallery", str(tmp_path), "--probes", small, "--top-k", "1")
    names = str(tmp_path / "names.json")
    with open(names, "w") as f:
        json.dump(["x", "y"], f)
    assert "2 names" in fatal("--gallery", small, "--probes", small, "--top-k", "1", "--gallery-names", names)
    assert "--batch 0" in fatal("--gallery", small, "--probes", small, "--top-k", "1", "--batch", "0")
    assert not os.path.exists(out)


def test_gallery_names_override_the_sidecar(tmp_path):
    gallery, _ = data()
    small = _write(tmp_path, "small", gallery[:4], ["a", "b", "c", "d"])
    names = str(tmp_path / "names.json")
    with open(names, "w") as f:
        json.dump({"sources": ["w", "x", "y", "z"]}, f)
    out = str(tmp_path / "m.csv")
    assert search_lib.main(["--gallery", small, "--probes", small, "--top-k", "1", "--out", out,
                            "--gallery-names", names]) == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [(r[0], r[1], r[2]) for r in rows] == [("a", "1", "w"), ("b", "1", "x"), ("c", "1", "y"), ("d", "1", "z")]
    assert all(abs(float(r[3]) - 1.0) < 1e-5 for r in rows)


def test_image_folders_are_embedded_with_the_backbone(tmp_path, capsys):
    """--backbone DIR: folders embedded as `python -m lafs_jax.embed` does; a probe that is a copy of a
    gallery image finds it at rank 1 with cosine 1; names are the images' relative paths."""
    backbone = str(tmp_path / "backbone")
    cfg = presets.model_config("tiny")
    variables = jax.jit(lambda k: presets.init_variables(cfg, k))(jax.random.key(0))
    variables_lib.save_variables(backbone, variables, {"model": variables_lib.to_json_dict(cfg),
                                                       "normalization": "[-1,1]", "color_order": "rgb",
                                                       "image_size": 112})
    faces = [face_like_image(i, i) for i in range(4)]
    for i, face in enumerate(faces):
        os.makedirs(tmp_path / "gallery" / f"id{i}", exist_ok=True)
        Image.fromarray(face).save(str(tmp_path / "gallery" / f"id{i}" / "a.png"))
    os.makedirs(tmp_path / "probes")
    Image.fromarray(faces[2]).save(str(tmp_path / "probes" / "p2.png"))
    Image.fromarray(faces[0]).save(str(tmp_path / "probes" / "p0.png"))
    out = str(tmp_path / "m.csv")
    args = ["--gallery", str(tmp_path / "gallery"), "--probes", str(tmp_path / "probes"), "--top-k", "2",
            "--out", out]
    assert search_lib.main(args) == 1
    assert "--backbone" in capsys.readouterr().err
    assert search_lib.main(args + ["--backbone", backbone]) == 0, capsys.readouterr().err
    with open(out, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[:3] for r in rows[::2]] == [["p0.png", "1", "id0/a.png"], ["p2.png", "1", "id2/a.png"]]
    assert all(abs(float(r[3]) - 1.0) < 1e-5 for r in rows[::2])
    assert search_lib.main(args + ["--backbone", str(tmp_path / "nothing")]) == 1
    assert "--backbone" in capsys.readouterr().err
