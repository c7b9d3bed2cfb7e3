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

1:N identification (`identification`, `evaluate_target(..., identification=True)`), which neither
InsightFace's nor LVFace's scripts ship: the 1:1 list's templates are exactly the 1:N protocol's
gallery and probe templates (IJB-C: G1 1,772 + G2 1,759 + 19,593 mixed probes = 23,124), so the same
template features are searched. Subjects come from the protocol CSVs (`identification_paths`: header
row with TEMPLATE_ID and SUBJECT_ID columns, one row per image). Each probe template is searched in
each gallery (IJB-C G1 and G2, IJB-B S1 and S2) by cosine; a probe whose subject is in the gallery is
mated, the others non-mated. Reported per gallery and averaged: closed-set rank-k identification
rates (CMC) over mated probes, and open-set TPIR at FPIR 1e-2 (and 1e-1): with threshold t chosen so
that at most FPIR x (non-mated probes) have a top-1 score above t, TPIR = the fraction of mated probes
whose mate is ranked first with a score above t (NIST FRVT's rank-1 definition).

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
RANKS = (1, 5, 10)  # closed-set identification ranks (CMC points)
FPIRS = (1e-2, 1e-1)  # open-set operating points; TPIR@FPIR=1e-2 is the usual headline
# 1:N protocol files per target: two disjoint galleries and the mixed probe list (IJB-B: S1 / S2,
# IJB-C: G1 / G2; the NIST release's names, as in InsightFace's IJB 1:N pull request #1739)
GALLERIES = {"ijbb": ("S1", "S2"), "ijbc": ("G1", "G2")}
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
# 1:N identification


def identification_paths(root: str, target: str) -> dict[str, str]:
    """{gallery name: CSV path, ..., 'probe': CSV path} of the 1:N protocol of `target` under root/meta."""
    if target.upper() not in TARGETS:
        raise ValueError(f"IJB target {target!r} is not valid; choose one of {sorted(TARGETS)}")
    t = TARGETS[target.upper()]
    out = {g: os.path.join(root, "meta", f"{t}_1N_gal_{g}.csv") for g in GALLERIES[t]}
    out["probe"] = os.path.join(root, "meta", f"{t}_1N_probe_mixed.csv")
    return out


def read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(template ids int64 [T] sorted unique, subject ids int64 [T]) from a 1:N protocol CSV (a header
    with TEMPLATE_ID and SUBJECT_ID columns, one row per image). A template listed under two subjects
    is an error naming the file and the template."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IJB 1:N protocol file not found: {path}")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty (expected a header with TEMPLATE_ID and SUBJECT_ID)")
    header = [h.strip().upper() for h in lines[0].split(",")]
    if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
        raise ValueError(f"{path}:1: header {lines[0]!r} lacks TEMPLATE_ID or SUBJECT_ID")
    ti, si = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
    pairs = {}
    for lineno, line in enumerate(lines[1:], 2):
        fields = line.split(",")
        try:
            t, s = int(fields[ti]), int(fields[si])
        except (ValueError, IndexError):
            raise ValueError(f"{path}:{lineno}: no integer TEMPLATE_ID / SUBJECT_ID in {line!r}") from None
        if pairs.setdefault(t, s) != s:
            raise ValueError(f"{path}:{lineno}: template {t} listed under subjects {pairs[t]} and {s}")
    if not pairs:
        raise ValueError(f"{path}: no rows after the header")
    templates = np.array(sorted(pairs), np.int64)
    return templates, np.array([pairs[t] for t in templates], np.int64)


def identification(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
                   gallery_subjects: np.ndarray, *, ranks: Sequence[int] = RANKS,
                   fpirs: Sequence[float] = FPIRS) -> dict[str, Any]:
    """1:N search of L2-normalised probe features [P, D] in a gallery [G, D] (cosine = dot product).

    Returns {'rank': {k: closed-set identification rate at rank k over mated probes}, 'tpir_at_fpir':
    {fpir: TPIR or None when there are fewer than 1/fpir non-mated probes}, 'num_mated',
    'num_nonmated'}. A mated probe's rank is 1 + the number of gallery entries of other subjects
    scoring strictly higher than its best mated entry. Open set: t is the (floor(fpir x N_nm) + 1)-th
    highest non-mated top-1 score, so #(non-mated top-1 > t) <= fpir x N_nm; TPIR = #(mated probes
    ranked first with top-1 score > t) / N_mated.
    """
    pf, gf = np.asarray(probe_feats, np.float64), np.asarray(gallery_feats, np.float64)
    ps, gs = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    if pf.ndim != 2 or gf.ndim != 2 or pf.shape[1] != gf.shape[1] or len(ps) != len(pf) or len(gs) != len(gf):
        raise ValueError(f"identification: probes {pf.shape} / {ps.shape} and gallery {gf.shape} / {gs.shape} must be "
                         f"[P, D] / [P] and [G, D] / [G]")
    scores = pf @ gf.T  # [P, G]
    same = ps[:, None] == gs[None, :]
    mated = same.any(axis=1)
    top1 = scores.max(axis=1)
    out: dict[str, Any] = {"num_mated": int(mated.sum()), "num_nonmated": int((~mated).sum())}
    best_mate = np.where(same, scores, -np.inf).max(axis=1)
    rank = 1 + np.sum(np.where(same, -np.inf, scores) > best_mate[:, None], axis=1)
    out["rank"] = {int(k): (float(np.mean(rank[mated] <= k)) if mated.any() else None) for k in ranks}
    nonmated = np.sort(top1[~mated])[::-1]
    out["tpir_at_fpir"] = {}
    for fpir in fpirs:
        allowed = int(np.floor(fpir * len(nonmated)))
        if len(nonmated) == 0 or allowed < 1 or not mated.any():
            out["tpir_at_fpir"][fpir] = None
            continue
        threshold = nonmated[allowed] if allowed < len(nonmated) else -np.inf
        hit = (rank == 1) & (best_mate > threshold) & mated
        out["tpir_at_fpir"][fpir] = float(hit.sum() / mated.sum())
    return out


