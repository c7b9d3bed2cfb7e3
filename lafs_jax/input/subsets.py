"""Seeded, reproducible subsets for the paper's few-shot / few-identity experiments.

- k-shot: k images of every identity that has at least k (identities with fewer are dropped, so
  every class has exactly k shots); the k are drawn at random per identity.
- identity fraction: a random fraction of the identities (at least one), with all their images.

Selected items keep their dataset order; labels are remapped to 0..C-1 in the order of the original
labels, and C is `num_classes` of the subset. The same (labels, kind, k / fraction, seed) always gives
the same subset, on any machine (numpy's PCG64 generator).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

SUBSET_KINDS = ("none", "kshot", "identities")


def k_shot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted item indices: k random items of each label that has at least k items."""
    labels = np.asarray(labels)
    if k < 1:
        raise ValueError(f"k-shot subset needs k >= 1, got {k}")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(labels)), labels))  # grouped by label, random within a label
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    keep = (rank < k) & (counts[sorted_labels] >= k)
    return np.sort(order[keep])


def identity_fraction_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted item indices of all the items of round(fraction * #identities) random identities (>= 1)."""
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"identity fraction must be in (0, 1], got {fraction}")
    classes = np.unique(labels)
    num_keep = max(1, int(round(fraction * len(classes))))
    chosen = np.random.default_rng(seed).choice(classes, size=num_keep, replace=False)
    return np.nonzero(np.isin(labels, chosen))[0]


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


def make_subset(source, kind: str = "none", k: int = 1, fraction: float = 1.0, seed: int = 0):
    """`source` itself for kind 'none', else a SubsetSource ('kshot' with k, 'identities' with fraction)."""
    if kind == "none":
        return source
    if kind == "kshot":
        indices, what = k_shot_indices(source.labels, k, seed), f"{k}-shot (seed {seed})"
    elif kind == "identities":
        indices, what = identity_fraction_indices(source.labels, fraction, seed), f"{fraction:g} of identities (seed {seed})"
    else:
        raise ValueError(f"subset kind {kind!r}; choose one of {SUBSET_KINDS}")
    subset = SubsetSource(source, indices, what)
    log.info("subset %s: %d of %d images, %d of %d classes", what, len(subset), len(source),
             subset.num_classes, source.num_classes)
    return subset
