"""nnU-Net-style preprocessing of one case, the plan that parameterises it, and the names of the pipeline.

Per case, in nnU-Net v2's order (``docs/data.md`` describes each step):

1. **Load** with TorchIO, validating the arrays (:func:`~mambaclinix.data.loading.load_case`).
2. **Crop** to the bounding box of the voxels non-zero in any channel, keeping the hole-filled non-zero
   mask (:func:`~mambaclinix.data.loading.crop_to_nonzero`).
3. **Normalise** each channel: ``"ct"``, ``"zscore"`` or ``"none"``
   (:mod:`mambaclinix.data.normalization`; the CT statistics come from the training set's fingerprint,
   :mod:`mambaclinix.data.fingerprint`).
4. **Resample** to the target spacing (given, or the per-axis median spacing of the training set) when
   it differs from the case's (:mod:`mambaclinix.data.resampling`).

:class:`PreprocessingPlan` holds every parameter, resolved against the training set by :func:`make_plan`;
:func:`preprocess_case` runs the four steps on one case; :func:`preprocess_to_cache` runs them on the
cases missing from the on-disk cache (:mod:`mambaclinix.data.cache`), in worker processes if asked. The
public names of the step modules and of the cache are re-exported here.

**Metadata** (``meta``, per case; JSON on disk, numpy/tuples once loaded by
:func:`~mambaclinix.data.cache.meta_from_json`):

=======================  =====================================================================
``name``                 case name
``image_paths``          original image file(s), ``list[str]``
``label_path``           original label file or ``None``
``original_shape``       spatial shape of ``tio.ScalarImage(image_paths[0]).data``
``original_affine``      ``(4, 4)`` float64, TorchIO's RAS affine of the original image
``original_spacing``     spacing (mm) before preprocessing
``crop_bbox``            ``((start, stop), …)`` per axis, original voxel indices
``cropped_shape``        shape after cropping
``cropped_affine``       affine of the cropped grid
``spacing``              spacing (mm) after preprocessing: the grid of the loader's tensors
``preprocessed_shape``   spatial shape after preprocessing
``preprocessed_affine``  affine of the preprocessed grid
``normalization``        scheme per channel
``classes_present``      label values present after preprocessing (``()`` without a label)
=======================  =====================================================================

:func:`mambaclinix.inference.invert_to_original` (re-exported here) maps ``(K, *preprocessed_shape)``
probabilities or logits back onto the original grid.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mambaclinix.data.cache import (
    CACHE_VERSION,
    CachedCase,
    case_key,
    is_entry,
    load_entry,
    meta_from_json,
    read_cached_array,
    stable_hash,
    write_entry,
)
from mambaclinix.data.cache import case_signature as case_signature
from mambaclinix.data.cases import Case
from mambaclinix.data.fingerprint import FOREGROUND_SAMPLES_PER_CASE as FOREGROUND_SAMPLES_PER_CASE
from mambaclinix.data.fingerprint import Fingerprint, compute_fingerprint
from mambaclinix.data.loading import crop_to_nonzero, load_case, nonzero_bbox
from mambaclinix.data.normalization import NORMALIZATIONS, IntensityStats, normalize, resolve_normalization
from mambaclinix.data.resampling import (
    IMAGE_INTERPOLATIONS,
    LABEL_INTERPOLATIONS,
    needs_resampling,
    resample,
    resampled_grid,
    spacing_of,
)
from mambaclinix.inference.geometry import invert_to_original
from mambaclinix.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

# Every name of the former single module stays importable from here: those in __all__, and the ones
# imported ``as`` themselves above (case_signature, FOREGROUND_SAMPLES_PER_CASE), plus the constants and
# helpers this module uses (NORMALIZATIONS, IMAGE_/LABEL_INTERPOLATIONS, CACHE_VERSION, case_key).
__all__ = [
    "CachedCase",
    "Fingerprint",
    "IntensityStats",
    "PreprocessedCase",
    "PreprocessingPlan",
    "compute_fingerprint",
    "invert_to_original",
    "load_case",
    "make_plan",
    "meta_from_json",
    "nonzero_bbox",
    "preprocess_case",
    "preprocess_to_cache",
    "read_cached_array",
    "resampled_grid",
    "resolve_normalization",
]


@dataclass(frozen=True)
class PreprocessingPlan:
    """Every parameter of the preprocessing, resolved (hashable into the cache key).

    Attributes:
        target_spacing: spacing (mm) of the preprocessed grid, per axis of TorchIO's array.
        normalization: ``"ct"``, ``"zscore"`` or ``"none"`` per channel.
        intensity: CT statistics per channel (``None`` for channels that are not ``"ct"``).
        image_interpolation: ``"bspline"`` or ``"linear"``.
        label_interpolation: ``"nearest"`` or ``"onehot_linear"``.
    """

    target_spacing: tuple[float, float, float]
    normalization: tuple[str, ...]
    intensity: tuple[IntensityStats | None, ...]
    image_interpolation: str = "bspline"
    label_interpolation: str = "nearest"

    def __post_init__(self) -> None:
        if len(self.target_spacing) != 3 or not all(s > 0 for s in self.target_spacing):
            raise ValueError(f"target_spacing must be 3 positive numbers, got {self.target_spacing}")
        bad = [n for n in self.normalization if n not in NORMALIZATIONS]
        if bad:
            raise ValueError(f"normalization must be among {NORMALIZATIONS}, got {bad}")
        if len(self.intensity) != len(self.normalization):
            raise ValueError("intensity must have one entry per channel")
        for n, stats in zip(self.normalization, self.intensity, strict=True):
            if n == "ct" and stats is None:
                raise ValueError("a 'ct' channel needs its IntensityStats")
        if self.image_interpolation not in IMAGE_INTERPOLATIONS:
            raise ValueError(
                f"image_interpolation must be one of {IMAGE_INTERPOLATIONS}, got {self.image_interpolation!r}"
            )
        if self.label_interpolation not in LABEL_INTERPOLATIONS:
            raise ValueError(
                f"label_interpolation must be one of {LABEL_INTERPOLATIONS}, got {self.label_interpolation!r}"
            )

    @property
    def num_channels(self) -> int:
        return len(self.normalization)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "target_spacing": [float(s) for s in self.target_spacing],
            "normalization": list(self.normalization),
            "intensity": [None if s is None else [float(v) for v in s] for s in self.intensity],
            "image_interpolation": self.image_interpolation,
            "label_interpolation": self.label_interpolation,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PreprocessingPlan:
        """The plan :meth:`to_json` describes."""
        return cls(
            target_spacing=tuple(data["target_spacing"]),  # type: ignore[arg-type]
            normalization=tuple(data["normalization"]),
            intensity=tuple(None if s is None else IntensityStats(*s) for s in data["intensity"]),
            image_interpolation=data["image_interpolation"],
            label_interpolation=data["label_interpolation"],
        )

    @property
    def key(self) -> str:
        """16 hex digits hashing :meth:`to_json`: the name of this plan's cache folder."""
        return stable_hash(self.to_json())


