"""From a preprocessed volume to a label map on the input's grid: the one path shared by the
LightningModule's ``predict`` and the model package's :class:`~mambaclinix.deploy.Predictor`.

1. :func:`ensemble_scores`: Gaussian sliding window over the volume (the MambaClinix / nnU-Net recipe:
   overlap 0.5, σ = patch/8, optional mirroring). One network: the Gaussian-weighted average of its
   logits, as nnU-Net v2 stitches. Several networks (the folds of a model package): their softmax
   probabilities averaged window by window (:func:`ensemble_probabilities`).
2. :func:`labels_on_original_grid`: those scores mapped back onto the original image's grid
   (:func:`~mambaclinix.inference.invert_to_original`; nnU-Net v2 resamples the logits before the
   argmax), then the argmax.

Only torch and numpy are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mambaclinix.inference.geometry import invert_to_original
from mambaclinix.inference.sliding_window import sliding_window_inference

__all__ = ["ensemble_probabilities", "ensemble_scores", "label_dtype", "labels_on_original_grid"]

Network = Callable[[torch.Tensor], Any]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out


def ensemble_probabilities(
    image: torch.Tensor,
    networks: Sequence[Network],
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax probabilities ``(B, K, *spatial)`` of whole volumes ``(B, C, *spatial)``.

    Args:
        image: the preprocessed volumes.
        networks: callables mapping a batch of windows to logits (or a list of them, finest first: the
            first is used); with several, their softmax probabilities are averaged (an ensemble).
        roi_size: the window (the training patch).
        sw_batch_size: windows per network call.
        overlap: overlap of neighbouring windows, a fraction of the window.
        mirror_axes: spatial axes mirrored for test-time augmentation, ``None`` for none.
    """
    if not networks:
        raise ValueError("ensemble_probabilities: give at least one network")

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        total = torch.softmax(_first(networks[0](windows)).float(), dim=1)
        for net in networks[1:]:
            total = total + torch.softmax(_first(net(windows)).float(), dim=1)
        return total if len(networks) == 1 else total / len(networks)

    return sliding_window_inference(
        image, tuple(int(r) for r in roi_size), sw_batch_size, predictor,
        overlap=overlap, mode="gaussian", sigma_scale=0.125,
        mirror_axes=None if mirror_axes is None else tuple(mirror_axes),
    )  # fmt: skip


def ensemble_scores(
    image: torch.Tensor,
    networks: Sequence[Network],
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Scores ``(B, K, *spatial)`` whose argmax is the segmentation: one network's stitched logits
    (nnU-Net v2's prediction), or the averaged probabilities of several (:func:`ensemble_probabilities`).

    Same arguments as :func:`ensemble_probabilities`.
    """
    if len(networks) != 1:
        return ensemble_probabilities(image, networks, roi_size, sw_batch_size, overlap, mirror_axes)
    net = networks[0]
    return sliding_window_inference(
        image, tuple(int(r) for r in roi_size), sw_batch_size, lambda w: _first(net(w)).float(),
        overlap=overlap, mode="gaussian", sigma_scale=0.125,
        mirror_axes=None if mirror_axes is None else tuple(mirror_axes),
    )  # fmt: skip


def label_dtype(num_classes: int) -> torch.dtype:
    """The integer type label maps of ``num_classes`` classes are written in."""
    return torch.uint8 if num_classes <= 256 else torch.int16


def labels_on_original_grid(probs: torch.Tensor, meta: Mapping[str, Any]) -> torch.Tensor:
    """The label map of one case on its original grid: ``probs`` ``(K, *meta["preprocessed_shape"])``
    (logits or probabilities, :func:`ensemble_scores`)
    mapped back with :func:`~mambaclinix.inference.invert_to_original`, then the argmax over classes
    (``(*meta["original_shape"])``, :func:`label_dtype`)."""
    full = invert_to_original(probs, meta)
    return full.argmax(0).to(label_dtype(int(probs.shape[0])))
