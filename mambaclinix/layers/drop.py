"""Stochastic depth (DropPath) for residual branches."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DropPath", "drop_path"]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Zero the whole residual branch of each sample with probability ``drop_prob``.

    Args:
        x: Branch output ``(B, ...)``; one Bernoulli draw per sample (first axis).
        drop_prob: Probability of dropping a sample's branch, in ``[0, 1]``.
        training: Identity unless True.
        scale_by_keep: Divide kept samples by ``1 - drop_prob`` so the expectation is unchanged.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Per-sample stochastic depth (Huang et al. 2016), as used inside the HGCN blocks.

    In training, each sample's input is zeroed with probability ``drop_prob`` and otherwise scaled by
    ``1 / (1 - drop_prob)``; in eval it is the identity.

    Args:
        drop_prob: Drop probability in ``[0, 1]``.
        scale_by_keep: Scale kept samples by the inverse keep probability.

    Shape:
        Input and output: ``(B, *)``.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
