"""nnU-Net-style preprocessing with an on-disk cache, and its inverse for predictions (spec §3).

Per case, in nnU-Net v2's order:

1. **Load** with TorchIO (``tio.ScalarImage(path).data``: ``(C, W, H, D)``, TorchIO's axis order, nothing
   reoriented); one file per channel or one multi-channel file. Channel files must share the spatial
   shape (error) and should share the affine (warning); the label must have the image's spatial shape
   and hold non-negative integers (below ``num_classes`` when known).
2. **Crop** to the bounding box of the voxels that are non-zero in any channel (the whole volume when
   everything is zero). The non-zero mask, with its holes filled (``scipy.ndimage.binary_fill_holes``,
   as nnU-Net), is kept for step 3.
3. **Normalise** each channel (scheme per channel, see :func:`resolve_normalization`):

   * ``"ct"``: clip to the 0.5 and 99.5 percentiles of the foreground (label > 0) intensities of the
     training set, then subtract their mean and divide by their standard deviation. As in nnU-Net the
     mean and std are those of the *unclipped* foreground intensities, and each training case
     contributes at most 10,000 foreground voxels (drawn with a fixed seed) to the statistics.
   * ``"zscore"``: per image, ``(x − mean) / std`` over the (hole-filled) non-zero mask; voxels outside
     the mask are set to 0 (nnU-Net's ``use_mask_for_norm``).
   * ``"none"``: unchanged.

4. **Resample** to the target spacing (given, or the per-axis median spacing of the training set read
   from the headers) when it differs from the case's spacing (relative tolerance 1e-5; otherwise the
   case is left untouched, so that a target equal to the original spacing is exact). The new grid has
   ``round(shape · spacing / target)`` voxels per axis, the same orientation and the same centre as the
   cropped grid, so it never extends past the cropped field of view by more than half a voxel.
   Images use TorchIO's ``Resample`` with ``image_interpolation="bspline"`` (3rd-order B-spline, nnU-Net's
   order 3; ``"linear"`` is the cheaper option). Labels use nearest neighbour (``label_interpolation=
   "nearest"``) or, like nnU-Net, linear interpolation of the one-hot encoding followed by an argmax
   (``"onehot_linear"``, costs one float volume per class).

**Cache.** Results go to ``<cache_root>/<plan key>/<case key>/`` as ``image.npy`` (float32
``(C, W', H', D')``), ``label.npy`` (``(1, W', H', D')``, uint8, or int16/int32 for more classes) and
``meta.json``. The plan key hashes every preprocessing parameter after resolution (target spacing,
normalisation per channel, CT statistics, interpolations, cache version); the CT statistics and median
spacing themselves are cached in ``<cache_root>/fingerprint-<key>.json``, keyed by the training files.
The case key hashes the case name and the path, size and modification time of each source file, so an
edited file is preprocessed again while the rest of the cache is reused. Every entry is written to a
temporary folder and renamed into place (atomic on POSIX): a crashed or concurrent run never leaves a
half-written entry, and a second run reads instead of recomputing. Stale entries are not deleted.

**Metadata** (``meta``, per case; JSON on disk, numpy/tuples once loaded by :func:`meta_from_json`):

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

:func:`invert_to_original` maps ``(K, *preprocessed_shape)`` probabilities or logits back onto the
original grid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from mambaclinix.data.datasets import Case, DatasetError

logger = logging.getLogger(__name__)

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

CACHE_VERSION = 1
NORMALIZATIONS = ("ct", "zscore", "none")
IMAGE_INTERPOLATIONS = ("bspline", "linear")
LABEL_INTERPOLATIONS = ("nearest", "onehot_linear")
FOREGROUND_SAMPLES_PER_CASE = 10_000
_FOREGROUND_SEED = 1234
_SPACING_RTOL = 1e-5


class IntensityStats(NamedTuple):
    """Foreground intensity statistics of one channel over the training set (for ``"ct"``)."""

    mean: float
    std: float
    lower: float  # 0.5 percentile
    upper: float  # 99.5 percentile


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

    @property
    def key(self) -> str:
        """16 hex digits hashing :meth:`to_json`: the name of this plan's cache folder."""
        return _hash(self.to_json())


