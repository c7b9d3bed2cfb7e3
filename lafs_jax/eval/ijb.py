"""IJB-B / IJB-C 1:1 verification (template-based TAR@FAR) on InsightFace's meta files.

Protocol (the official `IJB_evaluation.py`; LAFS `IJB_evaluation.py` = InsightFace `eval_ijbc.py`):

  ROOT/meta/{t}_face_tid_mid.txt        image name, template id, media id (one line per image)
  ROOT/meta/{t}_name_5pts_score.txt     image name, 5 (x, y) landmarks, faceness score
  ROOT/meta/{t}_template_pair_label.txt template 1, template 2, label (1 genuine, 0 impostor)
  ROOT/loose_crop/<image name>          the loose face crops

with t = 'ijbb' or 'ijbc'. Each image is aligned by a similarity transform from its 5 landmarks to
the ArcFace 112x112 template shifted by +8 px in x (bilinear warp, black border), embedded with its
horizontal flip (features summed when `use_flip_test`), kept unnormalised (`use_norm_score`) and
multiplied by its faceness score (`use_detector_score`) -- the N1D1F1 default. Within a template the
images of one media are averaged, the media features summed and the sum L2-normalised; a pair's score
is the dot product of its two template features. TAR at FAR 1e-6 ... 1e-1 is read from scikit-learn's
ROC curve exactly as the official script does (`roc.tar_at_far`, operating point 'nearest'): the
point whose FAR is nearest the target (nearest from the high-TAR end on ties). The headline number
is TAR@FAR=1e-4.

Written here by hand because no kept library does it: the 2-D similarity (Umeyama) estimate (scikit-
image is not a dependency; this is its `SimilarityTransform.estimate`), the template pooling and the
meta-file readers. The warp is `scipy.ndimage.affine_transform` (order 1, mode 'grid-constant' 0, so
edge pixels blend with the black border), which samples in pixel-index coordinates as OpenCV's
`warpAffine(INTER_LINEAR, BORDER_CONSTANT)` does.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

from lafs_jax.eval import roc
from lafs_jax.numerics import l2_normalize

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
HEADLINE_FAR = 1e-4
ALIGNED_SIZE = 112
# ArcFace 5-point template for 112x112 (eyes, nose tip, mouth corners), x shifted by +8 px.
ARCFACE_TEMPLATE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                             [33.5493, 92.3655], [62.7299, 92.2041]], np.float64) + np.array([8.0, 0.0])
TARGETS = {"IJBB": "ijbb", "IJBC": "ijbc"}


# ----------------------------------------------------------------------------------------------------
# Meta files


def meta_paths(root: str, target: str) -> dict[str, str]:
    """Paths of the three meta files and the image folder of `target` ('IJBB' or 'IJBC') under `root`."""
    if target.upper() not in TARGETS:
        raise ValueError(f"IJB target {target!r} is not valid; choose one of {sorted(TARGETS)}")
    t = TARGETS[target.upper()]
    return {
        "template_media": os.path.join(root, "meta", f"{t}_face_tid_mid.txt"),
        "landmarks": os.path.join(root, "meta", f"{t}_name_5pts_score.txt"),
        "pairs": os.path.join(root, "meta", f"{t}_template_pair_label.txt"),
        "images": os.path.join(root, "loose_crop"),
    }


def _rows(path: str, ncols: int | None, what: str) -> list[list[str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB {what} file not found: {path}")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if ncols is not None and len(parts) != ncols:
                raise ValueError(f"{path}:{lineno}: expected {ncols} space-separated fields ({what}), "
                                 f"got {len(parts)}: {line.strip()!r}")
            rows.append(parts)
    if not rows:
        raise ValueError(f"{path}: no lines ({what})")
    return rows


def _ints(path: str, rows: list[list[str]], cols: Sequence[int]) -> np.ndarray:
    try:
        return np.array([[int(r[c]) for c in cols] for r in rows], np.int64)
    except ValueError as e:
        raise ValueError(f"{path}: non-integer id field ({e})") from None


def read_template_media(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names [N], template ids int64 [N], media ids int64 [N]) from `{t}_face_tid_mid.txt`."""
    rows = _rows(path, 3, "image name, template id, media id")
    ids = _ints(path, rows, (1, 2))
    return [r[0] for r in rows], ids[:, 0], ids[:, 1]


