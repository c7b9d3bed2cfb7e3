"""ROC curves of verification scores and what is read off them: TAR at FAR, the ROC plot, the table.

One `tar_at_far` for every protocol, the operating point named by its argument:
- 'at_most': the highest true-accept rate whose false-accept rate does not exceed the target,
  reported only where there are at least 1/FAR impostor pairs (else None) -- the `.bin` sets and
  the demo (`verification.evaluate`);
- 'nearest': the official IJB script (InsightFace `eval_ijbc.py`, used by LAFS): the ROC point whose
  FAR is nearest the target, nearest from the high-TAR end on ties, always reported.
Library use: scikit-learn's `roc_curve`; matplotlib's `Figure` for the plot (no pyplot, so no
backend is switched for the caller).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

OPERATING_POINTS = ("at_most", "nearest")


def roc_points(scores: np.ndarray, issame: np.ndarray, *, drop_intermediate: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve of `scores` [N] (higher = more alike) for genuine flags `issame` [N]."""
    from sklearn.metrics import roc_curve  # heavy (sklearn + scipy: 1.6 s of every process's start-up); imported where used
    fpr, tpr, _ = roc_curve(np.asarray(issame).astype(np.int32), np.asarray(scores, np.float64),
                            drop_intermediate=drop_intermediate)
    return fpr, tpr


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float], *, operating_point: str) -> dict:
    """{far: TAR (or None)} of `scores` [N] (higher = more alike) against `issame` [N] bool.

    operating_point 'at_most': highest TAR with FAR <= far over every threshold, None where fewer than
    1/far impostor pairs (or only one kind of pair) make the rate unmeasurable. 'nearest': the official
    IJB read-out, sklearn's ROC (intermediate points dropped) reversed, the point nearest each FAR.
    """
    issame = np.asarray(issame).astype(bool)
    if operating_point == "nearest":
        fpr, tpr = roc_points(scores, issame)
        fpr, tpr = np.flipud(fpr), np.flipud(tpr)
        return {float(far): float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}
    if operating_point != "at_most":
        raise ValueError(f"tar_at_far: operating_point={operating_point!r}; choose one of {OPERATING_POINTS}")
    if issame.all() or not issame.any():
        return {float(f): None for f in fars}
    fpr, tpr = roc_points(scores, issame, drop_intermediate=False)
    n_impostor = int(np.sum(~issame))
    return {float(far): None if n_impostor * far < 1.0 else float(np.max(tpr[fpr <= far])) for far in fars}


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str, *, title: str,
             far_min: float = 1e-6) -> str:
    """Write a ROC plot (PNG) of {name: (fpr, tpr)} with a log FAR axis from `far_min` to 1; returns the path."""
    from matplotlib.figure import Figure  # optional heavy dependency (0.6 s at import): only plots need it
    fig = Figure(figsize=(6, 4.5), dpi=120)
    ax = fig.subplots()
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, far_min / 10), tpr, lw=1.5, label=name)
    ax.set_xscale("log")
    ax.set_xlim(far_min, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False Accept Rate")
    ax.set_ylabel("True Accept Rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def markdown_table(results: Mapping[str, Mapping], fars: Sequence[float], *, name: str = "set") -> str:
    """Markdown table, one row per entry of {row name: result}, rates in %.

    Columns, each present when the results have its keys: pairs (`num_pairs`), accuracy ± std
    (`accuracy`, `accuracy_std`), threshold (`best_threshold`); then TAR@FAR for every far of `fars`
    (`tar_at_far`, 'n/a' where it is None).
    """
    first = next(iter(results.values()), {})
    columns = [(title, fmt) for key, title, fmt in (
        ("num_pairs", "pairs", lambda r: f"{r['num_pairs']}"),
        ("accuracy", "accuracy (%)", lambda r: f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"),
        ("best_threshold", "threshold", lambda r: f"{r['best_threshold']:.2f}")) if key in first]
    head = [name] + [t for t, _ in columns] + [f"TAR@FAR={f:.0e} (%)" for f in fars]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row_name, r in results.items():
        tars = [r["tar_at_far"].get(float(f)) for f in fars]
        cells = [row_name] + [fmt(r) for _, fmt in columns] + ["n/a" if t is None else f"{100 * t:.2f}" for t in tars]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
