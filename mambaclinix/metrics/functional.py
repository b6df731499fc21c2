"""Functional segmentation metrics: per-class Dice, HD95 and normalised surface Dice (spacing-aware).

Definitions (pred P, reference R, binary masks on the same voxel grid, spacing s in mm per axis):

* **Dice** ``2|P∩R| / (|P| + |R|)``.
* **Surface voxels** ``∂M = M & ~erode(M)``, erosion with the face-connected structuring element (6-neighbour
  in 3-D) and everything outside the image counted as background (so a mask touching the image edge has
  surface there). Same definition as MONAI's ``get_mask_edges`` without sub-voxel areas.
* **Surface distances**: for each voxel of ∂P the Euclidean distance in mm (``sampling=spacing``) between
  voxel centres to the nearest voxel of ∂R, via ``scipy.ndimage.distance_transform_edt``; and vice versa.
* **HD95** ``max(q95(d(∂P→∂R)), q95(d(∂R→∂P)))``, q95 the 95th percentile with linear interpolation
  (``numpy.percentile``), each surface voxel counting once — MONAI's ``compute_hausdorff_distance(...,
  percentile=95)`` convention (checked in the tests).
* **NSD** at tolerance τ mm (Nikolov et al. 2021): the fraction of the two surfaces lying within τ of the
  other, ``(Σ_{∂P, d ≤ τ} a + Σ_{∂R, d ≤ τ} a) / (Σ_{∂P} a + Σ_{∂R} a)``. Each surface voxel is weighted by
  its exposed face area ``a`` (the areas ``Π_{j≠i} s_j`` of its faces that touch background), so surfaces
  normal to a coarse axis are not over-counted with anisotropic voxels; this is exact for axis-aligned
  surfaces and a staircase approximation otherwise (DeepMind's ``surface-distance`` uses marching-cube
  surfels, MONAI's default counts voxels).

Empty masks never give NaN:

============================  ======  ===================================================  =====
case                           Dice    HD95                                                 NSD
============================  ======  ===================================================  =====
both empty                     1       0                                                    1
exactly one empty              0       ``empty_distance`` (default: the image diagonal      0
                                       ``sqrt(Σ (n_d·s_d)²)`` in mm; pass ``inf`` for inf)
============================  ======  ===================================================  =====

The surface metrics run on the CPU with numpy/scipy (``scipy`` is imported lazily); Dice runs in torch on
the input's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _scipy_ndimage():
    try:
        from scipy import ndimage
    except ImportError as err:  # pragma: no cover - scipy is a dependency of the metrics
        raise ImportError(
            "mambaclinix.metrics needs scipy for surface distances (HD95, NSD): pip install scipy"
        ) from err
    return ndimage


def _to_bool_array(mask: ArrayLike, name: str) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype != np.bool_:
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{name} must be a binary mask (values 0/1 or bool), got values outside {{0, 1}}."
            )
        arr = arr.astype(bool)
    return arr


def check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """``spacing`` as ``ndim`` positive finite floats (``None`` → all 1.0); else ``ValueError``."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().tolist()
    sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).reshape(-1))
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must hold {ndim} positive finite numbers (mm per axis), got {spacing!r}.")
    return sp


def dice_score(pred: ArrayLike, ref: ArrayLike) -> float:
    """Dice of two binary masks; 1.0 when both are empty, 0.0 when exactly one is.

    Args:
        pred: binary mask, any shape.
        ref: binary mask, same shape.

    Returns:
        The Dice coefficient in [0, 1].
    """
    p = _to_bool_array(pred, "pred")
    r = _to_bool_array(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}.")
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


