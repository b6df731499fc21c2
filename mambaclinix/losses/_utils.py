"""Shared input handling for the segmentation losses: validation, target parsing, fp32 compute.

Everything here depends on torch only. The public contract these helpers implement is written in the
:mod:`mambaclinix.losses` module docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def shape_str(shape: Sequence[int] | torch.Size) -> str:
    """``(2, 3, 4)`` style rendering of a shape for error messages."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# ----------------------------------------------------------------------------------------------------------
# __init__ argument checks
# ----------------------------------------------------------------------------------------------------------
def check_reduction(owner: str, reduction: str, allowed: Sequence[str] = REDUCTIONS) -> str:
    """Return ``reduction`` if it is one of ``allowed``, else raise ``ValueError``."""
    if reduction not in allowed:
        raise ValueError(f"{owner}: reduction must be one of {tuple(allowed)}, got {reduction!r}.")
    return reduction


def check_non_negative(owner: str, name: str, value: float) -> float:
    """Return ``float(value)`` if it is a finite number >= 0, else raise ``ValueError``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}.") from None
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}.")
    return v


def check_activation(owner: str, sigmoid: bool, softmax: bool, other_act: Callable | None) -> None:
    """MONAI's activation rule: at most one of ``sigmoid``, ``softmax``, ``other_act``."""
    if other_act is not None and not callable(other_act):
        raise ValueError(f"{owner}: other_act must be None or a callable, got {type(other_act).__name__}.")
    if int(bool(sigmoid)) + int(bool(softmax)) + int(other_act is not None) > 1:
        raise ValueError(
            f"{owner}: at most one of sigmoid=True, softmax=True, other_act=<callable> may be set "
            f"(got sigmoid={sigmoid}, softmax={softmax}, other_act={other_act!r})."
        )


