"""Cutting patches from a volume, with or without nnU-Net's rotation and scaling, on numpy arrays.

:func:`crop_padded` cuts an axis-aligned window (zeros outside the volume). :func:`spatial_patch` cuts
the patch whose voxel ``k`` (per axis) samples the volume at ``centre + M·(k − (P − 1)/2)``: ``M`` is a
rotation times a scaling (batchgenerators' ``augment_spatial``: the patch's coordinate grid, centred
on zero, is rotated and multiplied by the scale factor, so a factor above 1 samples a larger region and
shows structures smaller). Only the *enlarged crop* the transformed grid reaches (its bounding box plus
an interpolation margin) is read from the volume, which may be a memory map, and only the patch's own
voxels are interpolated: the same values as transforming the enlarged crop and cutting its centre.
Images are interpolated with a cubic spline (``order=3``, zeros beyond the volume), labels per label
value with linear interpolation and a 0.5 threshold (``order=1``, batchgenerators' ``is_seg`` rule) or
nearest (``order=0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["crop_padded", "rotation_matrix", "spatial_patch"]

_MARGIN = {0: 1, 1: 1, 2: 4, 3: 6}
"""Voxels read beyond the transformed grid's bounding box per interpolation order: enough for the
kernel, and for the cubic spline's prefilter (its influence decays by 0.268 per voxel) to see the
same neighbourhood as on the whole volume (difference below 1e-3 of the intensity range)."""


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """``(Rx·Ry·Rz)ᵀ`` for angles (radians) about array axes 0, 1 and 2 (batchgenerators'
    ``rotate_coords_3d``, which multiplies row coordinates by ``Rx·Ry·Rz``)."""
    a, b, c = (float(v) for v in angles)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return (rx @ ry @ rz).T


def crop_padded(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``volume[:, start:start + size]`` (a copy) with zeros where the window leaves the volume;
    ``volume`` is ``(C, *spatial)`` and may be a memory map (only the window is read)."""
    start = np.asarray(start, dtype=np.int64)
    size = np.asarray(size, dtype=np.int64)
    shape = np.asarray(volume.shape[1:], dtype=np.int64)
    lo = np.clip(start, 0, shape)
    hi = np.clip(start + size, 0, shape)
    window = (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))
    if np.array_equal(lo, start) and np.array_equal(hi, start + size):
        return np.array(volume[window])
    out = np.zeros((volume.shape[0], *size.tolist()), dtype=volume.dtype)
    inner = (slice(None), *(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start, strict=True)))
    if np.all(hi > lo):
        out[inner] = volume[window]
    return out


def _interpolate_labels(
    crop: np.ndarray, matrix: np.ndarray, offset: np.ndarray, shape, order: int
) -> np.ndarray:
    if order == 0:
        return ndimage.affine_transform(crop, matrix, offset, output_shape=shape, order=0, mode="constant")
    out = np.zeros(shape, dtype=crop.dtype)
    for value in np.unique(crop):  # increasing: a tie at 0.5 goes to the larger label, as in batchgenerators
        if value == 0:
            continue
        mask = (crop == value).astype(np.float32)
        weight = ndimage.affine_transform(
            mask, matrix, offset, output_shape=shape, order=order, mode="constant"
        )
        out[weight >= 0.5] = value
    return out


def spatial_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    centre: Sequence[float],
    patch_size: Sequence[int],
    matrix: np.ndarray,
    image_order: int = 3,
    label_order: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The patch of ``patch_size`` around ``centre`` (volume voxel coordinates, may be fractional),
    sampled through ``matrix`` (3×3, patch offsets → volume offsets) from ``image`` ``(C, *spatial)``
    and ``label`` ``(1, *spatial)``.

    Returns:
        ``(image patch float32 (C, *patch_size), label patch (1, *patch_size) or None)``.
    """
    size = np.asarray(patch_size, dtype=np.int64)
    shape = tuple(size.tolist())
    half = (size - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    centre = np.asarray(centre, dtype=np.float64)
    reach = matrix @ corners + centre[:, None]
    margin = max(_MARGIN[image_order], _MARGIN[label_order] if label is not None else 0)
    lo = np.floor(reach.min(axis=1)).astype(np.int64) - margin
    hi = np.ceil(reach.max(axis=1)).astype(np.int64) + margin + 1
    offset = centre - lo - matrix @ half  # patch voxel k samples the crop at matrix @ k + offset
    crop = crop_padded(image, lo, hi - lo)
    out = np.empty((image.shape[0], *shape), dtype=np.float32)
    for c in range(image.shape[0]):
        ndimage.affine_transform(
            crop[c].astype(np.float32, copy=False), matrix, offset, output_shape=shape, output=out[c],
            order=image_order, mode="constant", cval=0.0,
        )  # fmt: skip
    label_out = None
    if label is not None:
        label_out = _interpolate_labels(
            crop_padded(label, lo, hi - lo)[0], matrix, offset, shape, label_order
        )
        label_out = label_out[None]
    return out, label_out
