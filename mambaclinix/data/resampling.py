"""Resampling a case to the target spacing (step 4 of the preprocessing, ``docs/data.md``).

The new grid (:func:`resampled_grid`) has ``round(shape · spacing / target)`` voxels per axis, the same
orientation and the same centre as the cropped grid, so it never extends past the cropped field of view
by more than half a voxel. A case whose spacing equals the target (relative tolerance
:data:`SPACING_RTOL`) is left untouched, so that a target equal to the original spacing is exact.

:func:`resample` uses TorchIO's ``Resample``: images with ``image_interpolation="bspline"`` (3rd-order
B-spline, nnU-Net's order 3) or ``"linear"``; labels with nearest neighbour (``"nearest"``) or, like
nnU-Net, linear interpolation of the one-hot encoding followed by an argmax (``"onehot_linear"``, one
float volume per class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio

__all__ = [
    "IMAGE_INTERPOLATIONS",
    "LABEL_INTERPOLATIONS",
    "SPACING_RTOL",
    "needs_resampling",
    "resample",
    "resampled_grid",
    "spacing_of",
]

IMAGE_INTERPOLATIONS = ("bspline", "linear")
LABEL_INTERPOLATIONS = ("nearest", "onehot_linear")
SPACING_RTOL = 1e-5
"""Relative tolerance under which a case's spacing counts as the target spacing (no resampling)."""


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) per array axis of a ``(4, 4)`` affine: the norms of its first three columns."""
    s = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


def needs_resampling(spacing: Sequence[float], target_spacing: Sequence[float]) -> bool:
    """Whether ``spacing`` differs from ``target_spacing`` by more than :data:`SPACING_RTOL` on an axis."""
    return not np.allclose(spacing, target_spacing, rtol=SPACING_RTOL, atol=0)


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid with ``target_spacing``: same orientation and centre, ``round(shape · spacing / target)`` voxels.

    Returns:
        ``(shape, affine)`` of the new grid.
    """
    affine = np.asarray(affine, dtype=np.float64)
    old = np.asarray(spacing_of(affine))
    new = np.asarray(target_spacing, dtype=np.float64)
    old_shape = np.asarray(shape, dtype=np.float64)
    new_shape = np.maximum(1, np.round(old_shape * old / new)).astype(int)
    linear = affine[:3, :3] * (new / old)[None, :]
    centre = affine[:3, :3] @ ((old_shape - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ ((new_shape - 1) / 2)
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), out


def resample(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    grid: tuple[tuple[int, int, int], np.ndarray],
    image_interpolation: str = "bspline",
    label_interpolation: str = "nearest",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample an image and its label onto ``grid`` (``(shape, affine)``, e.g. :func:`resampled_grid`).

    Args:
        image: float ``(C, W, H, D)`` on the grid given by ``affine``.
        label: integer ``(W, H, D)`` on the same grid, or ``None``.
        affine: ``(4, 4)`` affine of ``image`` and ``label``.
        grid: target ``(shape, affine)``.
        image_interpolation: ``"bspline"`` or ``"linear"``.
        label_interpolation: ``"nearest"`` or ``"onehot_linear"``.

    Returns:
        float32 ``(C, *shape)`` image and int64 ``shape`` label (or ``None``).
    """
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image), affine=affine))
    if label is not None:
        if label_interpolation == "nearest":
            subject["label"] = tio.LabelMap(
                tensor=torch.from_numpy(label[None].astype(np.int32)), affine=affine
            )
        else:  # one-hot, linear, argmax (nnU-Net); the case's own classes suffice for the argmax
            k = int(label.max()) + 1
            onehot = (label[None] == np.arange(k).reshape(k, 1, 1, 1)).astype(np.float32)
            subject["onehot"] = tio.ScalarImage(tensor=torch.from_numpy(onehot), affine=affine)
    names = ["image", "label"] if "label" in subject else ["image"]
    tio.Resample(
        grid,
        image_interpolation=image_interpolation,
        label_interpolation="nearest",
        include=names,
        copy=False,
    )(subject)
    if "onehot" in subject:
        tio.Resample(grid, image_interpolation="linear", include=["onehot"], copy=False)(subject)
    out_image = subject["image"].data.numpy().astype(np.float32, copy=False)
    out_label = None
    if label is not None:
        if label_interpolation == "nearest":
            out_label = subject["label"].data[0].numpy().astype(np.int64)
        else:
            out_label = subject["onehot"].data.argmax(0).numpy().astype(np.int64)
    return out_image, out_label
