"""PNG figures written after ``fit`` (training curves) and ``test`` (slices with overlays)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mambaclinix.utils.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save_atomic(fig, path: Path) -> None:
    """Save a figure durably and atomically; the temporary file keeps the suffix matplotlib reads."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def plot_training_curves(metrics_csv: Path, out_png: Path) -> bool:
    """Plot ``train/loss_epoch`` and every ``val/dice_*`` column of a CSVLogger ``metrics.csv`` by epoch.

    Returns False (and writes nothing) when the file has no epoch-level values yet.
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        if not r.get("epoch"):
            continue
        epoch = int(float(r["epoch"]))
        for k, v in r.items():
            if v and (k == "train/loss_epoch" or k.startswith("val/dice")):
                series.setdefault(k, {})[epoch] = float(v)
    if not series:
        return False
    plt = _pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    for k, pts in sorted(series.items()):
        ax = ax_loss if k.startswith("train") else ax_dice
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", ms=3, label=k)
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_dice.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    _save_atomic(fig, out_png)
    plt.close(fig)
    return True


def plot_slices(cases: list[tuple], out_png: Path, class_names: list[str]) -> None:
    """One row per case: image, reference overlaid, prediction overlaid (axial slice)."""
    plt = _pyplot()
    n = max(1, len(cases))
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    K = len(class_names) + 1
    for row, (name, img, ref, pred) in zip(axes, cases, strict=False):
        for ax, (title, lab) in zip(
            row, (("image", None), ("reference", ref), ("prediction", pred)), strict=True
        ):
            ax.imshow(np.rot90(img), cmap="gray")
            if lab is not None:
                rgba = np.zeros((*lab.shape, 4))
                for c in range(1, K):
                    rgba[lab == c] = (*cmap((c - 1) % 10)[:3], 0.45)
                ax.imshow(np.rot90(rgba))
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i % 10)) for i in range(len(class_names))]
    fig.legend(handles, class_names, loc="lower center", ncol=min(len(class_names), 6), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save_atomic(fig, out_png)
    plt.close(fig)