def check_ignore_index(owner: str, ignore_index: int | None) -> int | None:
    """``ignore_index`` is ``None`` or a Python int (any value, e.g. -100 or the nnU-Net ignore label K)."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{owner}: ignore_index must be None or an int, got {ignore_index!r}.")
    return ignore_index


# ----------------------------------------------------------------------------------------------------------
# forward-time input checks
# ----------------------------------------------------------------------------------------------------------
def check_input(owner: str, input: torch.Tensor, min_channels: int = 1) -> None:
    """Check that ``input`` is a finite floating tensor of shape ``(B, K, *spatial)``.

    Raises:
        ValueError: naming ``input``, its shape/dtype and what was expected.
    """
    if not isinstance(input, torch.Tensor):
        raise ValueError(
            f"{owner}: input must be a torch.Tensor of logits (B, K, *spatial), got {type(input)}."
        )
    if not input.is_floating_point():
        raise ValueError(f"{owner}: input must be a floating-point tensor (logits), got dtype {input.dtype}.")
    if input.ndim < 3:
        raise ValueError(
            f"{owner}: input must have shape (B, K, *spatial) with at least one spatial dim, "
            f"got shape {shape_str(input.shape)}."
        )
    if input.shape[1] < min_channels:
        raise ValueError(
            f"{owner}: input must have at least {min_channels} channel(s) (K = input.shape[1]), "
            f"got shape {shape_str(input.shape)}."
        )
    if input.numel() == 0:
        raise ValueError(f"{owner}: input is empty, shape {shape_str(input.shape)}.")
    # fast screen: one reduction pass (NaN/inf propagate into the sum); the exact per-element check runs only
    # when the sum is not finite (it may also overflow with huge but finite logits, which then pass)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    if not bool(torch.isfinite(input.sum(dtype=acc))) and not bool(torch.isfinite(input).all()):
        n_nan = int(torch.isnan(input).sum())
        n_inf = int(torch.isinf(input).sum())
        raise ValueError(
            f"{owner}: input (logits of shape {shape_str(input.shape)}) must be finite, "
            f"found {n_nan} NaN and {n_inf} inf value(s)."
        )


@dataclass
class ParsedTarget:
    """A validated target.

    Attributes:
        kind: ``"labels"`` (integer class indices) or ``"onehot"`` (one-hot / soft; the binary mask
            when K = 1).
        labels: ``(B, 1, *spatial)`` int64 labels with ignored voxels replaced by 0 (``kind == "labels"``).
        onehot: ``(B, K, *spatial)`` float target (``kind == "onehot"``), as given (cast later).
        mask: ``(B, 1, *spatial)`` bool, False on ignored voxels; None when nothing is ignored.
    """

    kind: str
    labels: torch.Tensor | None = None
    onehot: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def parse_target(
    owner: str, input: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
) -> ParsedTarget:
    """Validate ``target`` against ``input`` (B, K, *spatial) and say which format it is in.

    Accepted formats (shape decides, never dtype):

    * ``(B, *spatial)`` or ``(B, 1, *spatial)`` with K >= 2: integer class labels in ``[0, K)``; the value
      ``ignore_index`` is also allowed when it is set. Floating dtypes are accepted if integral.
    * ``(B, K, *spatial)``: one-hot (or soft) target with values in ``[0, 1]``.
    * K == 1: ``(B, *spatial)`` or ``(B, 1, *spatial)`` is the binary mask of the single channel.

    Raises:
        ValueError: on a wrong shape, out-of-range / non-integral labels, or non-finite / out-of-[0, 1]
            one-hot values. The message names ``target`` and the expected shapes.
    """
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{owner}: target must be a torch.Tensor, got {type(target)}.")
    b, k = input.shape[0], input.shape[1]
    spatial = tuple(input.shape[2:])
    shape = tuple(target.shape)
    is_labels_shape = shape == (b, *spatial) or shape == (b, 1, *spatial)
    if k == 1 and is_labels_shape:
        kind = "onehot"
        target = target.reshape(b, 1, *spatial)
    elif is_labels_shape:
        kind = "labels"
    elif shape == tuple(input.shape):
        kind = "onehot"
    else:
        raise ValueError(
            f"{owner}: target has shape {shape_str(shape)} but input has shape {shape_str(input.shape)} "
            f"(B, K, *spatial); expected integer labels of shape {shape_str((b, *spatial))} or "
            f"{shape_str((b, 1, *spatial))}, or a one-hot target of shape {shape_str(input.shape)}."
        )

    if kind == "onehot":
        t = target if target.is_floating_point() else target.to(torch.float32)
        if not bool(((t >= 0) & (t <= 1)).all()):  # also False for NaN
            raise ValueError(
                f"{owner}: one-hot target of shape {shape_str(shape)} must hold finite values in [0, 1]"
                + (" (for K = 1 the target is the binary mask of the single channel)." if k == 1 else ".")
            )
        if ignore_index is not None:
            raise ValueError(
                f"{owner}: ignore_index={ignore_index} needs an integer-label target of shape "
                f"{shape_str((b, 1, *spatial))}, got a one-hot target of shape {shape_str(shape)}."
            )
        return ParsedTarget(kind="onehot", onehot=target)

    labels = target.reshape(b, 1, *spatial)
    if labels.is_floating_point():
        if not bool((labels == labels.round()).all()):  # also False for NaN / inf
            raise ValueError(
                f"{owner}: target of shape {shape_str(shape)} is read as class labels and must hold "
                f"integer values, got non-integral (or non-finite) floats."
            )
    elif labels.dtype.is_complex:
        raise ValueError(f"{owner}: target must be real-valued, got dtype {labels.dtype}.")
    labels = labels.long()
    valid = (labels >= 0) & (labels < k)
    mask = None
    if ignore_index is not None:
        ignored = labels == ignore_index
        valid = valid | ignored
        if bool(ignored.any()):
            mask = ~ignored
            labels = labels.masked_fill(ignored, 0)
    if not bool(valid.all()):
        bad = torch.unique(labels[~valid])[:8].tolist()
        extra = f" or the ignore_index {ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{owner}: target labels must be in [0, {k - 1}] (K = input.shape[1] = {k}){extra}; "
            f"found value(s) {bad}."
        )
    return ParsedTarget(kind="labels", labels=labels, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# compute helpers
# ----------------------------------------------------------------------------------------------------------
def fp32_context(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` (the losses compute in fp32 or fp64)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 → fp32; fp32 and fp64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def labels_to_onehot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, *spatial)`` int64 labels in [0, K) → ``(B, K, *spatial)`` one-hot of ``dtype``."""
    shape = (labels.shape[0], num_classes, *labels.shape[2:])
    return torch.zeros(shape, dtype=dtype, device=labels.device).scatter_(1, labels, 1)


