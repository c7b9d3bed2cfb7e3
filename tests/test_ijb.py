"""IJB 1:1 protocol on a generated IJB-format folder, against brute-force loops (InsightFace's structure)."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from lafs_jax.eval import ijb


# ------------------------------------------------------------------------------------------------
# Alignment


def _similarity(scale, angle_deg, tx, ty):
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                     [scale * math.sin(a), scale * math.cos(a), ty]])


def test_similarity_transform_recovers_a_known_transform():
    m = _similarity(1.7, 23.0, 5.0, -3.0)
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = src @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(ijb.similarity_transform(src, dst), m, atol=1e-10)


def test_similarity_transform_is_least_squares_and_never_reflects():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    mirrored = src * np.array([-1.0, 1.0]) + rng.normal(0, 0.5, (5, 2))
    m = ijb.similarity_transform(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0  # a rotation, not a reflection
    # Least squares: no small perturbation of the 4 similarity parameters lowers the error.
    def err(p):
        a, b, tx, ty = p
        mm = np.array([[a, -b, tx], [b, a, ty]])
        return np.sum((src @ mm[:, :2].T + mm[:, 2] - mirrored) ** 2)
    p0 = np.array([m[0, 0], m[1, 0], m[0, 2], m[1, 2]])
    e0 = err(p0)
    for i in range(4):
        for d in (-1e-4, 1e-4):
            q = p0.copy()
            q[i] += d
            assert err(q) >= e0 - 1e-9


def _brute_warp(image, m, size):
    """cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT 0) semantics, one output pixel at a time."""
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    h, w, c = image.shape
    out = np.zeros((size, size, c))
    for y in range(size):
        for x in range(size):
            sx, sy = inv[:2, :2] @ [x, y] + inv[:2, 2]
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    yy, xx = y0 + dy, x0 + dx
                    if 0 <= yy < h and 0 <= xx < w:
                        out[y, x] += wy * wx * image[yy, xx]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_warp_affine_matches_brute_force_bilinear():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (23, 19, 3)).astype(np.uint8)
    m = _similarity(0.8, -17.0, 2.5, 4.0)
    got = ijb.warp_affine(image, m, size=16)
    want = _brute_warp(image.astype(np.float64), m, 16)
    assert np.max(np.abs(got.astype(int) - want.astype(int))) <= 1  # rounding of x.5 only
    assert np.mean(got == want) > 0.97


def test_align_face_puts_landmarks_on_the_template():
    m = _similarity(1.3, 12.0, 10.0, 6.0)  # template -> loose-crop coordinates
    points = ijb.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2]
    image = np.zeros((170, 170, 3), np.uint8)
    for x, y in points:
        image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    aligned = ijb.align_face(image, points)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    for x, y in ijb.ARCFACE_TEMPLATE:
        xi, yi = int(round(x)), int(round(y))
        assert aligned[yi, xi].min() > 150, (x, y)
    assert aligned.mean() < 40  # only the five spots are bright


# ------------------------------------------------------------------------------------------------
# Generated IJB folder and the brute-force protocol


def _write_ijb_folder(root, rng, target="ijbc"):
    os.makedirs(os.path.join(root, "meta"))
    os.makedirs(os.path.join(root, "loose_crop"))
    n_ids, templates_per_id = 6, 3
    patterns = rng.integers(0, 256, (n_ids, 8, 8, 3)).astype(np.float64)
    rows_tm, rows_lm = [], []
    template_identity = {}
    tid, mid, img = 100, 500, 0
    for ident in range(n_ids):
        for _ in range(templates_per_id):
            tid += 1
            template_identity[tid] = ident
            for _ in range(rng.integers(1, 3)):  # media per template
                mid += 1
                for _ in range(rng.integers(1, 3)):  # frames per media
                    img += 1
                    name = f"{img}.jpg"
                    m = _similarity(rng.uniform(1.0, 1.3), rng.uniform(-15, 15), rng.uniform(5, 15), rng.uniform(5, 15))
                    face = np.kron(patterns[ident], np.ones((14, 14, 1))) + rng.normal(0, 25, (112, 112, 3))
                    face = np.clip(face, 0, 255).astype(np.uint8)
                    loose = np.zeros((150, 150, 3), np.uint8)
                    # Put the 112x112 face into the loose crop through the inverse of the alignment.
                    loose = ijb.warp_affine(face, m, size=150)
                    Image.fromarray(loose).save(os.path.join(root, "loose_crop", name), quality=95)
                    pts = ijb.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2] + rng.normal(0, 0.5, (5, 2))
                    score = rng.uniform(0.5, 1.0)
                    rows_tm.append(f"{name} {tid} {mid}")
                    rows_lm.append(name + " " + " ".join(f"{v:.3f}" for v in pts.reshape(-1)) + f" {score:.4f}")
    tids = sorted(template_identity)
    pairs = [(a, b, int(template_identity[a] == template_identity[b])) for i, a in enumerate(tids) for b in tids[i + 1:]]
    open(os.path.join(root, "meta", f"{target}_face_tid_mid.txt"), "w").write("\n".join(rows_tm) + "\n")
    open(os.path.join(root, "meta", f"{target}_name_5pts_score.txt"), "w").write("\n".join(rows_lm) + "\n")
    open(os.path.join(root, "meta", f"{target}_template_pair_label.txt"), "w").write(
        "\n".join(f"{a} {b} {l}" for a, b, l in pairs) + "\n")
    return img, len(tids), len(pairs)


class _ProjectionEmbedder:
    """A deterministic stand-in model: tanh of a fixed random projection of the pixels."""

    def __init__(self, dim=16, seed=0):
        self.w = np.random.default_rng(seed).normal(0, 1.0 / math.sqrt(112 * 112 * 3), (112 * 112 * 3, dim))

    def one(self, images):
        x = images.astype(np.float64) / 127.5 - 1.0
        return np.tanh(x.reshape(len(x), -1) @ self.w) + 0.5

    def __call__(self, images, flip):
        e = self.one(images)
        return e + self.one(images[:, :, ::-1]) if flip else e


def _brute_force_protocol(root, target, embedder, use_flip_test, use_norm_score, use_detector_score):
    t = target.lower()
    meta = [l.split() for l in open(os.path.join(root, "meta", f"{t}_face_tid_mid.txt"))]
    lms = [l.split() for l in open(os.path.join(root, "meta", f"{t}_name_5pts_score.txt"))]
    pairs = np.array([[int(v) for v in l.split()] for l in open(os.path.join(root, "meta", f"{t}_template_pair_label.txt"))])
    feats = []
    for (name, _, _), lm in zip(meta, lms):
        pts = np.array([float(v) for v in lm[1:11]]).reshape(5, 2)
        img = np.asarray(Image.open(os.path.join(root, "loose_crop", name)).convert("RGB"))
        aligned = ijb.align_face(img, pts)[None]
        e = embedder.one(aligned)[0]
        if use_flip_test:
            e = e + embedder.one(aligned[:, :, ::-1])[0]
        if not use_norm_score:
            e = e / np.linalg.norm(e)
        if use_detector_score:
            e = e * float(lm[11])
        feats.append(e)
    feats = np.array(feats)
    templates = np.array([int(r[1]) for r in meta])
    medias = np.array([int(r[2]) for r in meta])
    tfeat = {}
    for u in np.unique(templates):
        idx = np.where(templates == u)[0]
        media_feats = []
        for m in np.unique(medias[idx]):
            j = idx[medias[idx] == m]
            media_feats.append(feats[j[0]] if len(j) == 1 else feats[j].mean(0))
        s = np.sum(media_feats, axis=0)
        tfeat[u] = s / np.linalg.norm(s)
    scores = np.array([tfeat[a] @ tfeat[b] for a, b, _ in pairs])
    return pairs[:, 2], scores


def _brute_force_tar(labels, scores, far):
    """Full ROC over every threshold; the point nearest `far`, the highest TAR on ties."""
    best = None
    for thr in np.concatenate([[np.inf], np.unique(scores)]):
        acc = scores >= thr
        fpr = np.sum(acc & (labels == 0)) / np.sum(labels == 0)
        tpr = np.sum(acc & (labels == 1)) / np.sum(labels == 1)
        key = (abs(fpr - far), -tpr)
        if best is None or key < best[0]:
            best = (key, tpr)
    return best[1]


@pytest.mark.parametrize("flip,norm,det", [(True, True, True), (False, False, True), (True, False, False)])
def test_protocol_equals_brute_force(tmp_path, flip, norm, det):
    rng = np.random.default_rng(7)
    root = str(tmp_path / "IJBC")
    n_img, n_tpl, n_pairs = _write_ijb_folder(root, rng)
    embedder = _ProjectionEmbedder()
    r = ijb.evaluate_target(embedder, root, "IJBC", batch_size=5, use_flip_test=flip, use_norm_score=norm,
                            use_detector_score=det)
    labels, scores = _brute_force_protocol(root, "IJBC", embedder, flip, norm, det)
    assert (r["num_images"], r["num_templates"], r["num_pairs"]) == (n_img, n_tpl, n_pairs)
    np.testing.assert_array_equal(r["labels"], labels)
    np.testing.assert_allclose(r["scores"], scores, atol=1e-9)
    for far in ijb.FARS:
        assert r["tar_at_far"][far] == pytest.approx(_brute_force_tar(labels, scores, far), abs=1e-12)
    # Identities are visible through the stand-in model: genuine pairs score higher on average.
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_report_files(tmp_path):
    rng = np.random.default_rng(8)
    root = str(tmp_path / "IJBB")
    _write_ijb_folder(root, rng, target="ijbb")
    r = ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBB", batch_size=64)
    paths = ijb.write_report({"IJBB": r}, str(tmp_path / "out"))
    assert open(paths["roc"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(paths["markdown"]).read()
    assert "| IJBB |" in table and "1e-04" in table
    summary = json.load(open(paths["json"]))
    assert summary["IJBB"]["tar_at_far"]["0.0001"] == r["tar_at_far"][1e-4]
    assert summary["IJBB"]["num_templates"] == 18


def test_meta_file_errors_name_the_file_and_line(tmp_path):
    rng = np.random.default_rng(9)
    root = str(tmp_path / "IJBC")
    _write_ijb_folder(root, rng)
    meta = os.path.join(root, "meta", "ijbc_template_pair_label.txt")
    lines = open(meta).read().splitlines()
    open(meta, "w").write("\n".join(lines[:3] + ["101 102"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt:4: expected 3"):
        ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBC")
    open(meta, "w").write("101 99999 1\n")
    with pytest.raises(ValueError, match="template 2 id 99999"):
        ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBC")
    lm = os.path.join(root, "meta", "ijbc_name_5pts_score.txt")
    rows = open(lm).read().splitlines()
    rows[1], rows[2] = rows[2], rows[1]
    open(lm, "w").write("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="IJB image 1: .* same order"):
        ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBC")
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid.txt"):
        ijb.evaluate_target(_ProjectionEmbedder(), root, "IJBB")
    with pytest.raises(ValueError, match="IJB target"):
        ijb.meta_paths(root, "IJBA")
