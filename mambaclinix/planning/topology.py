"""Network topology from spacing and patch size: nnU-Net's rules for stages, strides and kernels.

Everything here is plain arithmetic on per-axis numbers (no torch, no images), in the axis order of the
arrays the network sees (TorchIO's ``(W, H, D)`` for the data module; any order works as long as spacing,
patch and shapes share it).

**Target spacing** (:func:`target_spacing`, nnU-Net v2's rule). The per-axis median of the cases'
spacings, except on an anisotropic axis: when the coarsest median spacing is more than
``anisotropy_threshold`` (3) times the largest of the other axes' spacings *and* the median size along
that axis (in voxels, after cropping) times 3 is still below the smallest of the other axes' median sizes
(few slices), that axis gets the 10th percentile of its spacings instead (never finer than the other
axes' largest spacing). This keeps more slices of thick-slice data than the median would.

**Stages, strides and kernels** (:func:`plan_topology`, nnU-Net's ``get_pool_and_conv_props`` rule).
Stage 0 has stride 1. Going down one stage at a time, an axis is halved (stride 2) when

* its current feature-map size is at least ``2 · min_feature_map_size`` (4 → 8 voxels), and
* its current effective spacing is within a factor 2 of the finest current spacing among such axes;

otherwise its stride is 1. Downsampling stops when no axis qualifies, when only one axis qualifies and
it has fewer than ``3 · min_feature_map_size`` voxels, or at ``max_stages``. A stage's kernel is 3 on an
axis whose current spacing is within a factor 2 of the finest current spacing and 1 otherwise; once 3 it
stays 3. The deepest stage always gets a 3×3×3 kernel. For spacing ``(3, 0.8, 0.8)`` this gives a
``1×3×3`` kernel and ``(1, 2, 2)`` stride first, then 3×3×3 once the in-plane effective spacing
(0.8 → 1.6) is within a factor 2 of 3 mm. Isotropic data gives 3×3×3 everywhere and strides
``1, 2, 2, …``; the number of stages follows the patch size (128³: 6 stages).

The patch must be a multiple of the product of the strides per axis (``size_divisor``);
:func:`plan_topology` rounds it up to one (nnU-Net pads it the same way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "Topology",
    "adaptive_layer_types",
    "features_per_stage",
    "plan_topology",
    "target_spacing",
]

ANISOTROPY_THRESHOLD = 3.0


@dataclass(frozen=True)
class Topology:
    """Stages of a U-Net for a patch.

    Attributes:
        patch_size: the patch, a multiple of ``size_divisor`` on every axis.
        kernel_sizes: per stage, per axis (1 or 3).
        strides: per stage, per axis (stage 0: all 1).
        size_divisor: product of the strides per axis.
    """

    patch_size: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.prod(np.asarray(self.strides), axis=0))

    def stage_shapes(self) -> list[tuple[int, ...]]:
        """Feature-map shape at every stage for ``patch_size``."""
        shapes, shape = [], np.asarray(self.patch_size)
        for st in self.strides:
            shape = shape // np.asarray(st)
            shapes.append(tuple(int(v) for v in shape))
        return shapes


def target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]] | None = None,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
) -> tuple[float, ...]:
    """The preprocessing target spacing (nnU-Net v2's rule, see the module docstring).

    Args:
        spacings: ``(N, 3)`` spacing (mm) of each case.
        shapes: ``(N, 3)`` shape of each case (after cropping, in its own voxels); ``None`` skips the
            "few slices" condition (the anisotropic axis is then decided by spacing alone).
        anisotropy_threshold: ratio above which the coarsest axis counts as anisotropic.

    Returns:
        The target spacing per axis.
    """
    sp = np.asarray(spacings, dtype=np.float64)
    if sp.ndim != 2 or sp.shape[0] == 0 or (sp <= 0).any():
        raise ValueError(f"spacings must be a non-empty (N, dims) array of positive numbers, got {sp.shape}")
    target = np.median(sp, axis=0)
    worst = int(np.argmax(target))
    others = [d for d in range(sp.shape[1]) if d != worst]
    if not others:
        return tuple(float(v) for v in target)
    max_other = float(max(target[d] for d in others))
    aniso_spacing = target[worst] > anisotropy_threshold * max_other
    aniso_voxels = True
    if shapes is not None:
        # median size on the target grid: shape · spacing / target
        sizes = np.median(np.asarray(shapes, dtype=np.float64) * sp / target, axis=0)
        aniso_voxels = sizes[worst] * anisotropy_threshold < min(sizes[d] for d in others)
    if aniso_spacing and aniso_voxels:
        tenth = float(np.percentile(sp[:, worst], 10))
        target[worst] = tenth if tenth >= max_other else max_other + 1e-5
    return tuple(float(v) for v in target)


def plan_topology(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map_size: int = 4,
    max_stages: int | None = None,
) -> Topology:
    """Stages, strides and kernels for a patch at a spacing (nnU-Net's rule, module docstring).

    Args:
        spacing: target spacing (mm) per axis.
        patch_size: requested patch (voxels) per axis; rounded up to a multiple of the size divisor.
        min_feature_map_size: smallest feature-map edge an axis may be halved to (nnU-Net: 4).
        max_stages: most stages (``None``: as many as the rule allows).

    Returns:
        The :class:`Topology` (at least one stage).
    """
    dims = len(spacing)
    if len(patch_size) != dims or any(int(p) < 1 for p in patch_size):
        raise ValueError(f"patch_size must have {dims} positive entries, got {tuple(patch_size)}")
    if any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    if max_stages is not None and max_stages < 1:
        raise ValueError(f"max_stages must be >= 1, got {max_stages}")
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(p) for p in patch_size]
    kernel = [1] * dims
    kernels: list[tuple[int, ...]] = []
    strides: list[tuple[int, ...]] = [(1,) * dims]
    while max_stages is None or len(strides) < max_stages:
        axes = [d for d in range(dims) if cur_size[d] >= 2 * min_feature_map_size]
        if not axes:
            break
        finest = min(cur_spacing[d] for d in axes)
        axes = [d for d in axes if cur_spacing[d] / finest < 2]
        if len(axes) == 1 and cur_size[axes[0]] < 3 * min_feature_map_size:
            break
        overall_finest = min(cur_spacing)
        kernel = [3 if kernel[d] == 3 or cur_spacing[d] / overall_finest < 2 else 1 for d in range(dims)]
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if d in axes else 1 for d in range(dims)))
        for d in axes:
            cur_spacing[d] *= 2
            cur_size[d] = math.ceil(cur_size[d] / 2)
    kernels.append((3,) * dims)  # the deepest stage
    divisor = np.prod(np.asarray(strides), axis=0)
    padded = tuple(int(math.ceil(p / d) * d) for p, d in zip(patch_size, divisor, strict=True))
    return Topology(padded, tuple(kernels), tuple(strides))


def features_per_stage(n_stages: int, base: int = 32, maximum: int = 320) -> tuple[int, ...]:
    """Channels per stage, ``min(base · 2**s, maximum)`` (the paper's network: 32, 64, 128, 256, 320, 320)."""
    return tuple(min(base * 2**s, maximum) for s in range(n_stages))


def adaptive_layer_types(n_stages: int) -> tuple[str, ...]:
    """The adaptive stage-wise rule: HGCN at stages ``s < ceil(n/2)``, Mamba at ``s >= ceil(n/2)``."""
    k = math.ceil(n_stages / 2)
    return ("hgcn",) * k + ("mamba",) * (n_stages - k)
