"""The baseline a trained network must beat on the demo: intensity-only k-means tissue classification.

:func:`kmeans_tissue_baseline` clusters the intensities inside a brain mask (no spatial context) and
:func:`kmeans_baseline_dice` scores it per tissue on a split of a demo dataset; see ``docs/demo_data.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def kmeans_tissue_baseline(
    image: np.ndarray, brain_mask: np.ndarray, n_classes: int = 3, *, iters: int = 100
) -> np.ndarray:
    """Intensity-only tissue classification: 1-D k-means inside the brain mask, clusters by mean intensity.

    Lloyd's algorithm on the intensities of the voxels in ``brain_mask``, initialised with the intensity
    quantiles ``(2j + 1) / (2 n_classes)``, j = 0..n_classes-1 (the centres of equal-count bins), so the
    result is deterministic. Clusters are sorted by their mean intensity and labelled 1..n_classes: on a T1
    image 1 = CSF (darkest), 2 = GM, 3 = WM. Outside the mask: 0. It uses no spatial information and is
    given the reference brain mask, so the segmentation network must beat it per tissue, not on the
    background.

    Args:
        image: intensities, any shape (e.g. ``(X, Y, Z)``), finite inside the mask.
        brain_mask: boolean (or 0/1) array, same shape as ``image``, with at least ``n_classes`` voxels.
        n_classes: number of tissue clusters K ≥ 2.
        iters: maximum number of Lloyd iterations (≥ 1); it stops earlier once no voxel changes cluster.

    Returns:
        ``uint8`` array, same shape as ``image``: 0 outside the mask, 1..K inside, by increasing intensity.
    """
    img = np.asarray(image)
    mask = np.asarray(brain_mask)
    if img.shape != mask.shape:
        raise ValueError(f"image and brain_mask must have the same shape, got {img.shape} and {mask.shape}.")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("brain_mask must be boolean or 0/1.")
        mask = mask.astype(bool)
    if (
        isinstance(n_classes, bool)
        or not isinstance(n_classes, (int, np.integer))
        or not 2 <= n_classes <= 255
    ):
        raise ValueError(f"n_classes must be an integer in [2, 255], got {n_classes!r}.")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}.")
    values = img[mask].astype(np.float64)
    if values.size < n_classes:
        raise ValueError(f"brain_mask must select at least n_classes={n_classes} voxels, got {values.size}.")
    if not np.isfinite(values).all():
        raise ValueError("image must be finite inside brain_mask.")

    centres = np.quantile(values, (2 * np.arange(n_classes) + 1) / (2 * n_classes))
    assign = _assign_1d(values, centres)
    for _ in range(int(iters)):
        counts = np.bincount(assign, minlength=n_classes)
        sums = np.bincount(assign, weights=values, minlength=n_classes)
        centres = np.where(counts > 0, sums / np.maximum(counts, 1), centres)  # empty cluster: keep centre
        new = _assign_1d(values, centres)
        if np.array_equal(new, assign):
            break
        assign = new
    rank = np.empty(n_classes, dtype=np.int64)
    rank[np.argsort(centres, kind="stable")] = np.arange(n_classes)
    out = np.zeros(img.shape, dtype=np.uint8)
    out[mask] = (rank[assign] + 1).astype(np.uint8)
    return out


def _assign_1d(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (ties to the lower centre), via the sorted centres' midpoints."""
    order = np.argsort(centres, kind="stable")
    sorted_c = centres[order]
    midpoints = (sorted_c[1:] + sorted_c[:-1]) / 2
    return order[np.searchsorted(midpoints, values, side="left")]


def kmeans_baseline_dice(dataset_dir: str | os.PathLike, split: str = "test") -> dict[str, list[float]]:
    """Per-tissue Dice of :func:`kmeans_tissue_baseline` on a split of a demo dataset.

    The baseline gets each case's image and its reference brain mask (label > 0) and is scored with
    :func:`mambaclinix.metrics.dice_score` per tissue against the reference label. Its clusters are
    numbered by increasing intensity, so the dataset's non-zero labels must be 1..K in that order (demo:
    CSF < GM < WM on T1).

    Args:
        dataset_dir: a directory written by :func:`~mambaclinix.demo.build_demo_dataset`.
        split: ``"test"`` (``imagesTs``/``labelsTs``) or ``"training"``.

    Returns:
        ``{"CSF": [...], "GM": [...], "WM": [...]}``: one Dice per case, in ``dataset.json`` order.
    """
    import nibabel as nib

    from mambaclinix.metrics.functional import dice_score

    if split not in ("test", "training"):
        raise ValueError(f'split must be "test" or "training", got {split!r}.')
    root = Path(dataset_dir)
    meta = json.loads((root / "dataset.json").read_text())
    tissues = [(name, value) for name, value in meta["labels"].items() if value != 0]
    scores: dict[str, list[float]] = {name: [] for name, _ in tissues}
    for entry in meta[split]:
        if not isinstance(entry, dict) or "label" not in entry:
            raise ValueError(f"dataset.json {split!r} entries must carry a label, got {entry!r}.")
        image = np.asarray(nib.load(str(root / entry["image"])).get_fdata(dtype=np.float32))
        ref = np.asarray(nib.load(str(root / entry["label"])).dataobj).astype(np.uint8)
        pred = kmeans_tissue_baseline(image, ref > 0, n_classes=len(tissues))
        for name, value in tissues:
            scores[name].append(dice_score(pred == value, ref == value))
    return scores