def read_pairs(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template 1 [P], template 2 [P], label int [P] in {0, 1}) from `{t}_template_pair_label.txt`."""
    rows = _rows(path, 3, "template 1, template 2, label")
    ids = _ints(path, rows, (0, 1, 2))
    bad = np.flatnonzero((ids[:, 2] != 0) & (ids[:, 2] != 1))
    if bad.size:
        raise ValueError(f"{path}:{bad[0] + 1}: label {ids[bad[0], 2]} is not 0 or 1")
    return ids[:, 0], ids[:, 1], ids[:, 2]


def read_landmarks(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names [N], landmarks float64 [N, 5, 2] (x, y) px, faceness scores [N]) from `{t}_name_5pts_score.txt`."""
    rows = _rows(path, 12, "image name, 10 landmark coordinates, faceness score")
    try:
        values = np.array([[float(v) for v in r[1:]] for r in rows], np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric landmark or score field ({e})") from None
    return [r[0] for r in rows], values[:, :10].reshape(-1, 5, 2), values[:, 10]


# ----------------------------------------------------------------------------------------------------
# Alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix M of the least-squares similarity (rotation, uniform scale, translation) mapping
    src [K, 2] onto dst [K, 2] (Umeyama 1991, without reflection): dst ≈ M[:, :2] @ src + M[:, 2]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"similarity_transform: src {src.shape} and dst {dst.shape} must both be [K>=2, 2]")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / src.shape[0]
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(cov) < 0:
        sign[1] = -1.0
    rot = u @ np.diag(sign) @ vt
    var_s = np.mean(np.sum(s0 ** 2, axis=1))
    if var_s == 0:
        raise ValueError("similarity_transform: all source points coincide")
    scale = np.sum(sig * sign) / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """uint8 [size, size, C] image with out(x, y) = image(M⁻¹ (x, y)) (pixel indices, x = column),
    bilinear, black outside -- the semantics of cv2.warpAffine(borderValue=0)."""
    image = np.asarray(image)
    full = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    # ndimage works in (row, col) = (y, x): swap the axes of the inverse map.
    a = inv[:2, :2][::-1, ::-1]
    offset = inv[:2, 2][::-1]
    out = np.empty((size, size, image.shape[2]), np.float64)
    for c in range(image.shape[2]):
        out[..., c] = ndimage.affine_transform(image[..., c].astype(np.float64), a, offset=offset,
                                               output_shape=(size, size), order=1, mode="grid-constant", cval=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """uint8 [size, size, 3] crop aligned from 5 landmarks [5, 2] to the (+8 px) ArcFace template."""
    template = ARCFACE_TEMPLATE * (size / ALIGNED_SIZE)
    return warp_affine(image, similarity_transform(landmarks, template), size)


def load_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB (grey images replicated); the error names the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"IJB image {path} cannot be read: {e}") from None


# ----------------------------------------------------------------------------------------------------
# Features, templates, scores, metrics


