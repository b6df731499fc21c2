"""Cross entropy over class logits with an ignore label (nnU-Net's ``RobustCrossEntropyLoss``, paper §2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.losses._utils import (
    check_ignore_index,
    check_input,
    check_reduction,
    cross_entropy_from_log_probs,
    fp32_context,
    parse_target,
    upcast,
)


def check_class_weight(owner: str, weight: Sequence[float] | torch.Tensor | None) -> torch.Tensor | None:
    """Validate a per-class weight vector (1-D, finite, >= 0, not all 0) and return it as float tensor."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32)
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(
            f"{owner}: weight must be a 1-D sequence of K class weights, got shape {tuple(w.shape)}."
        )
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not bool((w > 0).any()):
        raise ValueError(f"{owner}: weight must be finite, >= 0 and not all 0, got {w.tolist()}.")
    return w


class CrossEntropyLoss(nn.Module):
    """Multi-class cross entropy on logits, computed in fp32, with an ignore label.

    ``"mean"`` divides the summed per-voxel losses ``-w[y]·log softmax(x)[y]`` by the summed weights of the
    non-ignored voxels (torch's convention) and returns 0 (not NaN, as torch would) when every voxel is
    ignored. ``"none"`` returns ``(B, *spatial)`` with 0 on ignored voxels. A one-hot / soft target
    ``(B, K, *spatial)`` gives ``-Σ_k w_k g_k log p_k`` per voxel (torch's probability-target convention);
    ``ignore_index`` needs label targets.

    Args:
        weight: optional per-class weights, length K.
        ignore_index: label value to ignore (e.g. nnU-Net's ignore label K, or -100). Default None.
        reduction: ``"mean" | "sum" | "none"``.

    Shapes:
        input ``(B, K, *spatial)`` logits, K >= 2; target ``(B, *spatial)`` / ``(B, 1, *spatial)`` labels or
        ``(B, K, *spatial)`` one-hot.
    """

    def __init__(
        self,
        weight: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.register_buffer("weight", check_class_weight(owner, weight), persistent=False)
        self.weight: torch.Tensor | None
        self.ignore_index = check_ignore_index(owner, ignore_index)
        self.reduction = check_reduction(owner, reduction)

    def check_weight(self, num_classes: int) -> None:
        """Raise ``ValueError`` if the class weight does not have ``num_classes`` entries."""
        if self.weight is not None and self.weight.numel() != num_classes:
            raise ValueError(
                f"{type(self).__name__}: weight has {self.weight.numel()} entries but input has "
                f"K = {num_classes} channels."
            )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            input: logits ``(B, K, *spatial)``.
            target: labels ``(B, *spatial)`` / ``(B, 1, *spatial)`` or one-hot ``(B, K, *spatial)``.

        Returns:
            Scalar for ``"mean"``/``"sum"``, ``(B, *spatial)`` for ``"none"``.
        """
        owner = type(self).__name__
        check_input(owner, input, min_channels=2)
        self.check_weight(input.shape[1])
        parsed = parse_target(owner, input, target, self.ignore_index)
        with fp32_context(input.device):
            log_p = F.log_softmax(upcast(input), dim=1)
            return cross_entropy_from_log_probs(log_p, parsed, self.weight, self.reduction)
