"""Soft Dice loss (nnU-Net and MONAI conventions) and a MONAI-compatible Dice + cross-entropy loss.

Paper §2 ("paper training loss"): soft Dice over the softmax, background excluded, smooth 1e-5, returned as
−Dice (nnU-Net's ``MemoryEfficientSoftDiceLoss``). :class:`DiceCELoss` reproduces ``monai.losses.DiceCELoss``
(1 − Dice, MONAI defaults) for users who want a drop-in replacement; the tests check parity with MONAI.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.losses._utils import (
    ParsedTarget,
    apply_activation,
    check_activation,
    check_ignore_index,
    check_input,
    check_non_negative,
    check_reduction,
    drop_background,
    fp32_context,
    parse_target,
    reduce_items,
    shape_str,
    spatial_axes,
    target_as_onehot,
    upcast,
)

DICE_CONVENTIONS = ("nnunet", "monai")


def soft_dice(
    p: torch.Tensor,
    g: torch.Tensor,
    smooth_nr: float,
    smooth_dr: float,
    batch: bool,
    *,
    pg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item soft Dice ``(2·Σpg + smooth_nr) / (Σp + Σg + smooth_dr)``.

    Args:
        p: probabilities ``(B, C, *spatial)``.
        g: one-hot (or soft) target, same shape.
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        batch: sum the statistics over the batch too.
        pg: ``p * g`` if the caller already has it (saves one full-size product).

    Returns:
        Dice of shape ``(B, C)``, or ``(C,)`` when ``batch``.
    """
    axes = spatial_axes(p, batch)
    tp = (p * g if pg is None else pg).sum(dim=axes)
    denom = p.sum(dim=axes) + g.sum(dim=axes)
    return (2.0 * tp + smooth_nr) / (denom + smooth_dr)


def check_to_onehot_y(owner: str, to_onehot_y: bool, parsed: ParsedTarget, input: torch.Tensor) -> None:
    """MONAI's ``to_onehot_y`` rule for the MONAI-compatible losses, with ValueErrors instead of asserts."""
    k = input.shape[1]
    if k == 1:
        if to_onehot_y:
            warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
        return
    b, spatial = input.shape[0], tuple(input.shape[2:])
    if parsed.kind == "labels" and not to_onehot_y:
        raise ValueError(
            f"{owner}: target of shape {shape_str((b, 1, *spatial))} holds class labels but "
            f"to_onehot_y=False expects a one-hot target of the input's shape {shape_str(input.shape)}; "
            "set to_onehot_y=True."
        )
    if parsed.kind == "onehot" and to_onehot_y:
        raise ValueError(
            f"{owner}: to_onehot_y=True expects integer labels of shape {shape_str((b, 1, *spatial))} or "
            f"{shape_str((b, *spatial))}, got a target of the input's shape {shape_str(input.shape)}."
        )


