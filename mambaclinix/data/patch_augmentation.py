"""nnU-Net's training augmentation, applied to each patch on its own (:class:`PatchAugmentation`).

nnU-Net v2.1 (the version MambaClinix's authors fork, ``get_training_transforms``) cuts every training
patch from the preprocessed volume with a margin, rotates and scales it, cuts the centre, then applies
the intensity transforms to that patch alone. :meth:`PatchAugmentation.patch` does the same: per patch,
in this order, with these probabilities (defaults):

=================================================  =====  ============================================
rotation, each axis U(±30°)                        0.2    one resampling with the scaling, on the
isotropic scaling, half the draws in [0.7, 1),     0.2    enlarged crop the rotated/scaled patch needs
half in [1, 1.4]                                          (:func:`~mambaclinix.data.spatial.spatial_patch`);
                                                          cubic spline for images, nearest for labels
                                                          (``label_order=1``: per-label linear, as
                                                          nnU-Net v2.1), zeros outside the volume
Gaussian noise, std U(0, 0.1)                      0.1    :func:`~mambaclinix.data.intensity.gaussian_noise`
Gaussian blur, σ U(0.5, 1) per channel (p 0.5)     0.2    :func:`~mambaclinix.data.intensity.gaussian_blur`
brightness × U(0.75, 1.25) per channel             0.15   :func:`~mambaclinix.data.intensity.brightness`
contrast [0.75, 1.25] per channel                  0.15   :func:`~mambaclinix.data.intensity.contrast`
low resolution, zoom U(0.5, 1), channel p 0.5      0.25   :func:`~mambaclinix.data.intensity.low_resolution`
inverted gamma [0.7, 1.5], statistics kept         0.1    :func:`~mambaclinix.data.intensity.gamma`
gamma [0.7, 1.5], statistics kept                  0.3    :func:`~mambaclinix.data.intensity.gamma`
mirroring, each axis                               0.5    :func:`~mambaclinix.data.intensity.mirror`
=================================================  =====  ============================================

**Anisotropic patches** ("dummy 2D"): when the longest patch edge is more than ``anisotropy_threshold``
(3) times the shortest, the shortest axis is the coarse (through-plane) axis: rotation is about that axis
only, U(±180°) as nnU-Net does, scaling acts on the two in-plane axes, and the low-resolution simulation
leaves the coarse axis at full size. nnU-Net takes its first array axis as the coarse one (its arrays are
transposed so that it is); here the shortest patch edge decides, whatever the array order.

Randomness comes only from the ``numpy.random.Generator`` passed in, so a patch is a function of its
seed (:mod:`mambaclinix.data.patches` seeds one generator per patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from mambaclinix.data import intensity
from mambaclinix.data.spatial import crop_padded, rotation_matrix, spatial_patch

__all__ = ["PatchAugmentation", "coarse_axis"]


def coarse_axis(patch_size: Sequence[int], threshold: float = 3.0) -> int | None:
    """The through-plane axis of an anisotropic patch (the first shortest edge) when
    ``max(patch) / min(patch) > threshold``, else ``None``."""
    size = [int(v) for v in patch_size]
    return size.index(min(size)) if max(size) / min(size) > threshold else None


def _check_range(value: Sequence[float], name: str, low: float = 0.0) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not low <= a <= b:
        raise ValueError(f"{name} must be a range with {low} <= low <= high, got {tuple(value)}")
    return a, b


@dataclass(frozen=True)
class PatchAugmentation:
    """Probabilities and ranges of nnU-Net's per-patch augmentation (see the module docstring).

    Probabilities are per patch (``p_mirror`` per axis); ``*_p_per_channel`` per channel once the
    transform fires. ``image_order`` / ``label_order`` are the interpolation orders of the rotation and
    scaling: images 3 (cubic spline, as nnU-Net v2.1); labels 0 (nearest, the default: one gather) or 1
    (each label value interpolated linearly and kept where it reaches 0.5, nnU-Net v2.1's
    ``order_seg=1``, one interpolation per label value in the crop).
    """

    p_rotation: float = 0.2
    rotation_degrees: float = 30.0
    rotation_degrees_2d: float = 180.0
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    image_order: int = 3
    label_order: int = 0
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    blur_p_per_channel: float = 0.5
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_low_resolution: float = 0.25
    low_resolution_zoom: tuple[float, float] = (0.5, 1.0)
    low_resolution_p_per_channel: float = 0.5
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    anisotropy_threshold: float = 3.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_") or f.name.endswith("_p_per_channel"):
                value = getattr(self, f.name)
                if not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"PatchAugmentation.{f.name} must be in [0, 1], got {value}")
        for name in ("scaling", "noise_std", "blur_sigma", "brightness", "contrast", "gamma_range"):
            object.__setattr__(self, name, _check_range(getattr(self, name), f"PatchAugmentation.{name}"))
        zoom = _check_range(self.low_resolution_zoom, "PatchAugmentation.low_resolution_zoom", 1e-3)
        if zoom[1] > 1:
            raise ValueError(f"PatchAugmentation.low_resolution_zoom must not exceed 1, got {zoom}")
        object.__setattr__(self, "low_resolution_zoom", zoom)
        for name in ("image_order", "label_order"):
            if getattr(self, name) not in (0, 1, 3) or (name == "label_order" and self.label_order == 3):
                raise ValueError(f"PatchAugmentation.{name} must be 0, 1 or 3 (labels: 0 or 1)")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(
                f"PatchAugmentation.mirror_axes must be spatial axes 0..2, got {self.mirror_axes}"
            )

    def scaled(self, factor: float) -> PatchAugmentation:
        """A copy with every per-patch probability (and ``p_mirror``) multiplied by ``factor``, capped at
        1; 0 switches every transform off."""
        if factor < 0:
            raise ValueError(f"the probability factor must be >= 0, got {factor}")
        changes = {
            f.name: min(1.0, getattr(self, f.name) * factor) for f in fields(self) if f.name.startswith("p_")
        }
        return replace(self, **changes)

    # -------------------------------------------------------------------------------------- drawing

    def draw_spatial(self, rng: np.random.Generator, patch_size: Sequence[int]) -> np.ndarray | None:
        """The 3×3 patch-to-volume matrix of this patch's rotation and scaling, ``None`` when neither
        is drawn."""
        rotate = rng.random() < self.p_rotation
        angles = np.zeros(3)
        axis = coarse_axis(patch_size, self.anisotropy_threshold)
        if rotate:
            if axis is None:
                limit = np.deg2rad(self.rotation_degrees)
                angles = rng.uniform(-limit, limit, size=3)
            else:
                limit = np.deg2rad(self.rotation_degrees_2d)
                angles[axis] = rng.uniform(-limit, limit)
        scale = rng.random() < self.p_scaling
        factor = intensity.draw_bg(rng, *self.scaling) if scale else 1.0
        if not (rotate or scale):
            return None
        factors = np.full(3, factor)
        if axis is not None:
            factors[axis] = 1.0
        return rotation_matrix(angles) * factors[None, :]

    # ------------------------------------------------------------------------------------- applying

    def intensity(
        self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The intensity transforms and mirroring, in nnU-Net's order, on a ``(C, *spatial)`` float32
        patch (modified in place) and its label."""
        channels = image.shape[0]
        axis = coarse_axis(image.shape[1:], self.anisotropy_threshold)
        if rng.random() < self.p_noise:
            intensity.gaussian_noise(image, float(rng.uniform(*self.noise_std)), rng)
        if rng.random() < self.p_blur:
            sigmas = [
                float(rng.uniform(*self.blur_sigma)) if rng.random() < self.blur_p_per_channel else None
                for _ in range(channels)
            ]
            intensity.gaussian_blur(image, sigmas)
        if rng.random() < self.p_brightness:
            intensity.brightness(image, [float(rng.uniform(*self.brightness)) for _ in range(channels)])
        if rng.random() < self.p_contrast:
            intensity.contrast(image, [intensity.draw_bg(rng, *self.contrast) for _ in range(channels)])
        if rng.random() < self.p_low_resolution:
            zooms = [
                float(rng.uniform(*self.low_resolution_zoom))
                if rng.random() < self.low_resolution_p_per_channel
                else None
                for _ in range(channels)
            ]
            intensity.low_resolution(image, zooms, ignore_axes=() if axis is None else (axis,))
        for invert, p in ((True, self.p_gamma_inverted), (False, self.p_gamma)):
            if rng.random() < p:
                gammas = [intensity.draw_bg(rng, *self.gamma_range) for _ in range(channels)]
                intensity.gamma(image, gammas, invert=invert, retain_stats=True)
        axes = [a for a in self.mirror_axes if rng.random() < self.p_mirror]
        image, label = intensity.mirror([image, label], axes)
        return image, label

    def patch(
        self,
        image: np.ndarray,
        label: np.ndarray | None,
        start: Sequence[int],
        patch_size: Sequence[int],
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The augmented patch whose un-augmented position is ``volume[:, start:start + patch_size]``.

        Args:
            image: ``(C, *spatial)`` volume (a memory map is fine: only the enlarged crop is read).
            label: ``(1, *spatial)`` label map or ``None``.
            start: patch corner in volume voxels (the patch may reach beyond the volume: zeros).
            patch_size: patch edge lengths.
            rng: the patch's generator.

        Returns:
            ``(float32 (C, *patch_size), label (1, *patch_size) or None)``, C-contiguous.
        """
        matrix = self.draw_spatial(rng, patch_size)
        if matrix is None:
            out = crop_padded(image, start, patch_size).astype(np.float32, copy=False)
            out_label = None if label is None else crop_padded(label, start, patch_size)
        else:
            centre = np.asarray(start, dtype=np.float64) + (np.asarray(patch_size) - 1) / 2
            out, out_label = spatial_patch(
                image, label, centre, patch_size, matrix, self.image_order, self.label_order
            )
        out, out_label = self.intensity(out, out_label, rng)
        out = np.ascontiguousarray(out)
        return out, None if out_label is None else np.ascontiguousarray(out_label)


def plain_patch(
    image: np.ndarray, label: np.ndarray | None, start: Sequence[int], patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """The un-augmented patch ``volume[:, start:start + patch_size]`` (zeros outside), float32 image."""
    out = crop_padded(image, start, patch_size).astype(np.float32, copy=False)
    return out, None if label is None else crop_padded(label, start, patch_size)
