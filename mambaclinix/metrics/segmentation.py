"""torchmetrics ``Metric`` wrappers: per-class Dice, HD95 and NSD averaged over cases.

Each ``update`` computes one value per (sample, class) with :mod:`mambaclinix.metrics.functional` and adds
it to running per-class sums and counts (``dist_reduce_fx="sum"``, so DDP gathers them); ``compute``
returns the per-class mean over all samples seen (``average="none"``, shape ``(C,)``) or its mean over
classes (``average="macro"``, a scalar). Values are float64. The empty-mask values are those of the
functional module (never NaN). torchmetrics squeezes one-element results, so with a single reported class
``compute`` gives a 0-d tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

from mambaclinix.metrics.functional import check_spacing, per_class_dice, per_class_hd95, per_class_nsd

_AVERAGES = ("none", "macro")


class _PerClassCaseMean(Metric):
    """Per-class mean over cases of a per-(sample, class) metric."""

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        num_classes: int,
        include_background: bool = False,
        average: str = "none",
        spatial_dims: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"{name}: num_classes must be an int >= 1 (background included), got {num_classes!r}."
            )
        if not include_background and num_classes < 2:
            raise ValueError(f"{name}: include_background=False needs num_classes >= 2, got {num_classes}.")
        if average not in _AVERAGES:
            raise ValueError(f"{name}: average must be one of {_AVERAGES}, got {average!r}.")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"{name}: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}.")
        self.num_classes = num_classes
        self.include_background = bool(include_background)
        self.average = average
        self.spatial_dims = spatial_dims
        n = num_classes - (0 if include_background else 1)
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def _accumulate(self, values: torch.Tensor) -> None:
        values = values.to(self.total.device, torch.float64)
        self.total += values.sum(dim=0)
        self.count += values.shape[0]

    def compute(self) -> torch.Tensor:
        """Per-class mean ``(C,)`` (``average="none"``) or the mean over classes (``"macro"``)."""
        if not bool((self.count > 0).all()):
            raise ValueError(f"{type(self).__name__}.compute() called before any update().")
        per_class = self.total / self.count
        return per_class if self.average == "none" else per_class.mean()


class _SpacingAware(_PerClassCaseMean):
    """A per-class case mean whose value depends on the voxel spacing (a default, overridable per batch);
    subclasses define ``_per_class(preds, target, spacing)``, the ``(B, C)`` values of one batch."""

    def update(
        self,
        preds: torch.Tensor,
        target: torch.Tensor,
        spacing: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Add one batch; ``spacing`` (``(D,)`` or per sample ``(B, D)``) overrides the default."""
        self._accumulate(self._per_class(preds, target, self.spacing if spacing is None else spacing))


class PerClassDice(_PerClassCaseMean):
    """Per-class Dice averaged over cases (both empty → 1, one empty → 0).

    Args:
        num_classes: K, background included.
        include_background: report class 0 too. Default False.
        average: ``"none"`` (per class, ``(C,)``) or ``"macro"`` (mean over classes).
        spatial_dims: number of spatial dims of the inputs (3).
        **kwargs: passed to ``torchmetrics.Metric``.

    ``update(preds, target)``: label maps ``(B, *spatial)`` / ``(B, 1, *spatial)`` or ``(B, K, *spatial)``
    scores (argmax over channels).
    """

    higher_is_better = True

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch."""
        self._accumulate(
            per_class_dice(preds, target, self.num_classes, self.include_background, self.spatial_dims)
        )


class HausdorffDistance95(_SpacingAware):
    """Per-class HD95 in mm averaged over cases, spacing-aware (MONAI's HD95 convention).

    Args:
        num_classes: K, background included.
        spacing: default voxel size in mm per axis (None → 1); ``update`` may override it per batch.
        include_background: report class 0 too. Default False.
        average: ``"none"`` or ``"macro"``.
        spatial_dims: number of spatial dims (3).
        percentile: the percentile (95).
        empty_distance: value when exactly one mask is empty; None → the image diagonal in mm.
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better = False

    def __init__(
        self,
        num_classes: int,
        spacing: Sequence[float] | None = None,
        include_background: bool = False,
        average: str = "none",
        spatial_dims: int = 3,
        percentile: float = 95.0,
        empty_distance: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_classes, include_background, average, spatial_dims, **kwargs)
        self.spacing = check_spacing(spacing, spatial_dims)
        if not 0 <= percentile <= 100:
            raise ValueError(f"HausdorffDistance95: percentile must be in [0, 100], got {percentile}.")
        if empty_distance is not None and not float(empty_distance) >= 0:
            raise ValueError(
                f"HausdorffDistance95: empty_distance must be >= 0 or None, got {empty_distance}."
            )
        self.percentile = float(percentile)
        self.empty_distance = None if empty_distance is None else float(empty_distance)

    def _per_class(self, preds: torch.Tensor, target: torch.Tensor, spacing) -> torch.Tensor:
        return per_class_hd95(
            preds,
            target,
            self.num_classes,
            spacing,
            self.include_background,
            self.spatial_dims,
            self.percentile,
            self.empty_distance,
        )


class NormalizedSurfaceDice(_SpacingAware):
    """Per-class normalised surface Dice at tolerance τ mm, averaged over cases, spacing-aware.

    Args:
        num_classes: K, background included.
        tolerance: τ in mm, one for all classes or one per reported class.
        spacing: default voxel size in mm per axis (None → 1); ``update`` may override it per batch.
        include_background: report class 0 too. Default False.
        average: ``"none"`` or ``"macro"``.
        spatial_dims: number of spatial dims (3).
        **kwargs: passed to ``torchmetrics.Metric``.
    """

    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        tolerance: float | Sequence[float],
        spacing: Sequence[float] | None = None,
        include_background: bool = False,
        average: str = "none",
        spatial_dims: int = 3,
        **kwargs,
    ) -> None:
        super().__init__(num_classes, include_background, average, spatial_dims, **kwargs)
        self.spacing = check_spacing(spacing, spatial_dims)
        taus = [tolerance] if np.ndim(tolerance) == 0 else list(tolerance)
        n = num_classes - (0 if include_background else 1)
        if len(taus) not in (1, n) or not all(np.isfinite(float(t)) and float(t) >= 0 for t in taus):
            raise ValueError(
                f"NormalizedSurfaceDice: tolerance must be one finite number >= 0 (mm) or {n} of them, "
                f"got {tolerance!r}."
            )
        self.tolerance = float(taus[0]) if len(taus) == 1 else tuple(float(t) for t in taus)

    def _per_class(self, preds: torch.Tensor, target: torch.Tensor, spacing) -> torch.Tensor:
        return per_class_nsd(
            preds,
            target,
            self.num_classes,
            self.tolerance,
            spacing,
            self.include_background,
            self.spatial_dims,
        )