@dataclass(frozen=True)
class PreprocessedCase:
    """Output of :func:`preprocess_case`: arrays on the preprocessed grid and the JSON metadata."""

    image: np.ndarray  # float32 (C, W', H', D')
    label: np.ndarray | None  # integer (1, W', H', D')
    meta: dict[str, Any]  # JSON-serialisable, see the module docstring


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk.

    Attributes:
        name: case name.
        directory: the entry's folder.
        image_path: ``image.npy``.
        label_path: ``label.npy`` or ``None``.
        meta: metadata as loaded by :func:`meta_from_json`.
        from_cache: ``True`` when the entry existed before this call (nothing was recomputed).
    """

    name: str
    directory: Path
    image_path: Path
    label_path: Path | None
    meta: dict[str, Any]
    from_cache: bool


# ----------------------------------------------------------------------------------------------- utils


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    s = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(s[0]), float(s[1]), float(s[2])


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def case_signature(case: Case) -> list:
    """Name, and absolute path, size and mtime (ns) of every source file of a case."""
    files = [*case.image_paths, *([case.label_path] if case.label_path is not None else [])]
    sig: list = [case.name]
    for path in files:
        try:
            st = Path(path).stat()
        except FileNotFoundError as err:
            raise DatasetError(f"case '{case.name}': file does not exist: {path}") from err
        sig.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return sig


def case_key(case: Case) -> str:
    """Folder name of a case's cache entry: a readable prefix of the name plus a hash of its files."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case.name)[:64]
    return f"{safe}-{_hash(case_signature(case))}"


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


