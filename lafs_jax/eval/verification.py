"""1:1 verification on pair sets (LFW, CFP-FP, AgeDB-30 `.bin` files): 10-fold accuracy and TAR@FAR.

Protocol (InsightFace `eval/verification.py`, the InsightFace / LAFS evaluation): embeddings of both images of a
pair (usually flip-summed, see `lafs_jax.eval.embed`) are L2-normalised; the distance is the squared
L2 distance, in [0, 4]. The pairs are split into `nfolds` consecutive folds (scikit-learn `KFold`,
no shuffle). For each fold the threshold with the best accuracy on the other folds is taken from
`THRESHOLDS` = arange(0, 4, 0.01) (first best on ties, as `np.argmax`), and accuracy is measured on
the held-out fold. The result is the mean and std over folds.

TAR at a FAR (not printed by LAFS; InsightFace's VAL@FAR is a per-fold variant) is computed here
over all pairs from the ROC curve of the similarity 4 - distance (`roc.tar_at_far`, operating point
'at_most'): the highest true-accept rate whose false-accept rate does not exceed the target. It is
reported only where the set has at least 1/FAR impostor pairs, otherwise `None` (LFW's 3,000
impostors allow 1e-3 but not 1e-4). `roc.markdown_table` prints the results.

Library use: scikit-learn for the folds and the ROC curve; the threshold sweep is a vectorised NumPy
comparison (no library computes the fold-wise best-threshold accuracy).

`run_bins` is the `.bin` runner: it loads a model's variables directory, embeds every configured
pair set and prints and returns the table.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from lafs_jax.eval import embed as embed_lib
from lafs_jax.eval import roc
from lafs_jax.input.verification_bin import load_bin
from lafs_jax.numerics import l2_normalize

THRESHOLDS = np.arange(0.0, 4.0, 0.01)  # squared-L2 thresholds of the official protocol
DEFAULT_FARS = (1e-3, 1e-4)


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Squared L2 distance [N] between the L2-normalised rows of emb1 [N, D] and emb2 [N, D]."""
    e1, e2 = l2_normalize(np.asarray(emb1, np.float64)), l2_normalize(np.asarray(emb2, np.float64))
    return np.sum(np.square(e1 - e2), axis=1)


def _accuracy_table(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy [T] of predicting 'same' when dist < threshold, for every threshold."""
    predict_same = dist[None, :] < thresholds[:, None]
    return np.mean(predict_same == issame[None, :], axis=1)


def _check_pairs(emb1, emb2, issame, nfolds):
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if emb1.ndim != 2 or emb1.shape != emb2.shape:
        raise ValueError(f"verification: emb1 {emb1.shape} and emb2 {emb2.shape} must both be [N, D]")
    if emb1.shape[0] != issame.shape[0]:
        raise ValueError(f"verification: {emb1.shape[0]} embedding pairs but {issame.shape[0]} issame flags")
    if not 2 <= nfolds <= issame.shape[0]:
        raise ValueError(f"verification: nfolds={nfolds} needs 2 <= nfolds <= number of pairs ({issame.shape[0]})")
    if not np.all(np.isfinite(emb1)) or not np.all(np.isfinite(emb2)):
        raise ValueError("verification: embeddings contain NaN or inf")
    return emb1, emb2, issame


def evaluate(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, nfolds: int = 10,
             fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """10-fold verification accuracy of N pairs.

    Args:
      emb1, emb2: [N, D] embeddings of the first and second image of each pair (any scale; they are
        L2-normalised here).
      issame: [N] bool, True for genuine pairs.
      nfolds: number of consecutive folds (10 in the protocol).
      fars: false-accept rates at which TAR is reported where the pair count allows.

    Returns a dict: `accuracy` (mean over folds, in [0, 1]), `accuracy_std`, `fold_accuracies` [nfolds],
    `fold_thresholds` [nfolds] (squared-L2 threshold chosen on the other folds), `best_threshold`
    (the threshold with the best accuracy over all pairs), `tar_at_far` ({far: TAR or None}),
    `num_pairs`, `num_genuine`, `num_impostor`.
    """
    from sklearn.model_selection import KFold  # heavy (sklearn + scipy: 1.6 s at import); imported where used
    emb1, emb2, issame = _check_pairs(emb1, emb2, issame, nfolds)
    dist = pair_distances(emb1, emb2)
    fold_acc, fold_thr = [], []
    for train_idx, test_idx in KFold(n_splits=nfolds, shuffle=False).split(dist):
        train_acc = _accuracy_table(dist[train_idx], issame[train_idx], THRESHOLDS)
        best = int(np.argmax(train_acc))
        fold_thr.append(float(THRESHOLDS[best]))
        fold_acc.append(float(_accuracy_table(dist[test_idx], issame[test_idx], THRESHOLDS[best:best + 1])[0]))
    overall = _accuracy_table(dist, issame, THRESHOLDS)
    return {
        "accuracy": float(np.mean(fold_acc)),
        "accuracy_std": float(np.std(fold_acc)),
        "fold_accuracies": fold_acc,
        "fold_thresholds": fold_thr,
        "best_threshold": float(THRESHOLDS[int(np.argmax(overall))]),
        "tar_at_far": roc.tar_at_far(4.0 - dist, issame, fars, operating_point="at_most"),
        "num_pairs": int(issame.shape[0]),
        "num_genuine": int(np.sum(issame)),
        "num_impostor": int(np.sum(~issame)),
    }


def evaluate_pairs_embeddings(embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> dict:
    """`evaluate` for the `.bin` layout: embeddings [2N, D] where pair k is rows (2k, 2k+1)."""
    embeddings = np.asarray(embeddings)
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"verification: {embeddings.shape[0]} embeddings for {issame.shape[0]} pairs "
                         f"(need 2 per pair, rows 2k and 2k+1)")
    return evaluate(embeddings[0::2], embeddings[1::2], issame, nfolds)


def run_bins(variables_dir: str, bin_paths: Sequence[str], *, batch_size: int = 64, flip: bool = True,
             normalization: str | None = None, color_order: str | None = None, mesh: Any = None,
             nfolds: int = 10) -> dict[str, dict]:
    """Evaluate a checkpoint (variables directory) on `.bin` pair sets; prints and returns the table.

    Normalisation and colour order default to the ones recorded in the checkpoint's metadata (what
    training used); pass them to override (e.g. '[-0.5,0.5]' as the official evaluation scripts).
    Returns {set name (file stem): evaluate(...) dict}.
    """
    embedder = embed_lib.Embedder.from_variables_dir(variables_dir, mesh=mesh, normalization=normalization,
                                                     color_order=color_order, batch_size=batch_size)
    return evaluate_bins(embedder, bin_paths, flip=flip, nfolds=nfolds)


def evaluate_bins(embedder: Any, bin_paths: Sequence[str], *, flip: bool = True, nfolds: int = 10) -> dict[str, dict]:
    """Evaluate an `embed.Embedder` on `.bin` pair sets; prints and returns {set name: evaluate dict}."""
    results = {}
    for path in bin_paths:
        images, issame = load_bin(path, embedder.image_size)
        emb = embedder.embed(images, flip=flip)
        results[os.path.splitext(os.path.basename(path))[0]] = evaluate_pairs_embeddings(emb, issame, nfolds)
    print(roc.markdown_table(results, DEFAULT_FARS), flush=True)
    return results
