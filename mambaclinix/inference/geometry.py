"""Mapping predictions made on a preprocessed grid back onto the original image's grid.

The preprocessing of :mod:`mambaclinix.data.preprocessing` crops a case to its non-zero region and
resamples it to the target spacing, keeping the orientation (nnU-Net v2's order; see ``docs/data.md``).
:func:`invert_to_original` undoes both from the per-case metadata the data module puts in every batch
(``batch["meta"][i]``), so that a prediction can be written with the input file's geometry
(:func:`mambaclinix.inference.write_segmentation`). Only torch and numpy are needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ANISOTROPY_THRESHOLD", "invert_to_original", "thick_axis"]

ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net's ``ANISO_THRESHOLD``: a grid whose largest spacing exceeds this many times its smallest is
resampled separately along its one coarsest axis."""


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)


def thick_axis(
    spacing: Sequence[float], other_spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD
) -> int | None:
    """The axis nnU-Net resamples separately, with order 0, when mapping between two grids.

    nnU-Net's ``resample_data_or_seg_to_shape`` (``force_separate_z=None``): if ``spacing`` (the current
    grid's) has ``max / min > threshold``, its coarsest axis; else the same test on ``other_spacing`` (the
    new grid's); ``None`` when neither is anisotropic or the coarsest spacing is shared by two axes.
    """
    for sp in (np.asarray(spacing, np.float64), np.asarray(other_spacing, np.float64)):
        if sp.max() / sp.min() > threshold:
            axes = np.flatnonzero(np.isclose(sp, sp.max(), rtol=1e-6, atol=0))
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _interp_axis(x: torch.Tensor, coords: np.ndarray, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at fractional ``coords`` (clamped to the edges)."""
    n = x.shape[dim]
    c = np.clip(coords, 0.0, n - 1)
    rounded = np.round(c)
    c = np.where(np.abs(c - rounded) < 1e-6, rounded, c)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = torch.as_tensor(c - i0, dtype=x.dtype, device=x.device)
    shape = [1] * x.ndim
    shape[dim] = -1
    w = w.reshape(shape)
    x0 = x.index_select(dim, torch.as_tensor(i0, device=x.device))
    x1 = x.index_select(dim, torch.as_tensor(i1, device=x.device))
    return x0 + (x1 - x0) * w


def _nearest_axis(x: torch.Tensor, coords: np.ndarray, dim: int) -> torch.Tensor:
    """Order-0 interpolation of ``x`` along ``dim`` at fractional ``coords`` (clamped to the edges)."""
    n = x.shape[dim]
    index = np.floor(np.clip(coords, 0.0, n - 1) + 0.5).astype(np.int64).clip(0, n - 1)
    return x.index_select(dim, torch.as_tensor(index, device=x.device))


def _resample_axis_aligned(
    x: torch.Tensor,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    nearest_axis: int | None = None,
) -> torch.Tensor:
    """Separable resampling of ``x`` ``(K, *src)`` onto a grid whose axes are parallel to the source's:
    linear, except order 0 along ``nearest_axis``."""
    mapping = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    linear = mapping[:3, :3]
    diagonal = np.diag(linear)
    if np.abs(linear - np.diag(diagonal)).max() > 1e-4 * max(np.abs(diagonal).max(), 1e-12):
        raise ValueError("invert_to_original: the preprocessed and cropped grids are not axis-aligned")
    for axis in range(3):
        coords = diagonal[axis] * np.arange(dst_shape[axis]) + mapping[axis, 3]
        if dst_shape[axis] == x.shape[axis + 1] and np.allclose(
            coords, np.arange(dst_shape[axis]), atol=1e-6
        ):
            continue
        x = (_nearest_axis if axis == nearest_axis else _interp_axis)(x, coords, axis + 1)
    return x


def invert_to_original(
    tensor: torch.Tensor,
    meta: Mapping[str, Any],
    background: float | Sequence[float] | torch.Tensor | None = None,
    anisotropy_threshold: float | None = ANISOTROPY_THRESHOLD,
) -> torch.Tensor:
    """Map per-class maps on the preprocessed grid back onto the original image's grid.

    The tensor is resampled linearly (per channel, separable trilinear interpolation, values beyond the
    preprocessed field of view taken from its nearest edge voxel) onto the cropped grid, then pasted into
    a volume of the original shape filled with ``background``. Linear interpolation suits probabilities
    and logits alike; take the argmax *after* this call. As nnU-Net exports predictions, a thick-slice
    axis (:func:`thick_axis`: the preprocessed or the original spacing more than ``anisotropy_threshold``
    times coarser along one axis than along another) is resampled with order 0 (nearest) instead. The
    result is indexed like ``tio.ScalarImage(meta["image_paths"][0]).data[0]`` voxel for voxel, so it can
    be written with ``meta["original_affine"]`` (e.g. ``mambaclinix.inference.write_segmentation``).

    Args:
        tensor: ``(K, *meta["preprocessed_shape"])`` floating probabilities or logits (any device; kept).
        meta: the case's metadata (a batch's ``meta[i]``, or
            :func:`~mambaclinix.data.cache.meta_from_json` output); the keys used are
            ``preprocessed_shape``, ``preprocessed_affine``, ``cropped_shape``, ``cropped_affine``,
            ``original_shape`` and ``crop_bbox`` (``docs/data.md`` lists them all).
        background: value of each channel outside the crop box: a scalar, ``K`` values, or ``None`` for
            one-hot background (channel 0 gets 1, the others 0; with K = 1 everything gets 0). With
            probabilities the default is exact; with logits it argmaxes to background too.
        anisotropy_threshold: spacing ratio above which the thick axis is resampled with order 0;
            ``None``: linear on every axis.

    Returns:
        ``(K, *meta["original_shape"])`` tensor with ``tensor``'s dtype and device.
    """
    if tensor.ndim != 4:
        raise ValueError(f"invert_to_original: tensor must be (K, W, H, D), got shape {tuple(tensor.shape)}")
    expected = tuple(int(v) for v in meta["preprocessed_shape"])
    if tuple(tensor.shape[1:]) != expected:
        raise ValueError(
            f"invert_to_original: tensor spatial shape {tuple(tensor.shape[1:])} differs from the "
            f"preprocessed shape {expected} of case '{meta.get('name')}'"
        )
    x = tensor if tensor.is_floating_point() else tensor.float()
    k = x.shape[0]
    src_affine, dst_affine = np.asarray(meta["preprocessed_affine"]), np.asarray(meta["cropped_affine"])
    nearest = None
    if anisotropy_threshold is not None:
        nearest = thick_axis(_spacing(src_affine), _spacing(dst_affine), anisotropy_threshold)
    cropped = _resample_axis_aligned(
        x, src_affine, [int(v) for v in meta["cropped_shape"]], dst_affine, nearest
    )
    if background is None:
        fill = torch.zeros(k, dtype=x.dtype, device=x.device)
        if k > 1:
            fill[0] = 1
    else:
        fill = torch.as_tensor(background, dtype=x.dtype, device=x.device).reshape(-1)
        if fill.numel() == 1:
            fill = fill.expand(k)
        elif fill.numel() != k:
            raise ValueError(f"invert_to_original: background has {fill.numel()} values for {k} channels")
    shape = tuple(int(v) for v in meta["original_shape"])
    out = fill.reshape(k, 1, 1, 1).expand(k, *shape).clone()
    (a0, b0), (a1, b1), (a2, b2) = ((int(a), int(b)) for a, b in meta["crop_bbox"])
    out[:, a0:b0, a1:b1, a2:b2] = cropped
    return out
