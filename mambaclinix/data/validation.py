"""Checking a dataset's files before any preprocessing or training (``docs/bad_input.md``).

:func:`validate_cases` reads every file of every case and collects *all* problems before it raises one
:class:`~mambaclinix.data.datasets.DatasetError` listing them (the first ``max_reported``, each naming the
case and the file and saying what was expected), so that a dataset is fixed in one go rather than one
error per run. It checks:

* every file exists and can be read (an unreadable, corrupt or truncated file is named; truncated NIfTI
  files are caught by :func:`nifti_truncation`, since SimpleITK reads them without complaint and fills the
  missing voxels with zeros);
* the channel files of a case have one channel each and agree in spatial shape and affine;
* the number of channels is the one ``dataset.json`` declares (without ``info``: the one most cases have);
* the label has one channel and the image's spatial shape and affine;
* label values are integers and among the classes declared in ``dataset.json`` (without ``info``:
  non-negative);
* image intensities are finite: NaN or ±inf is an **error** (the message counts them). Replace them in
  the files, or switch the check off: SimpleITK's NIfTI reader, which the preprocessing uses, reads NaN
  and ±inf as 0 (other formats keep them, and the preprocessing then refuses the case);
* a label without foreground (all 0) is a **warning**, not an error: such cases are legitimate (healthy
  controls). They are kept; their training patches are placed uniformly at random, and they count in
  validation Dice like any case.

Affines are compared entry by entry with an absolute tolerance (``affine_tolerance``, default 1e-3 mm),
which absorbs the float32 rounding of NIfTI headers but not a real shift, flip or spacing change.

NIfTI files are read with nibabel (which sees the stored NaN/inf and fails on a truncated stream), other
formats with TorchIO (as the preprocessing reads them); one case at a time, so the memory peak is one
case. ``read_arrays=False`` reads headers only (existence, readability of the header, shapes,
affines, channel counts, NIfTI truncation) and skips the value checks.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mambaclinix.data.cache import case_signature, stable_hash
from mambaclinix.data.datasets import Case, DatasetError, DatasetInfo

logger = logging.getLogger(__name__)

__all__ = ["ValidationReport", "nifti_truncation", "validate_cases", "validate_cases_once"]

_NIFTI_DTYPES = {  # NIfTI-1/2 datatype code → bytes per voxel
    2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
    1536: 16, 1792: 16, 2048: 32, 2304: 4,
}  # fmt: skip


@dataclass
class ValidationReport:
    """What :func:`validate_cases` found (returned when there were no errors).

    Attributes:
        num_cases: cases checked.
        num_channels: channels per case (``None`` when no case could be read).
        label_values: every label value met in the labels read (empty without ``read_arrays``).
        empty_labels: names of cases whose label is all background.
        errors: one line per problem (empty when returned; the raised error lists them).
        warnings: one line per warning (labels without foreground).
        seconds: wall time of the check.
    """

    num_cases: int = 0
    num_channels: int | None = None
    label_values: set[int] = field(default_factory=set)
    empty_labels: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def nifti_truncation(path: str | Path) -> str | None:
    """Say whether a NIfTI file holds fewer bytes than its header announces (``None``: complete).

    SimpleITK (and so TorchIO) silently zero-fills a truncated ``.nii`` or ``.nii.gz``. This check costs a
    header read: ``.nii`` compares the file size with ``vox_offset + voxels · bytes per voxel``; ``.nii.gz``
    compares that size with the gzip trailer's uncompressed size (mod 2³²), and only when they differ (a
    truncated file, or a legal but unusual multi-member gzip) decompresses the whole stream to decide.
    Files that are not NIfTI give ``None``.
    """
    path = Path(path)
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None
    compressed = name.endswith(".gz")
    try:
        opener = gzip.open if compressed else open
        with opener(path, "rb") as handle:
            header = handle.read(540)
    except (OSError, EOFError) as err:
        return f"cannot read the NIfTI header ({err})"
    expected = _nifti_size(header)
    if expected is None:
        return "not a NIfTI-1/2 file (bad header)"
    if not compressed:
        actual = path.stat().st_size
        if actual < expected:
            return f"truncated: {actual} bytes, the header announces {expected}"
        return None
    with open(path, "rb") as raw:
        raw.seek(-4, os.SEEK_END)
        trailer = struct.unpack("<I", raw.read(4))[0]
    if trailer == expected % (1 << 32):
        return None
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError) as err:
        return f"truncated or corrupt gzip stream ({err})"
    if total < expected:
        return f"truncated: {total} uncompressed bytes, the header announces {expected}"
    return None


def _nifti_size(header: bytes) -> int | None:
    """Expected uncompressed file size from a NIfTI-1 or NIfTI-2 header, ``None`` if not NIfTI."""
    if len(header) < 348:
        return None
    for order in ("<", ">"):
        size = struct.unpack(order + "i", header[:4])[0]
        if size == 348:  # NIfTI-1
            dims = struct.unpack(order + "8h", header[40:56])
            code = struct.unpack(order + "h", header[70:72])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size == 540 and len(header) >= 540:  # NIfTI-2
            code = struct.unpack(order + "h", header[12:14])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or code not in _NIFTI_DTYPES:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return max(offset, 352 if size == 348 else 544) + voxels * _NIFTI_DTYPES[code]


def _read(path: Path, kind: str, with_data: bool):
    """``(shape (C, W, H, D), affine, array or None)`` read by TorchIO; ``str`` describing the problem."""
    if not path.exists():
        return "file does not exist"
    if not path.is_file():
        return "not a file"
    if not os.access(path, os.R_OK):
        return "file is not readable (permissions)"
    truncated = nifti_truncation(path)
    if truncated is not None:
        return f"corrupt NIfTI file: {truncated}"
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return _read_nifti(path, with_data)
    import torchio as tio

    cls = tio.LabelMap if kind == "label" else tio.ScalarImage
    try:
        with warnings.catch_warnings():  # TorchIO warns before its NiBabel fallback
            warnings.simplefilter("ignore")
            image = cls(path)
            if with_data:
                data = image.data.numpy()
                return tuple(int(v) for v in data.shape), np.asarray(image.affine, np.float64), data
            return tuple(int(v) for v in image.shape), np.asarray(image.affine, np.float64), None
    except Exception as err:  # readers raise RuntimeError, ValueError, OSError, EOFError, ...
        text = " ".join(str(err).split())
        return f"cannot read the file as an image ({type(err).__name__}: {text[:200]})"


def _read_nifti(path: Path, with_data: bool):
    """NIfTI through nibabel, which (unlike SimpleITK, whose NIfTI reader turns NaN and inf into 0) shows
    the stored values and raises on a truncated stream. Axis order and RAS affine are TorchIO's."""
    import nibabel as nib

    try:
        image = nib.load(path)
        shape = tuple(int(v) for v in image.shape)
        if len(shape) == 5 and shape[3] == 1:  # (W, H, D, 1, C): NIfTI's vector layout
            shape = shape[:3] + shape[4:]
        if not 3 <= len(shape) <= 4:
            return f"expected a 3D image or a 4D multi-channel image, got shape {shape}"
        channels = shape[3] if len(shape) == 4 else 1
        data = None
        if with_data:
            data = np.asanyarray(image.dataobj).reshape(shape)
            data = np.moveaxis(data, 3, 0) if len(shape) == 4 else data[None]
        return (channels, *shape[:3]), np.asarray(image.affine, np.float64), data
    except Exception as err:  # nibabel raises ImageFileError, EOFError, OSError, zlib.error, ...
        text = " ".join(str(err).split())
        return f"cannot read the NIfTI file ({type(err).__name__}: {text[:200]})"


