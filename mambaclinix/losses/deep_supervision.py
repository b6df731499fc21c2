"""Deep-supervision wrapper: a weighted sum of one loss over the network's multi-scale outputs (paper §2).

Default weights (nnU-Net): ``w_i ∝ 2^−i`` for output i (0 = full resolution, outputs given finest first), the
coarsest output set to 0, normalised to sum 1 — for 5 outputs ``8/15, 4/15, 2/15, 1/15, 0``. Targets are
integer label maps resized with order 0 to each output's shape, as nnU-Net's
``DownsampleSegForDSTransform2`` does (``skimage.transform.resize(order=0)``, i.e.
``scipy.ndimage.zoom(order=0, grid_mode=True)``): output voxel i takes the input voxel nearest its centre,
source index ``floor((i + 0.5) · L_in / L_out)`` (``F.interpolate(mode="nearest-exact")``). For a factor
of 2 that is the second voxel of each pair, the centre-right one; not the strided pick ``target[..., ::s]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.losses._utils import shape_str


def deep_supervision_weights(num_outputs: int) -> tuple[float, ...]:
    """nnU-Net's deep-supervision weights for ``num_outputs`` outputs, finest first.

    ``w_i = 2^−i``, the last (coarsest) set to 0 when there are at least two outputs, normalised to sum 1.

    Args:
        num_outputs: number of outputs (>= 1).

    Returns:
        The weights, e.g. ``(8/15, 4/15, 2/15, 1/15, 0)`` for 5 outputs and ``(1.0,)`` for 1.
    """
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be an int >= 1, got {num_outputs!r}.")
    raw = [2.0**-i for i in range(num_outputs)]
    if num_outputs > 1:
        raw[-1] = 0.0
    total = sum(raw)
    return tuple(w / total for w in raw)


def downsample_labels(target: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Order-0 resize of a label map (or one-hot map) to ``spatial_shape``: each output voxel takes the input
    voxel nearest its centre (``scipy.ndimage.zoom(order=0, grid_mode=True)``, as nnU-Net's deep-supervision
    targets).

    Args:
        target: ``(B, *spatial)``, ``(B, 1, *spatial)`` or ``(B, K, *spatial)``; the trailing
            ``len(spatial_shape)`` dims are resized.
        spatial_shape: output spatial shape.

    Returns:
        The resized tensor with the same leading dims and dtype as ``target``.
    """
    nsp = len(spatial_shape)
    size = tuple(int(s) for s in spatial_shape)
    if tuple(target.shape[-nsp:]) == size:
        return target
    lead = target.shape[:-nsp]
    work = target if target.is_floating_point() else target.to(torch.float32)  # exact for labels < 2**24
    y = F.interpolate(work.reshape(-1, 1, *target.shape[-nsp:]), size=size, mode="nearest-exact")
    y = y.to(target.dtype) if target.dtype != torch.bool else y > 0.5
    return y.reshape(*lead, *size)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss(output_i, target_i)`` over deep-supervision outputs, finest first.

    Terms with weight 0 are skipped entirely (no target resize, no loss call). The weights are used as
    given (not renormalised); ``weights=None`` uses :func:`deep_supervision_weights` for the number of
    outputs seen at call time.

    Args:
        loss: the per-scale loss, called as ``loss(logits_i, target_i)``; it should return a scalar.
        weights: one non-negative weight per output (finest first), at least one > 0; None for nnU-Net's.

    Shapes:
        ``outputs``: a sequence of logits ``(B, K, *spatial_i)``, finest first (a single tensor is taken as
        a one-element sequence). ``target``: labels ``(B, *spatial_0)`` / ``(B, 1, *spatial_0)`` or one-hot
        ``(B, K, *spatial_0)`` at full resolution, downsampled per output; or a sequence of
        per-output targets already at each output's shape.
    """

    def __init__(self, loss: nn.Module | Callable, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if not callable(loss):
            raise ValueError(
                f"{owner}: loss must be a callable (e.g. an nn.Module), got {type(loss).__name__}."
            )
        self.loss = loss
        if weights is not None:
            try:
                w = tuple(float(v) for v in weights)
            except (TypeError, ValueError):
                raise ValueError(
                    f"{owner}: weights must be a sequence of numbers, got {weights!r}."
                ) from None
            if (
                len(w) == 0
                or any(not (v >= 0.0 and v != float("inf")) for v in w)
                or not any(v > 0 for v in w)
            ):
                raise ValueError(f"{owner}: weights must be finite, >= 0 and not all 0, got {list(weights)}.")
            self.weights: tuple[float, ...] | None = w
        else:
            self.weights = None

    def forward(
        self, outputs: Sequence[torch.Tensor] | torch.Tensor, target: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Compute ``Σ_i w_i · loss(outputs[i], target_i)``.

        Args:
            outputs: logits, finest first.
            target: full-resolution target, or one target per output.

        Returns:
            The weighted sum (a scalar when ``loss`` returns scalars).
        """
        owner = type(self).__name__
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        outputs = list(outputs)
        if not outputs or not all(isinstance(o, torch.Tensor) and o.ndim >= 3 for o in outputs):
            raise ValueError(
                f"{owner}: outputs must be a non-empty sequence of logits tensors (B, K, *spatial), "
                "finest first."
            )
        n = len(outputs)
        weights = self.weights if self.weights is not None else deep_supervision_weights(n)
        if len(weights) != n:
            raise ValueError(f"{owner}: got {n} outputs but {len(weights)} weights {list(weights)}.")
        ref = outputs[0]
        for i, o in enumerate(outputs):
            if o.shape[:2] != ref.shape[:2] or o.ndim != ref.ndim:
                raise ValueError(
                    f"{owner}: outputs[{i}] has shape {shape_str(o.shape)} but outputs[0] has "
                    f"{shape_str(ref.shape)}; all outputs need the same (B, K) and number of spatial dims."
                )
        if isinstance(target, torch.Tensor):
            nsp = ref.ndim - 2
            if target.ndim not in (nsp + 1, nsp + 2) or target.shape[0] != ref.shape[0]:
                raise ValueError(
                    f"{owner}: target has shape {shape_str(target.shape)}; expected (B, *spatial), "
                    f"(B, 1, *spatial) or (B, K, *spatial) with B = {ref.shape[0]} and {nsp} spatial dims."
                )
            targets: list[torch.Tensor | None] = [
                downsample_labels(target, o.shape[2:]) if w > 0 else None
                for o, w in zip(outputs, weights, strict=True)
            ]
        else:
            targets = list(target)
            if len(targets) != n:
                raise ValueError(f"{owner}: got {n} outputs but {len(targets)} targets.")
        total: torch.Tensor | None = None
        for o, t, w in zip(outputs, targets, weights, strict=True):
            if w == 0:
                continue
            term = w * self.loss(o, t)
            total = term if total is None else total + term
        return total
