"""Intensity normalisation per channel (step 3 of the preprocessing, nnU-Net's schemes; ``docs/data.md``).

* ``"ct"``: clip to the 0.5 and 99.5 percentiles of the foreground (label > 0) intensities of the
  training set, then subtract their mean and divide by their standard deviation. As in nnU-Net the mean
  and std are those of the *unclipped* foreground intensities (:class:`IntensityStats`, computed by
  :func:`mambaclinix.data.fingerprint.compute_fingerprint`).
* ``"zscore"``: per image, ``(x − mean) / std`` over the (hole-filled) non-zero mask; voxels outside the
  mask are set to 0 (nnU-Net's ``use_mask_for_norm``).
* ``"none"``: unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["NORMALIZATIONS", "IntensityStats", "normalize", "resolve_normalization"]

NORMALIZATIONS = ("ct", "zscore", "none")


class IntensityStats(NamedTuple):
    """Foreground intensity statistics of one channel over the training set (for ``"ct"``)."""

    mean: float
    std: float
    lower: float  # 0.5 percentile
    upper: float  # 99.5 percentile


def resolve_normalization(
    normalization: str | Sequence[str], channel_names: Sequence[str]
) -> tuple[str, ...]:
    """Normalisation scheme per channel.

    Args:
        normalization: ``"auto"`` (per channel: ``"ct"`` for a channel named ``CT``, ``"none"`` for
            ``noNorm``/``none``, ``"zscore"`` otherwise, nnU-Net's rule), one of ``"ct"``, ``"zscore"``,
            ``"none"`` for every channel, or a sequence with one scheme per channel.
        channel_names: modality names from ``dataset.json`` (any strings for a manifest).
    """
    n = len(channel_names)
    if isinstance(normalization, str):
        if normalization == "auto":
            out = []
            for name in channel_names:
                key = str(name).strip().lower()
                out.append("ct" if key == "ct" else "none" if key in ("nonorm", "none") else "zscore")
            return tuple(out)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be 'auto' or one of {NORMALIZATIONS}, got {normalization!r}"
            )
        return (normalization,) * n
    schemes = tuple(normalization)
    if len(schemes) != n:
        raise ValueError(f"normalization lists {len(schemes)} schemes for {n} channel(s)")
    bad = [s for s in schemes if s not in NORMALIZATIONS]
    if bad:
        raise ValueError(f"normalization schemes must be among {NORMALIZATIONS}, got {bad}")
    return schemes


def normalize(
    image: np.ndarray,
    mask: np.ndarray,
    schemes: Sequence[str],
    intensity: Sequence[IntensityStats | None],
) -> np.ndarray:
    """Normalise every channel of ``image`` with its scheme.

    Args:
        image: ``(C, W, H, D)`` intensities.
        mask: boolean ``(W, H, D)`` (hole-filled) non-zero mask, for ``"zscore"``.
        schemes: ``"ct"``, ``"zscore"`` or ``"none"`` per channel.
        intensity: the training set's statistics per channel (needed for ``"ct"`` channels).

    Returns:
        float32 ``(C, W, H, D)``.
    """
    out = np.empty_like(image, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        x = image[c]
        if scheme == "ct":
            stats = intensity[c]
            assert stats is not None
            clipped = np.clip(x, stats.lower, stats.upper)
            out[c] = (clipped - stats.mean) / max(stats.std, 1e-8)
        elif scheme == "zscore":
            values = x[mask] if mask.any() else x.reshape(-1)
            mean = float(values.mean(dtype=np.float64))
            std = float(values.std(dtype=np.float64))
            out[c] = (x - mean) / max(std, 1e-8)
            out[c][~mask] = 0.0
        else:
            out[c] = x
    return out