def _crop_to_union(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of ``p | r`` plus a one-voxel margin (clipped at the image)."""
    union = p | r
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    t = tuple(slices)
    return p[t], r[t]


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """``mask & ~erode(mask)`` with face connectivity; outside the array counts as background."""
    ndimage = _scipy_ndimage()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_face_areas(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Per-voxel exposed face area (mm², mm in 2-D): Σ over the 2·ndim face neighbours outside the mask."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    area = np.zeros(mask.shape, dtype=np.float64)
    for axis in range(mask.ndim):
        face = float(np.prod([s for j, s in enumerate(spacing) if j != axis]))
        for shift in (-1, 1):
            neighbour = np.roll(padded, shift, axis=axis)[inner]
            area += face * (mask & ~neighbour)
    return area


def surface_distances(
    pred: ArrayLike, ref: ArrayLike, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed surface distances between two non-empty binary masks, in mm.

    Args:
        pred: binary mask ``(*spatial)``.
        ref: binary mask, same shape.
        spacing: voxel size per axis in mm (default 1).

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred, area_pred, area_ref)``: distances for every surface voxel of
        ``pred`` (resp. ``ref``) to the other surface, and those voxels' exposed face areas.

    Raises:
        ValueError: if a mask is empty (the distances are undefined) or the shapes differ.
    """
    p = _to_bool_array(pred, "pred")
    r = _to_bool_array(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}.")
    if not p.any() or not r.any():
        raise ValueError("surface_distances needs two non-empty masks; handle empty masks first.")
    sp = check_spacing(spacing, p.ndim)
    p, r = _crop_to_union(p, r)
    ndimage = _scipy_ndimage()
    sp_, sr_ = surface_voxels(p), surface_voxels(r)
    dt_to_r = ndimage.distance_transform_edt(~sr_, sampling=sp)
    dt_to_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    return dt_to_r[sp_], dt_to_p[sr_], surface_face_areas(p, sp)[sp_], surface_face_areas(r, sp)[sr_]


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Physical diagonal ``sqrt(Σ (n_d·s_d)²)`` of an image, in mm."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hausdorff_distance_95(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing: Sequence[float] | None = None,
    percentile: float = 95.0,
    empty_distance: float | None = None,
) -> float:
    """Robust (95th-percentile) symmetric Hausdorff distance in mm.

    Args:
        pred: binary mask ``(*spatial)``.
        ref: binary mask, same shape.
        spacing: voxel size per axis in mm (default 1).
        percentile: the percentile (95; 100 gives the classical Hausdorff distance).
        empty_distance: value when exactly one mask is empty; None → the image diagonal in mm.

    Returns:
        ``max(q(d(∂P→∂R)), q(d(∂R→∂P)))``; 0 when both masks are empty.
    """
    p = _to_bool_array(pred, "pred")
    r = _to_bool_array(ref, "ref")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}.")
    sp = check_spacing(spacing, p.ndim)
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}.")
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return 0.0
    if not has_p or not has_r:
        return float(image_diagonal(p.shape, sp) if empty_distance is None else empty_distance)
    d_pr, d_rp, _, _ = surface_distances(p, r, sp)
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def normalized_surface_dice(
    pred: ArrayLike, ref: ArrayLike, tolerance: float, spacing: Sequence[float] | None = None
) -> float:
    """Normalised surface Dice at tolerance ``tolerance`` mm, face-area weighted (see the module docstring).

    Args:
        pred: binary mask ``(*spatial)``.
        ref: binary mask, same shape.
        tolerance: τ in mm (>= 0).
        spacing: voxel size per axis in mm (default 1).

    Returns:
        NSD in [0, 1]; 1 when both masks are empty, 0 when exactly one is.
    """
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number >= 0 (mm), got {tolerance!r}.")
    p = _to_bool_array(pred, "pred")
    r = _to_bool_array(ref, "ref")
    sp = check_spacing(spacing, p.ndim)
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}.")
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return 1.0
    if not has_p or not has_r:
        return 0.0
    d_pr, d_rp, a_p, a_r = surface_distances(p, r, sp)
    within = a_p[d_pr <= tolerance].sum() + a_r[d_rp <= tolerance].sum()
    return float(within / (a_p.sum() + a_r.sum()))


