"""The dataset fingerprint: what the preprocessing plan and the dataset planner measure on the training set.

Like nnU-Net's fingerprint extraction: the spacing of every training case (read from the headers) gives
the median target spacing; the foreground (label > 0) intensities give the statistics of the ``"ct"``
normalisation (:mod:`mambaclinix.data.normalization`): their mean and standard deviation (unclipped) and
their 0.5 and 99.5 percentiles. Each training case contributes at most
:data:`FOREGROUND_SAMPLES_PER_CASE` foreground voxels, drawn with a fixed seed. The dataset planner
(:mod:`mambaclinix.planning`) also reads the shapes, the shapes after cropping and the voxels per class
(``full=True``). The fingerprint is cached as JSON beside the preprocessing cache (``docs/data.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchio as tio

from mambaclinix.data.cache import CACHE_VERSION, case_signature, stable_hash
from mambaclinix.data.cases import Case, DatasetError
from mambaclinix.data.loading import load_case, nonzero_bbox
from mambaclinix.data.normalization import IntensityStats
from mambaclinix.data.resampling import spacing_of
from mambaclinix.utils.atomic import write_json_atomic

__all__ = ["FOREGROUND_SAMPLES_PER_CASE", "Fingerprint", "compute_fingerprint"]

FOREGROUND_SAMPLES_PER_CASE = 10_000
_FOREGROUND_SEED = 1234


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
    :func:`~mambaclinix.data.loading.crop_to_nonzero` crops) and the voxel count of every class; the
    intensity statistics are computed too. Each case contributes at most ``FOREGROUND_SAMPLES_PER_CASE``
    foreground voxels (drawn with a fixed seed) to the statistics, so the CT statistics are the same with
    or without ``full``.

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
    key = stable_hash(key_parts)
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
        spacings.append(spacing_of(affine))
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
        write_json_atomic(path, {**fingerprint.to_json(), "cases": [c.name for c in cases]})
    return fingerprint
