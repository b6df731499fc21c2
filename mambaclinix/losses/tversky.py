"""Tversky loss with fixed α, β over the whole patch (Salehi et al. 2017), MONAI-compatible (paper §2).

``TI = (TP + smooth_nr) / (TP + α·FP + β·FN + smooth_dr)`` with ``TP = Σ p·g``, ``FP = Σ p·(1−g)``,
``FN = Σ (1−p)·g`` summed over the spatial dims (and the batch with ``batch=True``; FP and FN are computed
as ``Σp − TP`` and ``Σg − TP``, equal up to rounding and two full-size products cheaper); the loss is
``1 − TI`` per item, like ``monai.losses.TverskyLoss`` (parity to 1e-6 is tested). With α = β = 0.5 it
is the soft Dice loss ``1 − Dice``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mambaclinix.losses._utils import (
    check_activation,
    check_ignore_index,
    check_input,
    check_non_negative,
    check_reduction,
    drop_background,
    fp32_context,
    parse_target,
    reduce_items,
    spatial_axes,
)
from mambaclinix.losses.dice import _prepare_probs, check_to_onehot_y


def tversky_index(
    p: torch.Tensor,
    g: torch.Tensor,
    alpha: float,
    beta: float,
    smooth_nr: float,
    smooth_dr: float,
    batch: bool,
) -> torch.Tensor:
    """Per-item Tversky index over the whole patch.

    Args:
        p: probabilities ``(B, C, *spatial)``.
        g: one-hot (or soft) target, same shape.
        alpha: weight of the false positives.
        beta: weight of the false negatives.
        smooth_nr: numerator smoothing.
        smooth_dr: denominator smoothing.
        batch: also sum over the batch.

    Returns:
        TI of shape ``(B, C)``, or ``(C,)`` when ``batch``.
    """
    axes = spatial_axes(p, batch)
    tp = (p * g).sum(dim=axes)
    fp = p.sum(dim=axes) - tp  # = Σ p·(1−g), without two more full-size products
    fn = g.sum(dim=axes) - tp  # = Σ (1−p)·g
    return (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)


class TverskyLoss(nn.Module):
    """Tversky loss ``1 − TI`` with fixed α, β; argument names and defaults as ``monai.losses.TverskyLoss``.

    Args:
        include_background: keep channel 0 (background). Default True (MONAI).
        to_onehot_y: the target holds labels ``(B, 1, *spatial)`` to one-hot encode. Default False (MONAI):
            the target must then be one-hot ``(B, K, *spatial)``. A mismatch raises ``ValueError``.
        sigmoid: apply a sigmoid to ``input``.
        softmax: apply a softmax over channels to ``input``.
        other_act: other activation callable; at most one of the three may be set.
        alpha: weight of false positives (>= 0).
        beta: weight of false negatives (>= 0).
        reduction: ``"mean" | "sum" | "none"`` over items; ``"none"`` gives ``(B, C)`` or ``(C,)`` with
            ``batch``.
        smooth_nr: numerator smoothing.
        smooth_dr: denominator smoothing.
        batch: sum TP/FP/FN over the batch before dividing.
        ignore_index: label value whose voxels are excluded (needs ``to_onehot_y=True`` label targets).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_activation(owner, sigmoid, softmax, other_act)
        self.include_background = bool(include_background)
        self.to_onehot_y = bool(to_onehot_y)
        self.sigmoid = bool(sigmoid)
        self.softmax = bool(softmax)
        self.other_act = other_act
        self.alpha = check_non_negative(owner, "alpha", alpha)
        self.beta = check_non_negative(owner, "beta", beta)
        self.reduction = check_reduction(owner, reduction)
        self.smooth_nr = check_non_negative(owner, "smooth_nr", smooth_nr)
        self.smooth_dr = check_non_negative(owner, "smooth_dr", smooth_dr)
        self.batch = bool(batch)
        self.ignore_index = check_ignore_index(owner, ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: ``(B, K, *spatial)`` logits or probabilities (per the activation flags).
            target: one-hot ``(B, K, *spatial)``, or labels ``(B, 1, *spatial)`` / ``(B, *spatial)`` with
                ``to_onehot_y=True`` (for K = 1: the binary mask).

        Returns:
            Scalar for ``"mean"``/``"sum"``; ``(B, C)`` (``(C,)`` with ``batch``) for ``"none"``.
        """
        owner = type(self).__name__
        check_input(owner, input)
        parsed = parse_target(owner, input, target, self.ignore_index)
        check_to_onehot_y(owner, self.to_onehot_y, parsed, input)
        with fp32_context(input.device):
            p, g = _prepare_probs(
                owner, input, parsed, self.sigmoid, self.softmax, self.other_act, self.include_background
            )
            ti = tversky_index(p, g, self.alpha, self.beta, self.smooth_nr, self.smooth_dr, self.batch)
            return reduce_items(1.0 - drop_background(ti, self.include_background), self.reduction)
