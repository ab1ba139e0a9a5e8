"""Figures a person looks at in the MLflow run: training curves and the confusion matrix.

Airflow-free. matplotlib is imported inside each function, with the non-interactive
Agg backend, so importing this module costs nothing and no display is needed.
Both functions write a PNG atomically and return its path.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from nightshift.artifacts import atomic_write_bytes

#: (history key, label) drawn in each panel of the curves figure, left to right.
CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("train_loss", "train loss"), ("val_loss", "val loss"))),
    ("validation accuracy", (("val_accuracy", "val accuracy"),)),
    ("learning rate", (("lr", "lr (end of epoch)"),)),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_training_curves(history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Train/val loss, val accuracy and learning rate per epoch.

    :param history: one dict per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``,
        ``lr``); a key missing from every epoch leaves its line out, a missing or non-finite value
        leaves a gap.
    :raises ValueError: ``history`` is empty.
    """
    if not history:
        raise ValueError("no epochs in the training history: nothing to plot")
    plt = _pyplot()
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(history)]
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.2 * len(CURVE_PANELS), 3.4))
    for ax, (panel, series) in zip(axes, CURVE_PANELS):
        drawn = False
        for key, label in series:
            values = [_finite(h.get(key)) for h in history]
            if all(v is None for v in values):
                continue
            ax.plot(epochs, [float("nan") if v is None else v for v in values], marker="o", ms=3, label=label)
            drawn = True
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if panel == "learning rate" and drawn:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if drawn and len(series) > 1:
            ax.legend()
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path, *,
                          title: str = "confusion matrix (test split)") -> Path:
    """Rows are the true class, columns the predicted one, in ``class_names`` order.

    Cells are coloured by the share of their row (recall per class) and show the count.

    :raises ValueError: the matrix is not K×K for K class names.
    """
    import numpy as np

    m = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if m.ndim != 2 or m.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {k} class names")
    plt = _pyplot()
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros(m.shape, dtype=float), where=rows > 0)
    side = min(3.0 + 0.45 * k, 16.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels=[str(c) for c in class_names], rotation=45 if k > 10 else 0, ha="right"
                  if k > 10 else "center")
    ax.set_yticks(range(k), labels=[str(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(m.sum())
    ax.set_title(f"{title}\naccuracy {np.trace(m) / total:.4f} on {total} images" if total else title)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8 if k <= 15 else 6,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _save(fig, path)


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None