def _affine_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _fmt_affine(a: np.ndarray) -> str:
    return np.array2string(np.asarray(a)[:3], precision=4, suppress_small=True).replace("\n", "")


def validate_cases(
    cases: Sequence[Case],
    info: DatasetInfo | None = None,
    *,
    read_arrays: bool = True,
    affine_tolerance: float = 1e-3,
    max_reported: int = 20,
) -> ValidationReport:
    """Check every file of every case (see the module docstring for the list of checks).

    Args:
        cases: the cases, e.g. from :func:`~mambaclinix.data.datasets.read_decathlon` or
            :func:`~mambaclinix.data.datasets.read_manifest`; cases without a label are checked as images.
        info: ``dataset.json``'s description: its channel count and label values are what is expected.
            ``None``: the channel count most cases have, and any non-negative integer label.
        read_arrays: read the voxels (label values, empty labels, NaN/inf intensities, truncated
            non-NIfTI files); ``False`` reads headers only.
        affine_tolerance: largest allowed difference (mm) of any affine entry between files of a case.
        max_reported: problems listed in the error message (all are counted, and all are logged at
            DEBUG level).

    Returns:
        A :class:`ValidationReport` (warnings are also logged).

    Raises:
        DatasetError: one or more problems; the message counts them and lists the first
            ``max_reported``, each as ``case 'NAME': FILE: what is wrong, what was expected``.
    """
    start = time.perf_counter()
    report = ValidationReport(num_cases=len(cases))
    declared = None if info is None else set(info.labels)
    expected_channels = None if info is None else info.num_channels
    channel_counts: dict[str, tuple[int, list[str]]] = {}
    bad_cases: set[str] = set()

    def error(case: Case, path: Path | None, message: str) -> None:
        bad_cases.add(case.name)
        where = f"case '{case.name}': " + (f"{path}: " if path is not None else "")
        report.errors.append(where + message)

    for case in cases:
        if not case.image_paths:
            error(case, None, "no image file listed")
            continue
        ref_shape = ref_affine = ref_path = None
        channels = 0
        readable = True
        for path in case.image_paths:
            result = _read(Path(path), "image", read_arrays)
            if isinstance(result, str):
                error(case, path, result)
                readable = False
                continue
            shape, affine, data = result
            if len(case.image_paths) > 1 and shape[0] != 1:
                error(case, path, f"channel file has {shape[0]} channels; expected 1 (one file per channel)")
            channels += shape[0]
            if ref_shape is None:
                ref_shape, ref_affine, ref_path = shape[1:], affine, path
            else:
                if shape[1:] != ref_shape:
                    error(
                        case, path,
                        f"spatial shape {shape[1:]} differs from the first channel's ({ref_path}): "
                        f"expected {ref_shape}",
                    )  # fmt: skip
                elif _affine_gap(affine, ref_affine) > affine_tolerance:
                    gap = _affine_gap(affine, ref_affine)
                    error(
                        case, path,
                        f"affine {_fmt_affine(affine)} differs from the first channel's "
                        f"{_fmt_affine(ref_affine)} ({ref_path}) by {gap:.3g} mm; "
                        f"expected the same grid (tolerance {affine_tolerance:g} mm)",
                    )  # fmt: skip
            if data is not None and data.dtype.kind in "fc":
                finite = np.isfinite(data)
                if not finite.all():
                    n_nan = int(np.isnan(data).sum())
                    n_inf = int(data.size - finite.sum()) - n_nan
                    error(
                        case, path,
                        f"{n_nan} NaN and {n_inf} infinite intensities; expected finite values (replace "
                        "them in the file, or pass validate=False to have NIfTI NaN/inf read as 0)",
                    )  # fmt: skip
        if readable and ref_shape is not None:
            channel_counts[case.name] = (channels, [str(p) for p in case.image_paths])
        if case.label_path is None:
            continue
        result = _read(Path(case.label_path), "label", read_arrays)
        if isinstance(result, str):
            missing = result == "file does not exist"
            error(
                case,
                case.label_path,
                "label file does not exist; expected the case's label" if missing else result,
            )
            continue
        shape, affine, data = result
        if shape[0] != 1:
            error(case, case.label_path, f"label has {shape[0]} channels; expected 1 (one label map)")
        if ref_shape is not None:
            if shape[1:] != ref_shape:
                error(
                    case, case.label_path,
                    f"label spatial shape {shape[1:]} differs from the image's {ref_shape} "
                    f"({ref_path}); expected the same shape",
                )  # fmt: skip
            elif _affine_gap(affine, ref_affine) > affine_tolerance:
                error(
                    case, case.label_path,
                    f"label affine {_fmt_affine(affine)} differs from the image's {_fmt_affine(ref_affine)} "
                    f"({ref_path}) by {_affine_gap(affine, ref_affine):.3g} mm; expected the "
                    f"same grid (tolerance {affine_tolerance:g} mm)",
                )  # fmt: skip
        if data is not None:
            _check_label_values(case, data, declared, report, error)

    if channel_counts:
        counts = Counter(n for n, _ in channel_counts.values())
        majority = counts.most_common(1)[0][0]
        expected = expected_channels if expected_channels is not None else majority
        source = "dataset.json" if expected_channels is not None else "most cases"
        for case in cases:
            if case.name in channel_counts and channel_counts[case.name][0] != expected:
                n, files = channel_counts[case.name]
                error(
                    case, None,
                    f"{n} image channel(s) in {files}; expected {expected} ({source})",
                )  # fmt: skip
        report.num_channels = expected

    report.seconds = time.perf_counter() - start
    for line in report.warnings:
        logger.warning(line)
    if report.errors:
        for line in report.errors:
            logger.debug(line)
        n = len(report.errors)
        shown = report.errors[:max_reported]
        more = f"\n  ... and {n - len(shown)} more" if n > len(shown) else ""
        raise DatasetError(
            f"dataset check failed: {n} problem(s) in {len(bad_cases)} of {len(cases)} case(s)"
            + (f" (first {len(shown)} listed)" if n > len(shown) else "")
            + ":\n  - "
            + "\n  - ".join(shown)
            + more
        )
    logger.info(
        "dataset check: %d case(s) OK in %.2f s (%d warning(s))",
        len(cases),
        report.seconds,
        len(report.warnings),
    )
    return report


