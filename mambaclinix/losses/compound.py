"""The paper's per-scale training loss: ``1·CE + 1·soft Dice + 0.8·L_TRS`` (paper §2).

The Dice term follows nnU-Net (−Dice, background excluded, smooth 1e-5) and L_TRS is ``−mean(TI)``, so the
default loss lies in ``[−1.8, +inf)``; see :mod:`mambaclinix.losses` for the sign conventions. Validation,
the softmax and the one-hot target are computed once and shared by the three terms; a term whose weight is
0 is not computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.losses._utils import (
    check_input,
    check_non_negative,
    check_reduction,
    cross_entropy_from_log_probs,
    fp32_context,
    parse_target,
    target_as_onehot,
    upcast,
)
from mambaclinix.losses.cross_entropy import CrossEntropyLoss
from mambaclinix.losses.dice import SoftDiceLoss
from mambaclinix.losses.region_tversky import RegionSpecificTverskyLoss


class DiceCETverskyLoss(nn.Module):
    """``lambda_ce·CE + lambda_dice·SoftDice + lambda_trs·L_TRS`` on one output scale (paper §2).

    Wrap it in :class:`~mambaclinix.losses.DeepSupervisionLoss` for the deep-supervision outputs.
    ``MambaClinixLoss`` is the same class.

    Args:
        lambda_ce: weight of the cross entropy (paper 1.0).
        lambda_dice: weight of the soft Dice (paper 1.0).
        lambda_trs: weight of L_TRS (paper 0.8).
        include_background: keep channel 0 in Dice and L_TRS (CE always uses every class). Default False.
        batch: batch Dice for both the Dice term and L_TRS.
        smooth_nr: Dice numerator smoothing (1e-5).
        smooth_dr: Dice denominator smoothing (1e-5).
        dice_convention: ``"nnunet"`` (−Dice, paper) or ``"monai"`` (1 − Dice).
        num_regions: L_TRS grid (default the paper's 8×8×14 in (z, y, x) array order; ``PAPER_GRID_XYZ``
            on TorchIO arrays); see :class:`RegionSpecificTverskyLoss`.
        patch_size: derive the L_TRS grid from the patch size instead.
        region_size: cell width used with ``patch_size``.
        A: L_TRS α/β lower bound (0.3).
        B: L_TRS α/β range (0.4).
        trs_smooth: L_TRS ε (1e-5).
        detach_weights: detach L_TRS's α, β.
        clamp_grid: clamp the L_TRS grid on axes smaller than it.
        ignore_index: label value ignored by all three terms (CE skips the voxels, Dice and L_TRS zero them).
        ce_weight: optional per-class weights of the cross entropy (length K).
        reduction: ``"mean"`` or ``"sum"``, applied to each term before weighting.
    """

    def __init__(
        self,
        lambda_ce: float = 1.0,
        lambda_dice: float = 1.0,
        lambda_trs: float = 0.8,
        include_background: bool = False,
        batch: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        dice_convention: str = "nnunet",
        num_regions: Sequence[int] | None = None,
        patch_size: Sequence[int] | None = None,
        region_size: int | Sequence[int] = 16,
        A: float = 0.3,
        B: float = 0.4,
        trs_smooth: float = 1e-5,
        detach_weights: bool = False,
        clamp_grid: bool = False,
        ignore_index: int | None = None,
        ce_weight: Sequence[float] | torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.lambda_ce = check_non_negative(owner, "lambda_ce", lambda_ce)
        self.lambda_dice = check_non_negative(owner, "lambda_dice", lambda_dice)
        self.lambda_trs = check_non_negative(owner, "lambda_trs", lambda_trs)
        if self.lambda_ce + self.lambda_dice + self.lambda_trs == 0:
            raise ValueError(f"{owner}: at least one of lambda_ce, lambda_dice, lambda_trs must be > 0.")
        self.reduction = check_reduction(owner, reduction, ("mean", "sum"))
        self.include_background = bool(include_background)
        self.ce = CrossEntropyLoss(weight=ce_weight, ignore_index=ignore_index, reduction=reduction)
        self.dice = SoftDiceLoss(
            include_background=include_background,
            softmax=True,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            ignore_index=ignore_index,
            convention=dice_convention,
        )
        self.trs = RegionSpecificTverskyLoss(
            num_regions=num_regions,
            patch_size=patch_size,
            region_size=region_size,
            A=A,
            B=B,
            smooth=trs_smooth,
            include_background=include_background,
            batch=batch,
            detach_weights=detach_weights,
            clamp_grid=clamp_grid,
            ignore_index=ignore_index,
            reduction=reduction,
        )
        self.ignore_index = self.ce.ignore_index

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the compound loss.

        Args:
            input: logits ``(B, K, *spatial)``, K >= 2.
            target: labels ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot ``(B, K, *spatial)``.

        Returns:
            Scalar loss.
        """
        owner = type(self).__name__
        check_input(owner, input, min_channels=2)
        self.ce.check_weight(input.shape[1])
        if self.lambda_trs > 0:
            self.trs.check_spatial(input)
        parsed = parse_target(owner, input, target, self.ignore_index)
        with fp32_context(input.device):
            log_p = F.log_softmax(upcast(input), dim=1)
            total = log_p.new_zeros(())
            if self.lambda_ce > 0:
                ce = cross_entropy_from_log_probs(log_p, parsed, self.ce.weight, self.reduction)
                total = total + self.lambda_ce * ce
            if self.lambda_dice > 0 or self.lambda_trs > 0:
                p = log_p.exp()
                g = target_as_onehot(parsed, input.shape[1], p.dtype)
                if parsed.mask is not None:
                    p = p * parsed.mask
                pg = p * g  # shared by both terms
                if self.lambda_dice > 0:
                    total = total + self.lambda_dice * self.dice.loss_from_probs(p, g, pg)
                if self.lambda_trs > 0:
                    total = total + self.lambda_trs * self.trs.loss_from_probs(p, g, pg)
            return total


MambaClinixLoss = DiceCETverskyLoss
