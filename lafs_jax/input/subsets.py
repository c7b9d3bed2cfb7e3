"""Reproducible subsets for the paper's few-shot / few-identity experiments, composed in one order.

`make_subset` applies, each step to the images the previous one kept (data set order is kept
throughout, so the result is a pure function of the labels and the settings):

1. k-shot (`k` > 0): k images of every identity that has at least k (identities with fewer are
   dropped, so every class has exactly k shots). `k_draw='first'` takes each identity's first k in
   data set order (deterministic); `'random'` draws the k with `seed`.
2. partition (`partition` < 1): the first int(N * partition) of the N remaining images, in data set
   order: the official `image_iter.FaceDataset(partition=...)`, which the official README applies to
   its released k-shot .rec files ("1% with 1-shot" = the 1-shot file with partition 0.01).
3. identity fraction (`identity_fraction` < 1): all the images of round(fraction * #identities)
   identities drawn with `seed` (a seeded random alternative; not in the official code).

Labels are remapped to 0..C-1 in the order of the original labels, and C (`num_classes` of the
subset) is the number of identities left, which sizes the classifier (the official code kept its
full NUM_CLASS rows). Random draws use numpy's PCG64 generator: the same settings give the same
subset on any machine.
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

K_DRAWS = ("first", "random")


def k_shot_indices(labels: np.ndarray, k: int, seed: int = 0, draw: str = "random") -> np.ndarray:
    """Sorted item indices: k items of each label that has at least k items, the first k in data set
    order (draw 'first') or k random ones (draw 'random', seeded)."""
    labels = np.asarray(labels)
    if k < 1:
        raise ValueError(f"k-shot subset needs k >= 1, got {k}")
    if draw not in K_DRAWS:
        raise ValueError(f"k-shot draw {draw!r}; choose one of {K_DRAWS}")
    within = np.arange(len(labels)) if draw == "first" else np.random.default_rng(seed).random(len(labels))
    order = np.lexsort((within, labels))  # grouped by label; within a label by position or at random
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    keep = (rank < k) & (counts[sorted_labels] >= k)
    return np.sort(order[keep])


def partition_indices(num_items: int, partition: float) -> np.ndarray:
    """The first int(num_items * partition) item indices (the official FaceDataset partition)."""
    if not 0.0 < partition <= 1.0:
        raise ValueError(f"partition must be in (0, 1], got {partition}")
    return np.arange(int(np.int64(num_items * partition)), dtype=np.int64)


def identity_fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted item indices of all the items of round(fraction * #identities) random identities (>= 1)."""
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"identity fraction must be in (0, 1], got {fraction}")
    classes = np.unique(labels)
    num_keep = max(1, int(round(fraction * len(classes))))
    chosen = np.random.default_rng(seed).choice(classes, size=num_keep, replace=False)
    return np.nonzero(np.isin(labels, chosen))[0]


def subset_indices(labels: np.ndarray, *, k: int = 0, k_draw: str = "first", partition: float = 1.0,
                   identity_fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """Sorted indices into `labels` of the composed subset (module docstring: k-shot, then partition,
    then identity fraction; a step at its neutral value, k=0 / 1.0, is skipped)."""
    labels = np.asarray(labels)
    idx = np.arange(len(labels), dtype=np.int64)
    if k:
        idx = idx[k_shot_indices(labels[idx], k, seed, k_draw)]
    if partition < 1.0:
        idx = idx[partition_indices(len(idx), partition)]
    if identity_fraction < 1.0:
        idx = idx[identity_fraction_indices(labels[idx], identity_fraction, seed)]
    return idx


def remap_labels(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels mapped to 0..C-1 keeping their order, C)."""
    classes, remapped = np.unique(np.asarray(labels), return_inverse=True)
    return remapped.astype(np.int64), len(classes)


class SubsetSource:
    """Items `indices` of `parent`, with labels remapped to 0..C-1 (`num_classes` = C). Picklable."""

    def __init__(self, parent, indices: np.ndarray, description: str = "subset"):
        self.parent = parent
        self.indices = np.asarray(indices, np.int64)
        if len(self.indices) == 0:
            raise ValueError(f"{description} of {parent!r} is empty")
        self._labels, self.num_classes = remap_labels(np.asarray(parent.labels)[self.indices])
        self.description = description
        self.color_order = getattr(parent, "color_order", "rgb")

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))

    def __getitem__(self, index: int) -> dict | None:
        index = int(index)
        item = self.parent[int(self.indices[index])]
        if item is None:
            return None
        return {**item, "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"SubsetSource({self.description}: {len(self)} images, {self.num_classes} classes of {self.parent!r})"


def make_subset(source, *, k: int = 0, k_draw: str = "first", partition: float = 1.0,
                identity_fraction: float = 1.0, seed: int = 0):
    """`source` itself when every step is neutral (k=0, partition=1, identity_fraction=1), else a
    SubsetSource of `subset_indices(source.labels, ...)`."""
    if k < 0:
        raise ValueError(f"subset k={k} must be >= 0 (0 = all images)")
    if k_draw not in K_DRAWS:
        raise ValueError(f"subset k_draw={k_draw!r}; choose one of {K_DRAWS}")
    if not k and partition == 1.0 and identity_fraction == 1.0:
        return source
    steps = ([f"{k}-shot ({k_draw}{f', seed {seed}' if k_draw == 'random' else ''})"] if k else []) + \
        ([f"first {partition:g} of the images"] if partition < 1.0 else []) + \
        ([f"{identity_fraction:g} of the identities (seed {seed})"] if identity_fraction < 1.0 else [])
    what = ", then ".join(steps)
    subset = SubsetSource(source, subset_indices(source.labels, k=k, k_draw=k_draw, partition=partition,
                                                 identity_fraction=identity_fraction, seed=seed), what)
    log.info("subset %s: %d of %d images, %d of %d classes", what, len(subset), len(source),
             subset.num_classes, source.num_classes)
    return subset
