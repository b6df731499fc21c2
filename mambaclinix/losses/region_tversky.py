"""Region-specific Tversky loss L_TRS with adaptive per-region α, β (paper §2; Chen et al., IEEE TPAMI 2023).

For softmax probabilities ``p`` and one-hot labels ``g`` (no gradient), per voxel and class
``tp = p·g``, ``fp = p·(1−g)``, ``fn = (1−p)·g``. The patch is split into a fixed grid of cells (paper default
8×8×14 in the authors' ``(z, y, x)`` array order, i.e. 14 cells along x: :data:`PAPER_GRID`; on TorchIO's
``(x, y, z)`` arrays the same physical cells are :data:`PAPER_GRID_XYZ` = 14×8×8) and each statistic is
averaged per cell with adaptive average pooling, so the cells follow ``AdaptiveAvgPool3d``'s boundaries:
along an axis of length L split in n cells, cell i covers ``[floor(i·L/n), ceil((i+1)·L/n))``. Per class c
and cell r (TP, FP, FN are those cell means), with A = 0.3, B = 0.4, ε = 1e-5::

    α = A + B·(FP + ε)/(FP + FN + ε),   β = A + B·(FN + ε)/(FP + FN + ε)
    TI = (TP + ε) / (TP + α·FP + β·FN + ε)

α + β = 2A + B (1.0 by default): the weight shifts towards whichever error dominates the cell. α and β are
*not* detached by default (as in the authors' code); ``detach_weights=True`` treats them as constants.

**Sign convention**: the loss is ``L_TRS = −mean(TI)`` (the paper/nnU-Net convention, range [−1, 0], 0 is
worst): mean over cells, then over samples and foreground classes. It is *not* ``1 − TI``; the two differ by
the constant 1 and have the same gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.losses._utils import (
    check_ignore_index,
    check_input,
    check_non_negative,
    check_reduction,
    drop_background,
    fp32_context,
    parse_target,
    reduce_items,
    shape_str,
    target_as_onehot,
    upcast,
)

PAPER_GRID = (8, 8, 14)
"""The authors' grid in their array order ``(z, y, x)`` (SimpleITK arrays): 14 cells along x."""
PAPER_GRID_XYZ = (14, 8, 8)
"""The same physical grid in TorchIO's ``(x, y, z)`` array order (this library's data pipeline)."""
_POOLS = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def grid_from_patch_size(patch_size: Sequence[int], region_size: int | Sequence[int] = 16) -> tuple[int, ...]:
    """Region grid derived from the patch size: ``n_d = max(1, patch_size[d] // region_size[d])``.

    Cells are then about ``region_size`` voxels wide at full resolution; e.g. a 128×128×224 patch with the
    default ``region_size=16`` gives the paper's 8×8×14 grid.

    Args:
        patch_size: full-resolution patch size, array axis order, 1 to 3 dims.
        region_size: target cell width in voxels (int for all axes, or one per axis).

    Returns:
        The number of cells per axis.
    """
    patch = tuple(int(p) for p in patch_size)
    if not 1 <= len(patch) <= 3 or any(p < 1 for p in patch):
        raise ValueError(f"patch_size must hold 1 to 3 positive ints, got {tuple(patch_size)}.")
    rs = (
        (int(region_size),) * len(patch)
        if isinstance(region_size, int)
        else tuple(int(r) for r in region_size)
    )
    if len(rs) != len(patch) or any(r < 1 for r in rs):
        raise ValueError(
            f"region_size must be a positive int or {len(patch)} positive ints, got {region_size!r}."
        )
    return tuple(max(1, p // r) for p, r in zip(patch, rs, strict=True))


def effective_grid(num_regions: Sequence[int], spatial: Sequence[int], clamp_grid: bool) -> tuple[int, ...]:
    """The grid actually pooled to: ``num_regions``, or ``min(n_d, L_d)`` per axis when ``clamp_grid``."""
    if clamp_grid:
        return tuple(min(int(n), int(s)) for n, s in zip(num_regions, spatial, strict=True))
    return tuple(int(n) for n in num_regions)


def region_tversky_index(
    p: torch.Tensor,
    g: torch.Tensor,
    grid: Sequence[int],
    A: float = 0.3,
    B: float = 0.4,
    smooth: float = 1e-5,
    batch: bool = False,
    detach_weights: bool = False,
    *,
    pg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive region-specific Tversky index per item, averaged over the cells.

    Args:
        p: probabilities ``(B, C, *spatial)`` (1 to 3 spatial dims).
        g: one-hot (or soft) target, same shape.
        grid: cells per spatial axis (``len(grid) == p.ndim - 2``).
        A: lower bound of α and β.
        B: range of α and β (α, β ∈ [A, A + B]).
        smooth: ε of the paper.
        batch: sum the cell statistics over the batch before forming TI.
        detach_weights: compute α, β without gradient.
        pg: ``p * g`` if the caller already has it (saves one full-size product).

    Returns:
        Mean TI over cells, shape ``(B, C)``, or ``(C,)`` when ``batch``.
    """
    pool = _POOLS[len(grid)]
    grid = tuple(int(n) for n in grid)
    tp = pool(p * g if pg is None else pg, grid)
    fp = pool(p, grid) - tp  # = cell mean of p·(1−g), by linearity of the mean
    fn = pool(g, grid) - tp  # = cell mean of (1−p)·g
    if batch:
        tp, fp, fn = tp.sum(0, keepdim=True), fp.sum(0, keepdim=True), fn.sum(0, keepdim=True)
    wfp, wfn = (fp.detach(), fn.detach()) if detach_weights else (fp, fn)
    denom = wfp + wfn + smooth
    alpha = A + B * (wfp + smooth) / denom
    beta = A + B * (wfn + smooth) / denom
    ti = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    ti = ti.flatten(2).mean(dim=2)
    return ti[0] if batch else ti


class RegionSpecificTverskyLoss(nn.Module):
    """L_TRS: the adaptive region-specific Tversky loss of paper §2, returned as ``−mean(TI)``.

    The grid is fixed at construction and used unchanged at every deep-supervision scale: adaptive average
    pooling maps any input size onto it. **Small inputs**: when an axis has fewer voxels than cells
    (L < n), ``AdaptiveAvgPool`` still makes n cells, each 1 or 2 voxels wide and overlapping (a voxel is then
    counted in several cells): this is the authors' behaviour and the default. ``clamp_grid=True`` uses
    ``min(n, L)`` cells on such an axis instead (one voxel per cell, no overlap).

    Args:
        num_regions: cells per spatial axis, array axis order. Default None: :data:`PAPER_GRID` (8×8×14,
            the authors' ``(z, y, x)`` arrays; pass :data:`PAPER_GRID_XYZ` for TorchIO's ``(x, y, z)``
            arrays, as :class:`~mambaclinix.training.SegmentationModule` does), unless ``patch_size`` is
            given. 2-D/1-D inputs need an explicit grid of matching length.
        patch_size: derive the grid from the full-resolution patch size instead (see
            :func:`grid_from_patch_size`: ``max(1, patch // region_size)`` per axis). Exclusive with
            ``num_regions``.
        region_size: cell width in voxels used with ``patch_size`` (default 16).
        A: lower bound of α, β (0.3).
        B: range of α, β (0.4).
        smooth: ε (1e-5), added to the cell means.
        include_background: keep channel 0. Default False (paper).
        batch: "batch Dice": sum the cell statistics over the batch.
        detach_weights: treat α, β as constants in the backward pass. Default False (paper).
        clamp_grid: clamp the grid to the input size on small axes (see above). Default False.
        ignore_index: label value whose voxels are excluded (p and g zeroed there before pooling).
        reduction: ``"mean" | "sum" | "none"`` over items; ``"none"`` gives ``−mean_cells(TI)`` of shape
            ``(B, C)`` (``(C,)`` with ``batch``).

    Shapes:
        input logits ``(B, K, *spatial)`` with K >= 2 (softmax is applied inside); target labels
        ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot ``(B, K, *spatial)``.
    """

    def __init__(
        self,
        num_regions: Sequence[int] | None = None,
        patch_size: Sequence[int] | None = None,
        region_size: int | Sequence[int] = 16,
        A: float = 0.3,
        B: float = 0.4,
        smooth: float = 1e-5,
        include_background: bool = False,
        batch: bool = False,
        detach_weights: bool = False,
        clamp_grid: bool = False,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if num_regions is not None and patch_size is not None:
            raise ValueError(f"{owner}: give num_regions or patch_size (to derive the grid), not both.")
        if patch_size is not None:
            try:
                grid = grid_from_patch_size(patch_size, region_size)
            except ValueError as err:
                raise ValueError(f"{owner}: {err}") from None
        elif num_regions is not None:
            grid = tuple(num_regions)
            if not 1 <= len(grid) <= 3 or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid
            ):
                raise ValueError(
                    f"{owner}: num_regions must hold 1 to 3 positive ints, got {tuple(num_regions)}."
                )
        else:
            grid = PAPER_GRID
        self.num_regions = tuple(int(n) for n in grid)
        self.A = check_non_negative(owner, "A", A)
        self.B = check_non_negative(owner, "B", B)
        if self.A + self.B == 0:
            raise ValueError(f"{owner}: A + B must be > 0 (α = β = 0 makes TI ≡ 1), got A={A}, B={B}.")
        self.smooth = check_non_negative(owner, "smooth", smooth)
        if self.smooth == 0:
            raise ValueError(f"{owner}: smooth (ε) must be > 0: empty cells give 0/0 otherwise.")
        self.include_background = bool(include_background)
        self.batch = bool(batch)
        self.detach_weights = bool(detach_weights)
        self.clamp_grid = bool(clamp_grid)
        self.ignore_index = check_ignore_index(owner, ignore_index)
        self.reduction = check_reduction(owner, reduction)

    def extra_repr(self) -> str:
        return (
            f"num_regions={self.num_regions}, A={self.A}, B={self.B}, smooth={self.smooth}, "
            f"include_background={self.include_background}, batch={self.batch}, "
            f"detach_weights={self.detach_weights}, clamp_grid={self.clamp_grid}"
        )

    def check_spatial(self, input: torch.Tensor) -> None:
        """Raise ``ValueError`` if the grid's length differs from the input's number of spatial dims."""
        if len(self.num_regions) != input.ndim - 2:
            raise ValueError(
                f"{type(self).__name__}: grid num_regions={self.num_regions} has {len(self.num_regions)} "
                f"axes but input of shape {shape_str(input.shape)} has {input.ndim - 2} spatial dims."
            )

    def loss_from_probs(
        self, p: torch.Tensor, g: torch.Tensor, pg: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reduced ``−TI`` from probabilities / target ``(B, K, *spatial)``, all K channels (no checks)."""
        grid = effective_grid(self.num_regions, p.shape[2:], self.clamp_grid)
        ti = region_tversky_index(
            p, g, grid, self.A, self.B, self.smooth, self.batch, self.detach_weights, pg=pg
        )
        return -reduce_items(drop_background(ti, self.include_background), self.reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute L_TRS.

        Args:
            input: logits ``(B, K, *spatial)``, K >= 2.
            target: labels ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot ``(B, K, *spatial)``.

        Returns:
            Scalar in [−1, 0] for ``"mean"``; see ``reduction`` for the others.
        """
        owner = type(self).__name__
        check_input(owner, input, min_channels=2)
        self.check_spatial(input)
        parsed = parse_target(owner, input, target, self.ignore_index)
        with fp32_context(input.device):
            p = torch.softmax(upcast(input), dim=1)
            g = target_as_onehot(parsed, input.shape[1], p.dtype)
            if parsed.mask is not None:
                p = p * parsed.mask
            return self.loss_from_probs(p, g)