def nonzero_bbox(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``((start, stop), …)`` per axis of the ``True`` voxels; the whole array when there are none."""
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bbox.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, int(mask.shape[axis])))
    return tuple(bbox)


def resampled_grid(
    shape: Sequence[int], affine: np.ndarray, target_spacing: Sequence[float]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid with ``target_spacing``: same orientation and centre, ``round(shape · spacing / target)`` voxels.

    Returns:
        ``(shape, affine)`` of the new grid.
    """
    affine = np.asarray(affine, dtype=np.float64)
    old = np.asarray(_spacing(affine))
    new = np.asarray(target_spacing, dtype=np.float64)
    old_shape = np.asarray(shape, dtype=np.float64)
    new_shape = np.maximum(1, np.round(old_shape * old / new)).astype(int)
    linear = affine[:3, :3] * (new / old)[None, :]
    centre = affine[:3, :3] @ ((old_shape - 1) / 2) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ ((new_shape - 1) / 2)
    return (int(new_shape[0]), int(new_shape[1]), int(new_shape[2])), out


# ----------------------------------------------------------------------------------------------- loading


def load_case(
    case: Case, num_channels: int | None = None, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Load a case as TorchIO does, with validation.

    Returns:
        ``image`` float32 ``(C, W, H, D)``, its ``(4, 4)`` affine, ``label`` int64 ``(W, H, D)`` or ``None``.

    Raises:
        DatasetError: unreadable or truncated file, NaN/inf intensities, channel count different from
            ``num_channels``, channel files or label with another spatial shape, label values that are
            negative, fractional or ``>= num_classes`` (each names the case and file).
    """
    from mambaclinix.data.validation import nifti_truncation

    for path in (*case.image_paths, *(() if case.label_path is None else (case.label_path,))):
        truncated = nifti_truncation(path)  # SimpleITK would zero-fill the missing voxels silently
        if truncated is not None:
            raise DatasetError(f"case '{case.name}': corrupt NIfTI file {path}: {truncated}")
    channels, affine = [], None
    for path in case.image_paths:
        try:
            image = tio.ScalarImage(path)
            data = image.data
        except Exception as err:  # TorchIO raises RuntimeError/ValueError/OSError depending on the reader
            raise DatasetError(f"case '{case.name}': cannot read image {path}: {err}") from err
        if len(case.image_paths) > 1 and data.shape[0] != 1:
            raise DatasetError(f"case '{case.name}': channel file {path} has {data.shape[0]} channels, not 1")
        if affine is None:
            affine, shape = image.affine, tuple(data.shape[1:])
        else:
            if tuple(data.shape[1:]) != shape:
                raise DatasetError(
                    f"case '{case.name}': {path} has spatial shape {tuple(data.shape[1:])}, "
                    f"expected {shape} like {case.image_paths[0]}"
                )
            if not np.allclose(image.affine, affine, atol=1e-3, rtol=1e-5):
                logger.warning(
                    "case '%s': %s has a different affine than %s", case.name, path, case.image_paths[0]
                )
        array = data.numpy().astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise DatasetError(
                f"case '{case.name}': image {path} has {int(np.isnan(array).sum())} NaN and "
                f"{int(np.isinf(array).sum())} infinite intensities; expected finite values"
            )
        channels.append(array)
    image_array = np.concatenate(channels, axis=0) if len(channels) > 1 else channels[0]
    if num_channels is not None and image_array.shape[0] != num_channels:
        raise DatasetError(
            f"case '{case.name}': mixed channel counts: {image_array.shape[0]} channel(s) in "
            f"{[str(p) for p in case.image_paths]}, expected {num_channels}"
        )
    label = None
    if case.label_path is not None:
        try:
            label_image = tio.LabelMap(case.label_path)
            raw = label_image.data
        except Exception as err:
            raise DatasetError(f"case '{case.name}': cannot read label {case.label_path}: {err}") from err
        if raw.shape[0] != 1:
            raise DatasetError(
                f"case '{case.name}': label {case.label_path} has {raw.shape[0]} channels, not 1"
            )
        if tuple(raw.shape[1:]) != tuple(image_array.shape[1:]):
            raise DatasetError(
                f"case '{case.name}': label {case.label_path} has spatial shape {tuple(raw.shape[1:])}, "
                f"expected the image's {tuple(image_array.shape[1:])}"
            )
        if not np.allclose(label_image.affine, affine, atol=1e-3, rtol=1e-5):
            logger.warning(
                "case '%s': label %s has a different affine than its image", case.name, case.label_path
            )
        values = raw[0].numpy()
        if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
            raise DatasetError(f"case '{case.name}': label {case.label_path} has non-integer values")
        label = values.astype(np.int64, copy=False)
        low, high = int(label.min()), int(label.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            raise DatasetError(
                f"case '{case.name}': label {case.label_path} has values in [{low}, {high}], "
                f"expected 0..{(num_classes - 1) if num_classes is not None else 'K-1'}"
            )
    assert affine is not None
    return image_array, np.asarray(affine, dtype=np.float64), label


# ------------------------------------------------------------------------------------------ fingerprint


@dataclass(frozen=True)
class Fingerprint:
    """Dataset properties the preprocessing plan and the dataset planner need.

    Attributes:
        spacings: spacing (mm) of every case, per axis of TorchIO's array.
        intensity: foreground (label > 0) intensity statistics per channel (``None`` when not computed).
        shapes: spatial shape of every case (``None`` unless computed with ``full=True``).
        cropped_shapes: shape of every case after cropping to the non-zero region (``full=True``).
        class_voxels: label value → voxels of that class over all cases (``full=True``).
    """

    spacings: tuple[tuple[float, float, float], ...]
    intensity: tuple[IntensityStats, ...] | None
    shapes: tuple[tuple[int, int, int], ...] | None = None
    cropped_shapes: tuple[tuple[int, int, int], ...] | None = None
    class_voxels: dict[int, int] | None = None

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        m = np.median(np.asarray(self.spacings), axis=0)
        return float(m[0]), float(m[1]), float(m[2])

    def to_json(self) -> dict[str, Any]:
        def rows(value):
            return None if value is None else [list(s) for s in value]

        voxels = self.class_voxels
        return {
            "spacings": rows(self.spacings),
            "intensity": rows(self.intensity),
            "shapes": rows(self.shapes),
            "cropped_shapes": rows(self.cropped_shapes),
            "class_voxels": None if voxels is None else {str(k): v for k, v in voxels.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fingerprint:
        def shapes(key: str):
            value = data.get(key)
            return None if value is None else tuple(tuple(int(v) for v in s) for s in value)

        intensity = data["intensity"]
        voxels = data.get("class_voxels")
        return cls(
            spacings=tuple(tuple(float(v) for v in s) for s in data["spacings"]),  # type: ignore[misc]
            intensity=None if intensity is None else tuple(IntensityStats(*s) for s in intensity),
            shapes=shapes("shapes"),  # type: ignore[arg-type]
            cropped_shapes=shapes("cropped_shapes"),  # type: ignore[arg-type]
            class_voxels=None if voxels is None else {int(k): int(v) for k, v in voxels.items()},
        )


def compute_fingerprint(
    cases: Sequence[Case],
    num_channels: int,
    with_intensity: bool,
    cache_root: str | Path | None = None,
    full: bool = False,
    num_classes: int | None = None,
) -> Fingerprint:
    """Spacing of every training case (from the headers) and, with ``with_intensity``, the foreground
    intensity statistics of every channel (reads images and labels).

    With ``full`` (the dataset planner, :mod:`mambaclinix.planning`) every image and label is read and the
    fingerprint also holds the shapes, the shapes after cropping to the non-zero region (as
    :func:`preprocess_case` crops) and the voxel count of every class; the intensity statistics are
    computed too. Each case contributes at most ``FOREGROUND_SAMPLES_PER_CASE`` foreground voxels (drawn
    with a fixed seed) to the statistics, so the CT statistics are the same with or without ``full``.

    Cached in ``cache_root/fingerprint-<key>.json`` when ``cache_root`` is given.

    Raises:
        DatasetError: no cases; ``with_intensity``/``full`` but a case has no label or no case has
            foreground; the errors of :func:`load_case` (with ``num_classes``: label values out of range).
    """
    if not cases:
        raise DatasetError("cannot compute the dataset fingerprint: there are no training cases")
    with_intensity = with_intensity or full
    key_parts: list = [CACHE_VERSION, num_channels, with_intensity, [case_signature(c) for c in cases]]
    if full:
        key_parts.append(["full", num_classes])
    key = _hash(key_parts)
    path = Path(cache_root) / f"fingerprint-{key}.json" if cache_root is not None else None
    if path is not None and path.is_file():
        return Fingerprint.from_json(json.loads(path.read_text()))
    spacings = []
    shapes: list[tuple[int, int, int]] = []
    cropped: list[tuple[int, int, int]] = []
    class_voxels: dict[int, int] = {}
    samples: list[list[np.ndarray]] = [[] for _ in range(num_channels)]
    for case in cases:
        if with_intensity:
            if case.label_path is None:
                raise DatasetError(f"case '{case.name}': CT statistics need a label, none given")
            image, affine, label = load_case(case, num_channels, num_classes)
            assert label is not None
            fg = np.flatnonzero(label.reshape(-1) > 0)
            if fg.size > FOREGROUND_SAMPLES_PER_CASE:
                rng = np.random.default_rng(_FOREGROUND_SEED)
                fg = np.sort(rng.choice(fg, FOREGROUND_SAMPLES_PER_CASE, replace=False))
            flat = image.reshape(image.shape[0], -1)
            for c in range(num_channels):
                samples[c].append(flat[c, fg].astype(np.float64))
            if full:
                shapes.append(tuple(int(n) for n in image.shape[1:]))  # type: ignore[arg-type]
                bbox = nonzero_bbox((image != 0).any(axis=0))
                cropped.append(tuple(b - a for a, b in bbox))  # type: ignore[arg-type]
                counts = np.bincount(label.reshape(-1))
                for value in np.flatnonzero(counts):
                    class_voxels[int(value)] = class_voxels.get(int(value), 0) + int(counts[value])
        else:
            affine = tio.ScalarImage(case.image_paths[0]).affine
        spacings.append(_spacing(affine))
    intensity = None
    if with_intensity:
        stats = []
        for c in range(num_channels):
            values = np.concatenate(samples[c])
            if values.size == 0:
                raise DatasetError("CT normalisation: the training labels contain no foreground voxels")
            lower, upper = np.percentile(values, [0.5, 99.5])
            stats.append(
                IntensityStats(float(values.mean()), float(values.std()), float(lower), float(upper))
            )
        intensity = tuple(stats)
    fingerprint = Fingerprint(
        tuple(spacings),
        intensity,
        tuple(shapes) if full else None,
        tuple(cropped) if full else None,
        dict(sorted(class_voxels.items())) if full else None,
    )
    if path is not None:
        _write_json_atomic(path, {**fingerprint.to_json(), "cases": [c.name for c in cases]})
    return fingerprint


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


# --------------------------------------------------------------------------------------- preprocessing


def _normalize(image: np.ndarray, mask: np.ndarray, plan: PreprocessingPlan) -> np.ndarray:
    out = np.empty_like(image, dtype=np.float32)
    for c, scheme in enumerate(plan.normalization):
        x = image[c]
        if scheme == "ct":
            stats = plan.intensity[c]
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


def _label_dtype(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.int16, np.int32):  # torch has little support for uint16/uint32
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _resample(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    grid: tuple[tuple[int, int, int], np.ndarray],
    plan: PreprocessingPlan,
) -> tuple[np.ndarray, np.ndarray | None]:
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image), affine=affine))
    if label is not None:
        if plan.label_interpolation == "nearest":
            subject["label"] = tio.LabelMap(
                tensor=torch.from_numpy(label[None].astype(np.int32)), affine=affine
            )
        else:  # one-hot, linear, argmax (nnU-Net); the case's own classes suffice for the argmax
            k = int(label.max()) + 1
            onehot = (label[None] == np.arange(k).reshape(k, 1, 1, 1)).astype(np.float32)
            subject["onehot"] = tio.ScalarImage(tensor=torch.from_numpy(onehot), affine=affine)
    target = grid
    names = ["image", "label"] if "label" in subject else ["image"]
    tio.Resample(
        target,
        image_interpolation=plan.image_interpolation,
        label_interpolation="nearest",
        include=names,
        copy=False,
    )(subject)
    if "onehot" in subject:
        tio.Resample(target, image_interpolation="linear", include=["onehot"], copy=False)(subject)
    out_image = subject["image"].data.numpy().astype(np.float32, copy=False)
    out_label = None
    if label is not None:
        if plan.label_interpolation == "nearest":
            out_label = subject["label"].data[0].numpy().astype(np.int64)
        else:
            out_label = subject["onehot"].data.argmax(0).numpy().astype(np.int64)
    return out_image, out_label


def preprocess_case(case: Case, plan: PreprocessingPlan, num_classes: int | None = None) -> PreprocessedCase:
    """Crop, normalise and resample one case (see the module docstring).

    Args:
        case: the case to preprocess.
        plan: resolved parameters (:func:`make_plan`); its channel count is checked against the image.
        num_classes: when given, label values must be below it.
    """
    image, affine, label = load_case(case, plan.num_channels, num_classes)
    original_shape = tuple(int(n) for n in image.shape[1:])
    nonzero = (image != 0).any(axis=0)
    if not nonzero.any():
        logger.warning("case '%s': the image is zero everywhere; nothing is cropped", case.name)
    bbox = nonzero_bbox(nonzero)
    crop = tuple(slice(a, b) for a, b in bbox)
    if label is not None:
        lost = int(np.count_nonzero(label)) - int(np.count_nonzero(label[crop]))
        if lost:
            logger.warning(
                "case '%s': %d labelled voxel(s) lie outside the non-zero image region and are cropped away",
                case.name,
                lost,
            )
    image = np.ascontiguousarray(image[(slice(None), *crop)])
    mask = ndimage.binary_fill_holes(nonzero[crop]) if nonzero.any() else np.ones(image.shape[1:], bool)
    if label is not None:
        label = np.ascontiguousarray(label[crop])
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ np.array([a for a, _ in bbox], dtype=np.float64) + affine[:3, 3]
    cropped_shape = tuple(int(n) for n in image.shape[1:])

    image = _normalize(image, mask, plan)

    spacing = _spacing(cropped_affine)
    if np.allclose(spacing, plan.target_spacing, rtol=_SPACING_RTOL, atol=0):
        new_shape, new_affine, new_spacing = cropped_shape, cropped_affine, spacing
    else:
        new_shape, new_affine = resampled_grid(cropped_shape, cropped_affine, plan.target_spacing)
        new_spacing = plan.target_spacing
        image, label = _resample(image, label, cropped_affine, (new_shape, new_affine), plan)

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
        "original_spacing": list(_spacing(affine)),
        "crop_bbox": [list(b) for b in bbox],
        "cropped_shape": list(cropped_shape),
        "cropped_affine": cropped_affine.tolist(),
        "spacing": [float(v) for v in new_spacing],
        "preprocessed_shape": list(new_shape),
        "preprocessed_affine": np.asarray(new_affine).tolist(),
        "normalization": list(plan.normalization),
        "classes_present": classes,
    }
    return PreprocessedCase(np.ascontiguousarray(image, dtype=np.float32), label, meta)


def meta_from_json(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as stored in ``meta.json`` → affines as float64 ``(4, 4)`` arrays, shapes and spacings as
    tuples, ``crop_bbox`` as a tuple of ``(start, stop)``."""
    out = dict(meta)
    for key in ("original_affine", "cropped_affine", "preprocessed_affine"):
        out[key] = np.asarray(meta[key], dtype=np.float64)
    for key in ("original_shape", "cropped_shape", "preprocessed_shape", "classes_present"):
        out[key] = tuple(int(v) for v in meta[key])
    for key in ("original_spacing", "spacing"):
        out[key] = tuple(float(v) for v in meta[key])
    out["crop_bbox"] = tuple((int(a), int(b)) for a, b in meta["crop_bbox"])
    out["normalization"] = tuple(meta["normalization"])
    out["image_paths"] = [str(p) for p in meta["image_paths"]]
    return out


def read_cached_array(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO ``reader`` for cache entries: the ``.npy`` array and the preprocessed affine from the
    ``meta.json`` beside it."""
    path = Path(path)
    try:
        array = np.load(path)
        affine = np.asarray(json.loads((path.parent / "meta.json").read_text())["preprocessed_affine"])
    except Exception as err:  # truncated/corrupt .npy or meta.json, file removed under a running job
        raise DatasetError(
            f"preprocessed case {path.parent.name}: cannot read {path} ({type(err).__name__}: {err}); "
            f"delete the folder {path.parent} to have the case preprocessed again"
        ) from err
    return torch.from_numpy(array), affine


# ----------------------------------------------------------------------------------------------- cache


def _load_entry(case: Case, directory: Path, from_cache: bool) -> CachedCase:
    meta = meta_from_json(json.loads((directory / "meta.json").read_text()))
    label = directory / "label.npy"
    return CachedCase(
        case.name, directory, directory / "image.npy", label if label.is_file() else None, meta, from_cache
    )


def _store(case: Case, plan_json: dict, directory: str, num_classes: int | None) -> str:
    """Preprocess one case and move it into ``directory`` atomically (a process-pool task)."""
    final = Path(directory)
    plan = PreprocessingPlan(
        target_spacing=tuple(plan_json["target_spacing"]),  # type: ignore[arg-type]
        normalization=tuple(plan_json["normalization"]),
        intensity=tuple(None if s is None else IntensityStats(*s) for s in plan_json["intensity"]),
        image_interpolation=plan_json["image_interpolation"],
        label_interpolation=plan_json["label_interpolation"],
    )
    result = preprocess_case(case, plan, num_classes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        np.save(tmp / "image.npy", result.image)
        if result.label is not None:
            np.save(tmp / "label.npy", result.label)
        (tmp / "meta.json").write_text(json.dumps(result.meta, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return case.name


def preprocess_to_cache(
    cases: Sequence[Case],
    plan: PreprocessingPlan,
    cache_root: str | Path,
    num_classes: int | None = None,
    num_workers: int = 0,
) -> list[CachedCase]:
    """Preprocess the cases missing from ``cache_root/<plan.key>/`` and return every entry.

    Args:
        cases: the cases (with or without labels).
        plan: resolved parameters.
        cache_root: cache folder; entries go to ``cache_root/<plan.key>/<case_key(case)>/``.
        num_classes: when given, label values must be below it.
        num_workers: processes for the missing cases (``0``: this process). Workers are spawned, not
            forked, so that they do not inherit the threads of an initialised torch.

    Returns:
        One :class:`CachedCase` per case, in order; ``from_cache`` tells whether it was reused.
    """
    plan_dir = Path(cache_root) / plan.key
    plan_dir.mkdir(parents=True, exist_ok=True)
    if not (plan_dir / "plan.json").is_file():
        _write_json_atomic(plan_dir / "plan.json", plan.to_json())
    directories = [plan_dir / case_key(c) for c in cases]
    missing = [(c, d) for c, d in zip(cases, directories, strict=True) if not (d / "meta.json").is_file()]
    if missing:
        logger.info("preprocessing %d of %d case(s) into %s", len(missing), len(cases), plan_dir)
        plan_json = plan.to_json()
        if num_workers > 0 and len(missing) > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(num_workers, len(missing)), mp_context=context) as pool:
                futures = [pool.submit(_store, c, plan_json, str(d), num_classes) for c, d in missing]
                for future in futures:
                    future.result()
        else:
            for c, d in missing:
                _store(c, plan_json, str(d), num_classes)
    missing_dirs = {d for _, d in missing}
    return [_load_entry(c, d, d not in missing_dirs) for c, d in zip(cases, directories, strict=True)]


# ------------------------------------------------------------------------------------------- inversion


def _interp_axis(x: torch.Tensor, coords: np.ndarray, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at fractional ``coords`` (clamped to the edges)."""
    n = x.shape[dim]
    c = np.clip(coords, 0.0, n - 1)
    rounded = np.round(c)
    c = np.where(np.abs(c - rounded) < 1e-6, rounded, c)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = torch.as_tensor(c - i0, dtype=x.dtype, device=x.device)
    shape = [1] * x.ndim
    shape[dim] = -1
    w = w.reshape(shape)
    x0 = x.index_select(dim, torch.as_tensor(i0, device=x.device))
    x1 = x.index_select(dim, torch.as_tensor(i1, device=x.device))
    return x0 + (x1 - x0) * w


def _resample_axis_aligned(
    x: torch.Tensor, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray
) -> torch.Tensor:
    """Trilinear resampling of ``x`` ``(K, *src)`` onto a grid whose axes are parallel to the source's."""
    mapping = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    linear = mapping[:3, :3]
    diagonal = np.diag(linear)
    if np.abs(linear - np.diag(diagonal)).max() > 1e-4 * max(np.abs(diagonal).max(), 1e-12):
        raise ValueError("invert_to_original: the preprocessed and cropped grids are not axis-aligned")
    for axis in range(3):
        coords = diagonal[axis] * np.arange(dst_shape[axis]) + mapping[axis, 3]
        if dst_shape[axis] == x.shape[axis + 1] and np.allclose(
            coords, np.arange(dst_shape[axis]), atol=1e-6
        ):
            continue
        x = _interp_axis(x, coords, axis + 1)
    return x


def invert_to_original(
    tensor: torch.Tensor,
    meta: Mapping[str, Any],
    background: float | Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Map per-class maps on the preprocessed grid back onto the original image's grid.

    The tensor is resampled linearly (per channel, separable trilinear interpolation, values beyond the
    preprocessed field of view taken from its nearest edge voxel) onto the cropped grid, then pasted into
    a volume of the original shape filled with ``background``. Linear interpolation suits probabilities
    and logits alike; take the argmax *after* this call. The result is indexed like
    ``tio.ScalarImage(meta["image_paths"][0]).data[0]`` voxel for voxel, so it can be written with
    ``meta["original_affine"]`` (e.g. ``mambaclinix.inference.write_segmentation``).

    Args:
        tensor: ``(K, *meta["preprocessed_shape"])`` floating probabilities or logits (any device; kept).
        meta: the case's metadata (a batch's ``meta[i]``, or :func:`meta_from_json` output).
        background: value of each channel outside the crop box: a scalar, ``K`` values, or ``None`` for
            one-hot background (channel 0 gets 1, the others 0; with K = 1 everything gets 0). With
            probabilities the default is exact; with logits it argmaxes to background too.

    Returns:
        ``(K, *meta["original_shape"])`` tensor with ``tensor``'s dtype and device.
    """
    if tensor.ndim != 4:
        raise ValueError(f"invert_to_original: tensor must be (K, W, H, D), got shape {tuple(tensor.shape)}")
    expected = tuple(int(v) for v in meta["preprocessed_shape"])
    if tuple(tensor.shape[1:]) != expected:
        raise ValueError(
            f"invert_to_original: tensor spatial shape {tuple(tensor.shape[1:])} differs from the "
            f"preprocessed shape {expected} of case '{meta.get('name')}'"
        )
    x = tensor if tensor.is_floating_point() else tensor.float()
    k = x.shape[0]
    cropped = _resample_axis_aligned(
        x,
        np.asarray(meta["preprocessed_affine"]),
        [int(v) for v in meta["cropped_shape"]],
        np.asarray(meta["cropped_affine"]),
    )
    if background is None:
        fill = torch.zeros(k, dtype=x.dtype, device=x.device)
        if k > 1:
            fill[0] = 1
    else:
        fill = torch.as_tensor(background, dtype=x.dtype, device=x.device).reshape(-1)
        if fill.numel() == 1:
            fill = fill.expand(k)
        elif fill.numel() != k:
            raise ValueError(f"invert_to_original: background has {fill.numel()} values for {k} channels")
    shape = tuple(int(v) for v in meta["original_shape"])
    out = fill.reshape(k, 1, 1, 1).expand(k, *shape).clone()
    (a0, b0), (a1, b1), (a2, b2) = ((int(a), int(b)) for a, b in meta["crop_bbox"])
    out[:, a0:b0, a1:b1, a2:b2] = cropped
    return out