# ----------------------------------------------------------------------------------------------------------
# batched, per-class versions on label maps
# ----------------------------------------------------------------------------------------------------------
def to_label_maps(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, spatial_dims: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring ``preds`` and ``target`` to ``(B, *spatial)`` int64 label maps.

    Each may be labels ``(B, *spatial)`` / ``(B, 1, *spatial)``, or ``(B, K, *spatial)`` with K =
    ``num_classes`` (one-hot, probabilities or logits: the channel argmax is taken).

    Raises:
        ValueError: on shapes that fit none of these, mismatched shapes, or labels outside ``[0, K)``.
    """
    out = []
    for name, t in (("preds", preds), ("target", target)):
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(np.asarray(t))
        if t.ndim == spatial_dims + 1:
            lab = t
        elif t.ndim == spatial_dims + 2 and t.shape[1] == 1 and num_classes != 1:
            lab = t[:, 0]
        elif t.ndim == spatial_dims + 2 and t.shape[1] == num_classes:
            lab = t.argmax(dim=1)
        else:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected labels (B, *spatial) or (B, 1, *spatial), or "
                f"(B, K={num_classes}, *spatial) scores, with {spatial_dims} spatial dims."
            )
        if lab.is_floating_point() and not bool((lab == lab.round()).all()):
            raise ValueError(f"{name} holds non-integral label values.")
        lab = lab.long()
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
                f"found range [{int(lab.min())}, {int(lab.max())}]."
            )
        out.append(lab)
    if out[0].shape != out[1].shape:
        raise ValueError(
            f"preds and target label maps differ in shape: {tuple(out[0].shape)} vs {tuple(out[1].shape)}."
        )
    return out[0], out[1]


def _classes(num_classes: int, include_background: bool) -> list[int]:
    return list(range(0 if include_background else 1, num_classes))


def per_class_dice(
    preds: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    include_background: bool = False,
    spatial_dims: int = 3,
) -> torch.Tensor:
    """Dice per sample and class, ``(B, C)`` float64; both empty → 1, one empty → 0.

    Args:
        preds: prediction, see :func:`to_label_maps` for the accepted formats.
        target: reference, same formats.
        num_classes: K, including the background.
        include_background: include class 0.
        spatial_dims: number of spatial dims.
    """
    p, t = to_label_maps(preds, target, num_classes, spatial_dims)
    classes = torch.tensor(_classes(num_classes, include_background), device=p.device)
    view = classes.view(1, -1, *([1] * spatial_dims))
    pm = p.unsqueeze(1) == view
    tm = t.unsqueeze(1) == view
    axes = tuple(range(2, 2 + spatial_dims))
    inter = (pm & tm).sum(dim=axes).double()
    denom = (pm.sum(dim=axes) + tm.sum(dim=axes)).double()
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1), torch.ones_like(denom)).cpu()


def _per_sample_spacing(spacing, batch: int, spatial_dims: int) -> list[tuple[float, ...]]:
    if spacing is None:
        return [(1.0,) * spatial_dims] * batch
    arr = np.asarray(spacing.detach().cpu() if isinstance(spacing, torch.Tensor) else spacing, dtype=float)
    if arr.ndim == 2:
        if arr.shape[0] != batch:
            raise ValueError(f"spacing has {arr.shape[0]} rows but the batch has {batch} samples.")
        return [check_spacing(row, spatial_dims) for row in arr]
    return [check_spacing(arr, spatial_dims)] * batch


def per_class_hd95(
    preds: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    spacing: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    include_background: bool = False,
    spatial_dims: int = 3,
    percentile: float = 95.0,
    empty_distance: float | None = None,
) -> torch.Tensor:
    """HD95 in mm per sample and class, ``(B, C)`` float64 (see :func:`hausdorff_distance_95`).

    ``spacing`` is one spacing for the whole batch (``spatial_dims`` numbers) or one row per sample
    ``(B, spatial_dims)``.
    """
    p, t = to_label_maps(preds, target, num_classes, spatial_dims)
    sps = _per_sample_spacing(spacing, p.shape[0], spatial_dims)
    p, t = p.cpu().numpy(), t.cpu().numpy()
    classes = _classes(num_classes, include_background)
    out = torch.zeros(p.shape[0], len(classes), dtype=torch.float64)
    for b in range(p.shape[0]):
        for j, c in enumerate(classes):
            out[b, j] = hausdorff_distance_95(p[b] == c, t[b] == c, sps[b], percentile, empty_distance)
    return out


def per_class_nsd(
    preds: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    tolerance: float | Sequence[float],
    spacing: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    include_background: bool = False,
    spatial_dims: int = 3,
) -> torch.Tensor:
    """NSD per sample and class, ``(B, C)`` float64 (see :func:`normalized_surface_dice`).

    ``tolerance`` is one τ in mm for every class or one per reported class (C values).
    """
    p, t = to_label_maps(preds, target, num_classes, spatial_dims)
    sps = _per_sample_spacing(spacing, p.shape[0], spatial_dims)
    classes = _classes(num_classes, include_background)
    taus = [float(tolerance)] * len(classes) if np.ndim(tolerance) == 0 else [float(v) for v in tolerance]
    if len(taus) != len(classes):
        raise ValueError(
            f"tolerance must be one number or {len(classes)} (one per class), got {tolerance!r}."
        )
    p, t = p.cpu().numpy(), t.cpu().numpy()
    out = torch.zeros(p.shape[0], len(classes), dtype=torch.float64)
    for b in range(p.shape[0]):
        for j, c in enumerate(classes):
            out[b, j] = normalized_surface_dice(p[b] == c, t[b] == c, taus[j], sps[b])
    return out
