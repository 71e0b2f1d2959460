"""Figures of the evaluation tasks (matplotlib, Agg backend): one home for plot code.

Each function draws one PNG and returns its path; images are [H, W] in [0, 1].
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from whmae.layout import CLASS_NAMES, NUM_CLASSES  # noqa: E402

__all__ = [
    "bland_altman_panels",
    "reconstruction_figure",
    "scatter_panels",
    "segmentation_overlay",
    "tsne_panels",
    "val_curves",
]

# Class colours (RGBA); background transparent.
CLASS_COLOURS = np.array(
    [
        [0, 0, 0, 0],
        [0.9, 0.1, 0.1, 0.5],
        [0.1, 0.8, 0.1, 0.5],
        [0.1, 0.3, 1.0, 0.5],
        [1.0, 0.8, 0.0, 0.5],
        [0.8, 0.1, 0.9, 0.5],
    ]  # fmt: skip
)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _panels(count: int, size: float = 3.0):
    cols = min(count, 5)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat


def reconstruction_figure(
    path,
    rows: Sequence[str],
    columns: Sequence[str],
    images: Sequence[Sequence],
    title: str = "",
    size: float = 1.9,
) -> Path:
    """A table of greyscale panels: images[r][c] is an [H, W] array in [0, 1], an
    (array, caption) pair (caption under the panel), or a str (an empty panel saying
    why); `rows` label the rows on the left, `columns` head the columns."""
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(size * len(columns), size * len(rows) + 0.6),
        squeeze=False,
    )  # fmt: skip
    for i, row in enumerate(images):
        for j, cell in enumerate(row):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if isinstance(cell, str):
                ax.text(0.5, 0.5, cell, ha="center", va="center", fontsize=7, color="0.4",
                        transform=ax.transAxes)  # fmt: skip
                for spine in ax.spines.values():
                    spine.set_visible(False)
            else:
                image, caption = cell if isinstance(cell, tuple) else (cell, "")
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
                if caption:
                    ax.set_xlabel(caption, fontsize=7)
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(rows[i], fontsize=8)
    # Wrap the title to the figure's width (~26 characters of 8 pt text per column).
    width = max(40, int(26 * len(columns)))
    lines = [textwrap.fill(line, width) for line in title.split("\n")]
    fig.suptitle("\n".join(lines), fontsize=8)
    return _save(fig, path)


def scatter_panels(path, columns: Sequence[str], pred, target, title: str = "") -> Path:
    """Predicted vs true per phenotype (pred, target [N, K]; NaN pairs dropped), identity line."""
    pred, target = np.asarray(pred, float), np.asarray(target, float)
    fig, axes = _panels(len(columns))
    for k, (ax, column) in enumerate(zip(axes, columns, strict=False)):
        keep = np.isfinite(pred[:, k]) & np.isfinite(target[:, k])
        t, p = target[keep, k], pred[keep, k]
        ax.scatter(t, p, s=10, alpha=0.7)
        if len(t):
            lo, hi = min(t.min(), p.min()), max(t.max(), p.max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel(f"true {column}")
        ax.set_ylabel(f"predicted {column}")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def bland_altman_panels(path, columns: Sequence[str], pred, target, title: str = "") -> Path:
    """Difference (pred - true) against the mean, bias and bias -+ 1.96 SD lines."""
    pred, target = np.asarray(pred, float), np.asarray(target, float)
    fig, axes = _panels(len(columns))
    for k, (ax, column) in enumerate(zip(axes, columns, strict=False)):
        keep = np.isfinite(pred[:, k]) & np.isfinite(target[:, k])
        diff = pred[keep, k] - target[keep, k]
        mean = 0.5 * (pred[keep, k] + target[keep, k])
        ax.scatter(mean, diff, s=10, alpha=0.7)
        if len(diff) > 1:
            bias, sd = diff.mean(), diff.std(ddof=1)
            ax.axhline(bias, color="k")
            for limit in (bias - 1.96 * sd, bias + 1.96 * sd):
                ax.axhline(limit, color="k", ls="--", lw=1)
        ax.set_xlabel(f"mean {column}")
        ax.set_ylabel("predicted - true")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _labels_rgba(labels: np.ndarray) -> np.ndarray:
    return CLASS_COLOURS[np.clip(labels.astype(int), 0, NUM_CLASSES - 1)]


def segmentation_overlay(
    path, rows: Sequence[tuple[str, np.ndarray | None, np.ndarray, np.ndarray]], title: str = ""
) -> Path:
    """One row per (label, image [H, W] or None, truth [H, W], prediction [H, W])."""
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.5, 2.7 * len(rows)), squeeze=False)
    for i, (label, image, truth, pred) in enumerate(rows):
        for j, (seg, name) in enumerate(((truth, "truth"), (pred, "prediction"))):
            ax = axes[i, j]
            background = np.zeros(seg.shape) if image is None else image
            ax.imshow(background, cmap="gray", vmin=0.0, vmax=1.0)
            ax.imshow(_labels_rgba(seg), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(label)
    handles = [matplotlib.patches.Patch(color=CLASS_COLOURS[c], label=CLASS_NAMES[c])
               for c in range(1, NUM_CLASSES)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def tsne_panels(path, coords, values: Mapping[str, np.ndarray], title: str = "") -> Path:
    """t-SNE coords [N, 2], one panel per phenotype, points coloured by its quintile
    (exams without the phenotype in grey)."""
    coords = np.asarray(coords)
    fig, axes = _panels(len(values), size=3.2)
    cmap = plt.get_cmap("viridis", 5)
    for ax, (column, v) in zip(axes, values.items(), strict=False):
        v = np.asarray(v, float)
        known = np.isfinite(v)
        ax.scatter(*coords[~known].T, s=8, c="lightgrey")
        if known.any():
            edges = np.quantile(v[known], [0.2, 0.4, 0.6, 0.8])
            quintile = np.searchsorted(edges, v[known], side="right")
            points = ax.scatter(*coords[known].T, s=8, c=quintile, cmap=cmap, vmin=-0.5, vmax=4.5)
            bar = fig.colorbar(points, ax=ax, ticks=range(5), label="quintile")
            bar.ax.set_yticklabels([f"Q{q}" for q in range(1, 6)])
        ax.set_title(column)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def val_curves(path, metric: str, curves: Mapping[str, tuple], title: str = "") -> Path:
    """One metric's validation curves, one line per run: curves {run: (steps, values)};
    a marker on each run's best step when given as a third item (step, value)."""
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, curve in curves.items():
        steps, values = curve[0], curve[1]
        (line,) = ax.plot(steps, values, marker=".", label=name)
        if len(curve) > 2 and curve[2] is not None:
            ax.plot(*curve[2], marker="*", markersize=12, color=line.get_color(), ls="none")
    ax.set_xlabel("step")
    ax.set_ylabel(f"val {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"val {metric}", fontsize=9)
    return _save(fig, path)