def _prepare_probs(
    owner: str,
    input: torch.Tensor,
    parsed: ParsedTarget,
    sigmoid: bool,
    softmax: bool,
    other_act: Callable | None,
    include_background: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation, one-hot target and ignore mask, all K channels. Call inside :func:`fp32_context`.

    Only warns about ``include_background=False`` with K = 1 (MONAI's behaviour); the background channel
    is dropped later, from the reduced statistics (:func:`drop_background`).
    """
    k = input.shape[1]
    if softmax and k == 1:
        warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
    p = apply_activation(upcast(input), sigmoid, softmax, other_act)
    g = target_as_onehot(parsed, k, p.dtype)
    if parsed.mask is not None:
        p = p * parsed.mask
    if not include_background and k == 1:
        warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
    return p, g


class SoftDiceLoss(nn.Module):
    """Soft Dice loss (paper §2), nnU-Net convention by default: returns −Dice.

    Per item (sample and class, or class only when ``batch``) ``Dice = (2·Σ p·g + smooth_nr) / (Σ p + Σ g +
    smooth_dr)``, sums over the spatial dims. ``convention="nnunet"`` returns ``−reduce(Dice)`` (range
    [−1, 0]); ``convention="monai"`` returns ``reduce(1 − Dice)`` (range [0, 1]). Both have the same gradient.

    Args:
        include_background: keep channel 0 in the Dice average. Default False (paper).
        sigmoid: apply a sigmoid to ``input``.
        softmax: apply a softmax over channels to ``input``. Default True (``input`` are logits).
        other_act: another activation callable; at most one of the three may be set.
        reduction: ``"mean" | "sum" | "none"`` over items; ``"none"`` gives ``(B, C)`` or ``(C,)``.
        smooth_nr: numerator smoothing (nnU-Net ``smooth``, 1e-5).
        smooth_dr: denominator smoothing (1e-5).
        batch: "batch Dice": sum the statistics over the batch before dividing.
        ignore_index: label value whose voxels are excluded (prediction and target zeroed there).
        convention: ``"nnunet"`` (−Dice) or ``"monai"`` (1 − Dice).

    Shapes:
        input ``(B, K, *spatial)``; target labels ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot
        ``(B, K, *spatial)``. See :mod:`mambaclinix.losses` for the full contract.
    """

    def __init__(
        self,
        include_background: bool = False,
        sigmoid: bool = False,
        softmax: bool = True,
        other_act: Callable | None = None,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        ignore_index: int | None = None,
        convention: str = "nnunet",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_activation(owner, sigmoid, softmax, other_act)
        self.include_background = bool(include_background)
        self.sigmoid = bool(sigmoid)
        self.softmax = bool(softmax)
        self.other_act = other_act
        self.reduction = check_reduction(owner, reduction)
        self.smooth_nr = check_non_negative(owner, "smooth_nr", smooth_nr)
        self.smooth_dr = check_non_negative(owner, "smooth_dr", smooth_dr)
        self.batch = bool(batch)
        self.ignore_index = check_ignore_index(owner, ignore_index)
        if convention not in DICE_CONVENTIONS:
            raise ValueError(f"{owner}: convention must be one of {DICE_CONVENTIONS}, got {convention!r}.")
        self.convention = convention

    def loss_from_probs(
        self, p: torch.Tensor, g: torch.Tensor, pg: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The reduced loss from probabilities and target ``(B, K, *spatial)``, all K channels (no checks)."""
        dice = soft_dice(p, g, self.smooth_nr, self.smooth_dr, self.batch, pg=pg)
        dice = drop_background(dice, self.include_background)
        if self.convention == "nnunet":
            return -reduce_items(dice, self.reduction)
        return reduce_items(1.0 - dice, self.reduction)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: logits (or probabilities, per the activation flags) ``(B, K, *spatial)``.
            target: labels ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot ``(B, K, *spatial)``.

        Returns:
            Scalar for ``"mean"``/``"sum"``; ``(B, C)`` (``(C,)`` with ``batch``) for ``"none"``.
        """
        owner = type(self).__name__
        check_input(owner, input)
        parsed = parse_target(owner, input, target, self.ignore_index)
        with fp32_context(input.device):
            p, g = _prepare_probs(
                owner, input, parsed, self.sigmoid, self.softmax, self.other_act, self.include_background
            )
            return self.loss_from_probs(p, g)


class DiceCELoss(nn.Module):
    """MONAI-compatible ``lambda_dice · DiceLoss + lambda_ce · CrossEntropy`` (same defaults as MONAI).

    Matches ``monai.losses.DiceCELoss`` for the arguments it shares (checked to 1e-6 in the tests): the Dice
    term uses the activation flags and ``include_background``; the cross entropy always acts on the raw
    logits over all channels (binary cross entropy with logits when K = 1). The Dice term follows
    ``dice_convention`` (``"monai"``: 1 − Dice, the default here; ``"nnunet"``: −Dice).

    Args:
        include_background: keep channel 0 in the Dice term. Default True (MONAI).
        to_onehot_y: target holds labels ``(B, 1, *spatial)`` to one-hot encode. Default False (MONAI): the
            target must then be one-hot ``(B, K, *spatial)``. A mismatch raises ``ValueError``.
        sigmoid: sigmoid before the Dice term.
        softmax: softmax before the Dice term.
        other_act: other activation before the Dice term.
        reduction: ``"mean"`` or ``"sum"`` (as MONAI, ``"none"`` is not offered: the terms have different
            shapes).
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
        batch: batch Dice.
        lambda_dice: weight of the Dice term (>= 0).
        lambda_ce: weight of the cross-entropy term (>= 0).
        dice_convention: ``"monai"`` (1 − Dice) or ``"nnunet"`` (−Dice).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        dice_convention: str = "monai",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.reduction = check_reduction(owner, reduction, ("mean", "sum"))
        self.dice = SoftDiceLoss(
            include_background=include_background,
            sigmoid=sigmoid,
            softmax=softmax,
            other_act=other_act,
            reduction=reduction,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
            convention=dice_convention,
        )
        self.to_onehot_y = bool(to_onehot_y)
        self.lambda_dice = check_non_negative(owner, "lambda_dice", lambda_dice)
        self.lambda_ce = check_non_negative(owner, "lambda_ce", lambda_ce)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: logits ``(B, K, *spatial)``.
            target: labels ``(B, 1, *spatial)`` / ``(B, *spatial)`` with ``to_onehot_y=True``, else one-hot
                ``(B, K, *spatial)`` (for K = 1: the binary mask).

        Returns:
            Scalar loss.
        """
        owner = type(self).__name__
        check_input(owner, input)
        parsed = parse_target(owner, input, target)
        check_to_onehot_y(owner, self.to_onehot_y, parsed, input)
        d = self.dice
        with fp32_context(input.device):
            x = upcast(input)
            total = x.new_zeros(())
            if self.lambda_dice > 0:
                p, g = _prepare_probs(
                    owner, x, parsed, d.sigmoid, d.softmax, d.other_act, d.include_background
                )
                total = total + self.lambda_dice * d.loss_from_probs(p, g)
            if self.lambda_ce > 0:
                if x.shape[1] == 1:
                    ce = F.binary_cross_entropy_with_logits(
                        x, parsed.onehot.to(x.dtype), reduction=self.reduction
                    )
                elif parsed.kind == "labels":
                    ce = F.cross_entropy(x, parsed.labels[:, 0], reduction=self.reduction)
                else:
                    ce = F.cross_entropy(x, parsed.onehot.to(x.dtype), reduction=self.reduction)
                total = total + self.lambda_ce * ce
            return total
