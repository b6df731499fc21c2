"""Per-patch intensity augmentations of nnU-Net v2.1 (batchgenerators' transforms), on numpy arrays.

Every function takes a patch ``x`` of shape ``(C, *spatial)`` (float32, modified in place and returned)
and a ``numpy.random.Generator``; the ``draw_*`` helpers only sample parameters, so each transform can
also be applied with given values. Statistics (mean, min, max, standard deviation) are those of the
patch channel, as nnU-Net computes them on its patches. Values and sampling rules follow nnU-Net v2.1's
``get_training_transforms`` (the version MambaClinix's authors fork):

==========================  ==========================================================================
Gaussian noise              one std ~ U(0, 0.1) for all channels (batchgenerators calls it "variance",
                            but passes it to ``normal`` as the standard deviation)
Gaussian blur               each channel with probability 0.5, its own isotropic σ ~ U(0.5, 1) voxels,
                            ``scipy.ndimage.gaussian_filter`` (reflecting border, truncate 4)
brightness                  × U(0.75, 1.25), one factor per channel (plain uniform)
contrast                    factor per channel, half the draws in [0.75, 1), half in [1, 1.25];
                            ``(x − mean)·f + mean`` clipped to the channel's [min, max]
simulated low resolution    each channel with probability 0.5: zoom ~ U(0.5, 1), shape
                            ``round(shape · zoom)`` (axes in ``ignore_axes`` keep their size),
                            nearest-neighbour down, cubic spline up (pixel-centre aligned, edge mode:
                            what ``skimage.transform.resize`` does with orders 0 and 3)
gamma                       γ per channel, half the draws in [0.7, 1), half in [1, 1.5]; rescale to
                            [0, 1], power, rescale back; mean and std restored; the inverted variant
                            negates the patch before and after
mirroring                   each axis flipped with probability 0.5 (image and label)
==========================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "brightness",
    "contrast",
    "draw_bg",
    "gamma",
    "gaussian_blur",
    "gaussian_noise",
    "low_resolution",
    "mirror",
]


def draw_bg(rng: np.random.Generator, low: float, high: float) -> float:
    """batchgenerators' two-sided draw: with probability 1/2 (when ``low < 1``) U(low, 1), else
    U(max(low, 1), high)."""
    if rng.random() < 0.5 and low < 1:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0), high))


def gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean Gaussian noise of standard deviation ``std`` to every channel."""
    if std > 0:
        x += (rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)).astype(x.dtype, copy=False)
    return x


def gaussian_blur(x: np.ndarray, sigmas: Sequence[float | None]) -> np.ndarray:
    """Blur channel ``c`` with the isotropic σ ``sigmas[c]`` (voxels); ``None`` leaves it unchanged."""
    for c, sigma in enumerate(sigmas):
        if sigma is not None:
            x[c] = ndimage.gaussian_filter(x[c], float(sigma), order=0, mode="reflect", truncate=4.0)
    return x


def brightness(x: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Multiply channel ``c`` by ``factors[c]``."""
    for c, factor in enumerate(factors):
        x[c] *= np.float32(factor)
    return x


def contrast(x: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """``(x − mean)·factor + mean`` per channel, clipped to the channel's original range."""
    for c, factor in enumerate(factors):
        channel = x[c]
        mean, low, high = channel.mean(), channel.min(), channel.max()
        channel -= mean
        channel *= np.float32(factor)
        channel += mean
        np.clip(channel, low, high, out=channel)
    return x


def _zoom_to(x: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    factors = [n / m for n, m in zip(shape, x.shape, strict=True)]
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    if out.shape != tuple(shape):  # scipy rounds the output shape; never off for these factors
        raise AssertionError(f"zoom gave {out.shape}, expected {tuple(shape)}")
    return out


def low_resolution(
    x: np.ndarray, zooms: Sequence[float | None], ignore_axes: Sequence[int] = ()
) -> np.ndarray:
    """Simulate a coarser acquisition per channel: ``zooms[c]`` (≤ 1, ``None`` skips the channel).

    The channel is resampled to ``round(shape · zoom)`` voxels (axes in ``ignore_axes``, spatial axis
    indices, keep their size) with nearest-neighbour interpolation and back to its shape with a cubic
    spline, both with pixel centres aligned and edge values beyond the border.
    """
    spatial = np.asarray(x.shape[1:])
    for c, zoom in enumerate(zooms):
        if zoom is None:
            continue
        target = np.round(spatial * float(zoom)).astype(int).clip(min=1)
        for axis in ignore_axes:
            target[axis] = spatial[axis]
        if np.array_equal(target, spatial):
            continue
        small = _zoom_to(x[c].astype(np.float64), target.tolist(), order=0)
        x[c] = _zoom_to(small, spatial.tolist(), order=3)
    return x


def gamma(
    x: np.ndarray, gammas: Sequence[float], invert: bool = False, retain_stats: bool = True
) -> np.ndarray:
    """nnU-Net's gamma per channel: ``((x − min)/(range + 1e-7))^γ·(range + 1e-7) + min``; with
    ``retain_stats`` the channel's mean and (population) std are restored; ``invert`` negates the patch
    before and after."""
    if invert:
        np.negative(x, out=x)
    for c, value in enumerate(gammas):
        channel = x[c].astype(np.float64)
        mean, std = channel.mean(), channel.std()
        low = channel.min()
        span = channel.max() - low + 1e-7
        channel = np.power((channel - low) / span, float(value)) * span + low
        if retain_stats:
            channel = channel - channel.mean()
            channel = channel / (channel.std() + 1e-8) * std + mean
        x[c] = channel
    if invert:
        np.negative(x, out=x)
    return x


def mirror(arrays: Sequence[np.ndarray | None], axes: Sequence[int]) -> list[np.ndarray | None]:
    """Flip each ``(C, *spatial)`` array along the spatial ``axes`` (views; ``None`` passes through)."""
    out = []
    for array in arrays:
        if array is not None:
            for axis in axes:
                array = np.flip(array, axis=axis + 1)
        out.append(array)
    return out