def image_features(embeddings: np.ndarray, face_scores: np.ndarray, *, use_norm_score: bool = True,
                   use_detector_score: bool = True) -> np.ndarray:
    """Per-image features [N, D] from embeddings [N, D] (already flip-summed when flip test is on):
    L2-normalised unless `use_norm_score`, then scaled by the faceness score if `use_detector_score`."""
    f = np.asarray(embeddings, np.float64)
    if not use_norm_score:
        f = l2_normalize(f, axis=1)
    if use_detector_score:
        f = f * np.asarray(face_scores, np.float64)[:, None]
    return f


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids [T], L2-normalised template features [T, D]).

    Images of the same (template, media) are averaged; a template is the sum of its media means.
    """
    features = np.asarray(features, np.float64)
    templates, medias = np.asarray(templates), np.asarray(medias)
    if not features.shape[0] == templates.shape[0] == medias.shape[0]:
        raise ValueError(f"template_features: {features.shape[0]} features, {templates.shape[0]} template ids, "
                         f"{medias.shape[0]} media ids")
    keys, media_of = np.unique(np.stack([templates, medias], 1), axis=0, return_inverse=True)
    media_of = media_of.reshape(-1)
    media_sum = np.zeros((keys.shape[0], features.shape[1]))
    np.add.at(media_sum, media_of, features)
    media_mean = media_sum / np.bincount(media_of, minlength=keys.shape[0])[:, None]
    unique_templates, template_of = np.unique(keys[:, 0], return_inverse=True)
    tsum = np.zeros((unique_templates.shape[0], features.shape[1]))
    np.add.at(tsum, template_of.reshape(-1), media_mean)
    return unique_templates, l2_normalize(tsum, axis=1)


def pair_scores(unique_templates: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                chunk: int = 100_000) -> np.ndarray:
    """Cosine score [P] of each template pair (dot product of normalised template features)."""
    idx = []
    for name, t in (("template 1", t1), ("template 2", t2)):
        i = np.clip(np.searchsorted(unique_templates, t), 0, len(unique_templates) - 1)
        missing = np.flatnonzero(unique_templates[i] != t)
        if missing.size:
            raise ValueError(f"IJB pair {missing[0]}: {name} id {t[missing[0]]} has no image in the template list")
        idx.append(i)
    scores = np.empty(len(t1))
    for s in range(0, len(t1), chunk):
        a, b = template_feats[idx[0][s:s + chunk]], template_feats[idx[1][s:s + chunk]]
        scores[s:s + chunk] = np.sum(a * b, axis=1)
    return scores


# ----------------------------------------------------------------------------------------------------
# Runner


class AlignedFace:
    """Picklable Grain map: image index -> aligned uint8 [112, 112, 3] RGB crop of that image."""

    def __init__(self, image_dir: str, names: Sequence[str], landmarks: np.ndarray):
        self.image_dir, self.names, self.landmarks = image_dir, list(names), np.asarray(landmarks)

    def __call__(self, i: int) -> np.ndarray:
        return align_face(load_image(os.path.join(self.image_dir, self.names[i])), self.landmarks[i])


def aligned_batches(root: str, names: Sequence[str], landmarks: np.ndarray, *, batch_size: int, workers: int = 0):
    """Grain iterator of uint8 [b, 112, 112, 3] batches of aligned crops in the order of `names`
    (the last batch may be smaller); `workers` > 0 aligns in worker processes."""
    import grain

    ds = (grain.MapDataset.range(len(names))
          .map(AlignedFace(os.path.join(root, "loose_crop"), names, landmarks))
          .batch(batch_size, drop_remainder=False)
          .to_iter_dataset())
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(ds)


def evaluate_target(embed_batch: Callable[[np.ndarray, bool], np.ndarray], root: str, target: str, *,
                    batch_size: int = 64, use_flip_test: bool = True, use_norm_score: bool = True,
                    use_detector_score: bool = True, workers: int = 0,
                    fars: Sequence[float] = FARS) -> dict[str, Any]:
    """Run the 1:1 protocol of one target.

    `embed_batch(images uint8 [b, 112, 112, 3] RGB, flip: bool) -> [b, D]` returns embeddings, the
    sum of the image's and its mirror's when `flip` (LAFS's flip test). Returns {'tar_at_far':
    {far: TAR}, 'fpr', 'tpr' (ROC arrays), 'scores', 'labels', counts}.
    """
    paths = meta_paths(root, target)
    names, templates, medias = read_template_media(paths["template_media"])
    lm_names, landmarks, face_scores = read_landmarks(paths["landmarks"])
    if len(lm_names) != len(names):
        raise ValueError(f"{paths['landmarks']} lists {len(lm_names)} images but {paths['template_media']} "
                         f"lists {len(names)}")
    for i, (a, b) in enumerate(zip(names, lm_names)):
        if a != b:
            raise ValueError(f"IJB image {i}: {paths['template_media']} names {a!r} but {paths['landmarks']} "
                             f"names {b!r} (the two lists must be in the same order)")
    t1, t2, labels = read_pairs(paths["pairs"])
    batches = aligned_batches(root, names, landmarks, batch_size=batch_size, workers=workers)
    emb = np.concatenate([np.asarray(embed_batch(b, use_flip_test)) for b in batches], 0)
    if emb.shape[0] != len(names):
        raise RuntimeError(f"IJB: embedded {emb.shape[0]} images, expected {len(names)}")
    feats = image_features(emb, face_scores, use_norm_score=use_norm_score, use_detector_score=use_detector_score)
    unique_templates, tfeats = template_features(feats, templates, medias)
    scores = pair_scores(unique_templates, tfeats, t1, t2)
    fpr, tpr = roc.roc_points(scores, labels)
    return {
        "tar_at_far": roc.tar_at_far(scores, labels, fars, operating_point="nearest"),
        "fpr": fpr, "tpr": tpr, "scores": scores, "labels": labels,
        "num_images": len(names), "num_templates": int(len(unique_templates)),
        "num_pairs": int(len(labels)), "num_genuine": int(labels.sum()),
    }


def write_report(results: dict[str, dict], workdir: str, prefix: str = "ijb") -> dict[str, str]:
    """Write PREFIX_roc.png, PREFIX_results.md and PREFIX_results.json in `workdir`; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    png = roc.plot_roc({k: (v["fpr"], v["tpr"]) for k, v in results.items()},
                       os.path.join(workdir, f"{prefix}_roc.png"), title="IJB 1:1 verification", far_min=min(FARS))
    md = os.path.join(workdir, f"{prefix}_results.md")
    with open(md, "w") as f:
        f.write("TAR (%) at FAR, 1:1 template verification\n\n" + roc.markdown_table(results, FARS) + "\n")
    js = os.path.join(workdir, f"{prefix}_results.json")
    summary = {k: {"tar_at_far": {f"{far:g}": t for far, t in v["tar_at_far"].items()},
                   **{c: v[c] for c in ("num_images", "num_templates", "num_pairs", "num_genuine")}}
               for k, v in results.items()}
    with open(js, "w") as f:
        json.dump(summary, f, indent=1)
    return {"roc": png, "markdown": md, "json": js}