def identify_templates(unique_templates: np.ndarray, template_feats: np.ndarray,
                       galleries: dict[str, tuple[np.ndarray, np.ndarray]],
                       probes: tuple[np.ndarray, np.ndarray], **kwargs) -> dict[str, Any]:
    """`identification` of the probe templates in each gallery ({name: (template ids, subject ids)}),
    from template features [T, D] indexed by sorted `unique_templates`; adds 'mean' (the galleries'
    average of every rate). A template without features is an error naming it."""

    def feats(ids, what):
        i = np.clip(np.searchsorted(unique_templates, ids), 0, len(unique_templates) - 1)
        missing = np.flatnonzero(unique_templates[i] != ids)
        if missing.size:
            raise ValueError(f"IJB 1:N: {what} template {ids[missing[0]]} has no image in the template list")
        return template_feats[i]

    probe_f = feats(probes[0], "probe")
    out = {name: identification(probe_f, probes[1], feats(t, f"gallery {name}"), s, **kwargs)
           for name, (t, s) in galleries.items()}
    per = list(out.values())
    mean = {"rank": {}, "tpir_at_fpir": {}}
    for section in ("rank", "tpir_at_fpir"):
        for k in per[0][section]:
            values = [r[section][k] for r in per]
            mean[section][k] = None if any(v is None for v in values) else float(np.mean(values))
    out["mean"] = mean
    return out


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
                    fars: Sequence[float] = FARS, identification: bool = False) -> dict[str, Any]:
    """Run the 1:1 protocol of one target (and, with `identification`, the 1:N protocol on the same
    template features, 'identification' in the result; see `identify_templates`).

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
    if identification:  # protocol files read (and checked) before the long embedding pass
        files = identification_paths(root, target)
        probes = read_template_subjects(files.pop("probe"))
        galleries = {name: read_template_subjects(path) for name, path in files.items()}
    batches = aligned_batches(root, names, landmarks, batch_size=batch_size, workers=workers)
    emb = np.concatenate([np.asarray(embed_batch(b, use_flip_test)) for b in batches], 0)
    if emb.shape[0] != len(names):
        raise RuntimeError(f"IJB: embedded {emb.shape[0]} images, expected {len(names)}")
    feats = image_features(emb, face_scores, use_norm_score=use_norm_score, use_detector_score=use_detector_score)
    unique_templates, tfeats = template_features(feats, templates, medias)
    scores = pair_scores(unique_templates, tfeats, t1, t2)
    fpr, tpr = roc.roc_points(scores, labels)
    out = {
        "tar_at_far": roc.tar_at_far(scores, labels, fars, operating_point="nearest"),
        "fpr": fpr, "tpr": tpr, "scores": scores, "labels": labels,
        "num_images": len(names), "num_templates": int(len(unique_templates)),
        "num_pairs": int(len(labels)), "num_genuine": int(labels.sum()),
    }
    if identification:
        out["identification"] = identify_templates(unique_templates, tfeats, galleries, probes)
    return out


def identification_table(results: dict[str, dict]) -> str:
    """Markdown rows gallery | rank-k ... | TPIR@FPIR ... of `identify_templates`' result (percent)."""
    first = next(iter(results.values()))
    ranks, fpirs = list(first["rank"]), list(first["tpir_at_fpir"])

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.2f}"

    lines = ["| gallery | " + " | ".join([f"rank-{k}" for k in ranks] + [f"TPIR@FPIR={f:g}" for f in fpirs]) + " |",
             "|---" * (1 + len(ranks) + len(fpirs)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join([pct(r["rank"][k]) for k in ranks] +
                                                [pct(r["tpir_at_fpir"][f]) for f in fpirs]) + " |")
    return "\n".join(lines)


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
    for k, v in results.items():
        if "identification" in v:
            summary[k]["identification"] = {
                g: {"rank": {str(r): x for r, x in res["rank"].items()},
                    "tpir_at_fpir": {f"{f:g}": x for f, x in res["tpir_at_fpir"].items()},
                    **{c: res[c] for c in ("num_mated", "num_nonmated") if c in res}}
                for g, res in v["identification"].items()}
            with open(md, "a") as f:
                f.write(f"\n{k} 1:N identification (%)\n\n" + identification_table(v["identification"]) + "\n")
    with open(js, "w") as f:
        json.dump(summary, f, indent=1)
    return {"roc": png, "markdown": md, "json": js}