def _check_label_values(case: Case, data: np.ndarray, declared: set[int] | None, report, error) -> None:
    values = data.reshape(-1)
    path = case.label_path
    if values.dtype.kind in "fc":
        if values.dtype.kind == "c" or not np.isfinite(values).all():
            error(case, path, "label holds NaN, infinite or complex values; expected integer class values")
            return
        if not np.array_equal(values, np.round(values)):
            fractional = values[values != np.round(values)]
            error(
                case, path,
                f"label holds {fractional.size} non-integer value(s) (e.g. {float(fractional[0]):g}); "
                "expected integer class values (was it resampled with linear interpolation?)",
            )  # fmt: skip
            return
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high < (1 << 16):  # counting in chunks: no full-size int64 copy of a large label
        counts = np.zeros(int(high) + 1, np.int64)
        for start in range(0, values.size, 1 << 24):
            chunk = values[start : start + (1 << 24)].astype(np.intp, copy=False)
            counts += np.bincount(chunk, minlength=counts.size)
        present = {int(v) for v in np.flatnonzero(counts)}
    else:
        present = {int(v) for v in np.unique(values)}
    report.label_values |= present
    if declared is not None:
        unknown = sorted(present - declared)
        if unknown:
            error(
                case, path,
                f"label values {unknown[:10]} are not declared in dataset.json; expected values among "
                f"{sorted(declared)}",
            )  # fmt: skip
    elif low < 0:
        error(case, path, f"label holds negative values (min {low:g}); expected class values >= 0")
    if present <= {0}:
        report.empty_labels.append(case.name)
        report.warnings.append(
            f"case '{case.name}': {path}: the label is all background (no foreground voxel); the case is "
            "kept (its training patches are placed at random)"
        )


def validate_cases_once(cases: Sequence[Case], info: DatasetInfo | None, cache_root: Path) -> None:
    """:func:`validate_cases` unless the same files (paths, sizes, modification times) against the same
    ``dataset.json`` already passed; a pass is remembered in ``cache_root``.

    Raises:
        DatasetError: the problems found, each naming the case and file.
    """
    from mambaclinix.utils.atomic import write_json_atomic

    described = None if info is None else [list(info.channel_names), sorted(info.labels)]
    try:  # a missing file (a label, with check_labels off) is named by the check with all the others
        key = stable_hash([1, described, [case_signature(c) for c in cases]])
    except DatasetError:
        key = None
    marker = Path(cache_root) / f"validated-{key}.json"
    if key is not None and marker.is_file():
        logger.info("dataset check: %d case(s) unchanged since the last check (%s)", len(cases), marker)
        return
    report = validate_cases(cases, info)
    write_json_atomic(marker, {"cases": [c.name for c in cases], "empty_labels": report.empty_labels})