@dataclass(frozen=True)
class PreprocessedCase:
    """Output of :func:`preprocess_case`: arrays on the preprocessed grid and the JSON metadata."""

    image: np.ndarray  # float32 (C, W', H', D')
    label: np.ndarray | None  # integer (1, W', H', D')
    meta: dict[str, Any]  # JSON-serialisable, see the module docstring


def make_plan(
    train_cases: Sequence[Case],
    channel_names: Sequence[str],
    *,
    target_spacing: Sequence[float] | None = None,
    normalization: str | Sequence[str] = "auto",
    image_interpolation: str = "bspline",
    label_interpolation: str = "nearest",
    cache_root: str | Path | None = None,
) -> PreprocessingPlan:
    """Resolve the preprocessing parameters against the training set.

    Args:
        train_cases: labelled cases whose headers give the median spacing and whose foreground gives the
            CT statistics (read only when needed: no ``target_spacing`` or a ``"ct"`` channel).
        channel_names: one name per channel (``"CT"``, ``"T2"``…) for ``normalization="auto"``.
        target_spacing: spacing (mm) of the preprocessed grid; ``None``: median of the training set.
        normalization: see :func:`resolve_normalization`.
        image_interpolation: ``"bspline"`` (3rd order) or ``"linear"``.
        label_interpolation: ``"nearest"`` or ``"onehot_linear"``.
        cache_root: where the fingerprint is cached.
    """
    schemes = resolve_normalization(normalization, channel_names)
    need_intensity = "ct" in schemes
    fingerprint = None
    if target_spacing is None or need_intensity:
        fingerprint = compute_fingerprint(train_cases, len(schemes), need_intensity, cache_root)
    spacing = tuple(float(s) for s in target_spacing) if target_spacing is not None else None
    if spacing is None:
        assert fingerprint is not None
        spacing = fingerprint.median_spacing
    stats = fingerprint.intensity if fingerprint is not None and fingerprint.intensity is not None else None
    intensity = tuple(stats[c] if scheme == "ct" and stats else None for c, scheme in enumerate(schemes))
    return PreprocessingPlan(spacing, schemes, intensity, image_interpolation, label_interpolation)  # type: ignore[arg-type]