def target_as_onehot(parsed: ParsedTarget, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot ``(B, K, *spatial)`` float target from a :class:`ParsedTarget` (ignored voxels set to 0)."""
    if parsed.kind == "labels":
        g = labels_to_onehot(parsed.labels, num_classes, dtype)
        if parsed.mask is not None:
            g = g * parsed.mask
        return g
    return parsed.onehot.to(dtype)


def apply_activation(
    x: torch.Tensor, sigmoid: bool, softmax: bool, other_act: Callable | None
) -> torch.Tensor:
    """Apply the (at most one) configured activation over the channel dim."""
    if sigmoid:
        return torch.sigmoid(x)
    if softmax and x.shape[1] > 1:
        return torch.softmax(x, dim=1)
    if other_act is not None:
        return other_act(x)
    return x


def reduce_items(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-item values (e.g. B×K scores) with ``"mean" | "sum" | "none"``."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def drop_background(values: torch.Tensor, include_background: bool) -> torch.Tensor:
    """Drop class 0 from per-item values ``(B, K)`` or ``(K,)`` (classes last) unless it is kept or K = 1.

    Background is removed from the small reduced statistics rather than from the full-size probability
    map: slicing ``p[:, 1:]`` would cost a full-size zero-filled gradient buffer in the backward pass.
    """
    if include_background or values.shape[-1] == 1:
        return values
    return values[..., 1:]


def spatial_axes(x: torch.Tensor, batch: bool) -> list[int]:
    """Axes summed for per-item statistics: spatial dims, plus the batch dim when ``batch``."""
    axes = list(range(2, x.ndim))
    return [0, *axes] if batch else axes


def cross_entropy_from_log_probs(
    log_p: torch.Tensor,
    parsed: ParsedTarget,
    weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """Cross entropy from log-probabilities ``(B, K, *spatial)``.

    Labels: per voxel ``-w[y] * log p[y]``; ``"mean"`` divides by the summed weights of the non-ignored voxels
    (torch's convention) and is 0, not NaN, when every voxel is ignored. ``"none"`` gives ``(B, *spatial)``
    with 0 on ignored voxels. One-hot / soft targets: ``-sum_k w_k g_k log p_k`` per voxel, ``"mean"`` over
    all voxels (torch's convention for probability targets).
    """
    if parsed.kind == "labels":
        labels = parsed.labels[:, 0]
        w = weight.to(log_p.dtype) if weight is not None else None
        per_voxel = F.nll_loss(log_p, labels, weight=w, reduction="none")
        if parsed.mask is not None:
            per_voxel = per_voxel * parsed.mask[:, 0]
        if reduction == "none":
            return per_voxel
        if reduction == "sum":
            return per_voxel.sum()
        if w is None:
            denom = parsed.mask.sum() if parsed.mask is not None else torch.tensor(labels.numel())
            denom = denom.to(per_voxel)
        else:
            wv = w[labels]
            denom = (wv * parsed.mask[:, 0]).sum() if parsed.mask is not None else wv.sum()
        return per_voxel.sum() / denom.clamp_min(torch.finfo(per_voxel.dtype).tiny)
    g = parsed.onehot.to(log_p.dtype)
    if weight is not None:
        shape = [1, -1] + [1] * (log_p.ndim - 2)
        g = g * weight.to(log_p.dtype).view(shape)
    per_voxel = -(g * log_p).sum(dim=1)
    return reduce_items(per_voxel, reduction)
