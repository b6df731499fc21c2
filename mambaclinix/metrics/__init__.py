"""Segmentation metrics: per-class Dice, HD95 and normalised surface Dice (paper §3, "Metrics").

Spacing-aware (anisotropic voxels, distances in mm), usable as torchmetrics ``Metric`` objects
(:class:`PerClassDice`, :class:`HausdorffDistance95`, :class:`NormalizedSurfaceDice`) or as functions
(:mod:`mambaclinix.metrics.functional`). Definitions and the empty-mask values (never NaN: both empty →
Dice 1, HD95 0, NSD 1; one empty → Dice 0, HD95 = the image diagonal in mm or ``empty_distance``, NSD 0) are
in :mod:`mambaclinix.metrics.functional`.

Why not torchmetrics' own (checked against analytic answers with torchmetrics 1.9):

* ``torchmetrics.segmentation.DiceScore`` / ``functional.segmentation.dice_score``: the values are right
  (the tests compare ours with it on non-empty masks), but a class empty in both prediction and reference
  gives NaN (and ``nanmean`` then drops that case silently). :class:`PerClassDice` is a small own
  implementation with the documented value 1 instead.
* ``torchmetrics.segmentation.HausdorffDistance``: spacing-aware and correct for *square* 2-D images, but
  it computes only the maximum (no 95th percentile), raises on 3-D inputs (its distance transform accepts
  rank-2 tensors only), gives wrong values for wide 2-D images and raises IndexError for tall ones (it
  flattens with the height instead of the width: torchmetrics issue #3300), returns inf with one empty
  mask and raises with both empty. Not usable here: own implementation (scipy's exact EDT with
  ``sampling=spacing``), equal to MONAI's ``compute_hausdorff_distance(..., percentile=95)`` and to a
  brute-force pairwise reference (tested).
* torchmetrics has no normalised surface Dice: own implementation.

The surface metrics need ``scipy`` (imported lazily, on first use).
"""

from mambaclinix.metrics.functional import (
    dice_score,
    hausdorff_distance_95,
    normalized_surface_dice,
    per_class_dice,
    per_class_hd95,
    per_class_nsd,
    surface_distances,
)
from mambaclinix.metrics.segmentation import HausdorffDistance95, NormalizedSurfaceDice, PerClassDice

__all__ = [
    "HausdorffDistance95",
    "NormalizedSurfaceDice",
    "PerClassDice",
    "dice_score",
    "hausdorff_distance_95",
    "normalized_surface_dice",
    "per_class_dice",
    "per_class_hd95",
    "per_class_nsd",
    "surface_distances",
]