def _label_dtype(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.int16, np.int32):  # torch has little support for uint16/uint32
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def preprocess_case(case: Case, plan: PreprocessingPlan, num_classes: int | None = None) -> PreprocessedCase:
    """Load, crop, normalise and resample one case (see the module docstring).

    Args:
        case: the case to preprocess.
        plan: resolved parameters (:func:`make_plan`); its channel count is checked against the image.
        num_classes: when given, label values must be below it.
    """
    image, affine, label = load_case(case, plan.num_channels, num_classes)
    original_shape = tuple(int(n) for n in image.shape[1:])
    cropped = crop_to_nonzero(image, label, affine, case.name)
    image, label, cropped_affine = cropped.image, cropped.label, cropped.affine
    cropped_shape = tuple(int(n) for n in image.shape[1:])

    image = normalize(image, cropped.mask, plan.normalization, plan.intensity)

    spacing = spacing_of(cropped_affine)
    if not needs_resampling(spacing, plan.target_spacing):
        new_shape, new_affine, new_spacing = cropped_shape, cropped_affine, spacing
    else:
        new_shape, new_affine = resampled_grid(cropped_shape, cropped_affine, plan.target_spacing)
        new_spacing = plan.target_spacing
        image, label = resample(
            image,
            label,
            cropped_affine,
            (new_shape, new_affine),
            plan.image_interpolation,
            plan.label_interpolation,
        )

    classes: list[int] = []
    if label is not None:
        classes = [int(v) for v in np.unique(label)]
        label = label[None].astype(_label_dtype(classes[-1]))
    meta = {
        "name": case.name,
        "image_paths": [str(p) for p in case.image_paths],
        "label_path": None if case.label_path is None else str(case.label_path),
        "original_shape": list(original_shape),
        "original_affine": affine.tolist(),
        "original_spacing": list(spacing_of(affine)),
        "crop_bbox": [list(b) for b in cropped.bbox],
        "cropped_shape": list(cropped_shape),
        "cropped_affine": cropped_affine.tolist(),
        "spacing": [float(v) for v in new_spacing],
        "preprocessed_shape": list(new_shape),
        "preprocessed_affine": np.asarray(new_affine).tolist(),
        "normalization": list(plan.normalization),
        "classes_present": classes,
    }
    return PreprocessedCase(np.ascontiguousarray(image, dtype=np.float32), label, meta)


def _store(case: Case, plan_json: dict, directory: str, num_classes: int | None) -> str:
    """Preprocess one case into its cache entry ``directory`` (a process-pool task)."""
    result = preprocess_case(case, PreprocessingPlan.from_json(plan_json), num_classes)
    write_entry(directory, result.image, result.label, result.meta)
    return case.name


def preprocess_to_cache(
    cases: Sequence[Case],
    plan: PreprocessingPlan,
    cache_root: str | Path,
    num_classes: int | None = None,
    num_workers: int = 0,
    progress: bool | None = None,
) -> list[CachedCase]:
    """Preprocess the cases missing from ``cache_root/<plan.key>/`` and return every entry.

    Args:
        cases: the cases (with or without labels).
        plan: resolved parameters.
        cache_root: cache folder; entries go to ``cache_root/<plan.key>/<case_key(case)>/``
            (:mod:`mambaclinix.data.cache`).
        num_classes: when given, label values must be below it.
        num_workers: processes for the missing cases (``0``: this process). Workers are spawned, not
            forked, so that they do not inherit the threads of an initialised torch.
        progress: show a progress bar (tqdm, on stderr) over the missing cases; ``None``: when stderr is
            a terminal.

    Returns:
        One :class:`~mambaclinix.data.cache.CachedCase` per case, in order; ``from_cache`` tells whether it
        was reused.
    """
    plan_dir = Path(cache_root) / plan.key
    plan_dir.mkdir(parents=True, exist_ok=True)
    if not (plan_dir / "plan.json").is_file():
        write_json_atomic(plan_dir / "plan.json", plan.to_json())
    directories = [plan_dir / case_key(c) for c in cases]
    missing = [(c, d) for c, d in zip(cases, directories, strict=True) if not is_entry(d)]
    if missing:
        logger.info("preprocessing %d of %d case(s) into %s", len(missing), len(cases), plan_dir)
        plan_json = plan.to_json()
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc="preprocessing", unit="case", disable=None if progress is None
                   else not progress, dynamic_ncols=True, leave=False)  # fmt: skip
        with bar:
            if num_workers > 0 and len(missing) > 1:
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(min(num_workers, len(missing)), mp_context=context) as pool:
                    futures = [pool.submit(_store, c, plan_json, str(d), num_classes) for c, d in missing]
                    for future in as_completed(futures):
                        future.result()
                        bar.update()
            else:
                for c, d in missing:
                    _store(c, plan_json, str(d), num_classes)
                    bar.update()
    missing_dirs = {d for _, d in missing}
    return [load_entry(c, d, d not in missing_dirs) for c, d in zip(cases, directories, strict=True)]
