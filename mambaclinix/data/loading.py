"""Loading a case's arrays with validation, and cropping it to its non-zero region (steps 1 and 2 of the
preprocessing, nnU-Net v2's order; ``docs/data.md``).

* **Load** with TorchIO (``tio.ScalarImage(path).data``: ``(C, W, H, D)``, TorchIO's axis order, nothing
  reoriented); one file per channel or one multi-channel file. Channel files must share the spatial
  shape (error) and should share the affine (warning); the label must have the image's spatial shape
  and hold non-negative integers (below ``num_classes`` when known).
* **Crop** to the bounding box of the voxels that are non-zero in any channel (the whole volume when
  everything is zero). The non-zero mask, with its holes filled (``scipy.ndimage.binary_fill_holes``,
  as nnU-Net), is kept for the z-score normalisation.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torchio as tio
from scipy import ndimage

from mambaclinix.data.cases import Case, DatasetError

logger = logging.getLogger(__name__)

__all__ = ["CroppedCase", "crop_to_nonzero", "load_case", "nonzero_bbox"]


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


def nonzero_bbox(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """``((start, stop), …)`` per axis of the ``True`` voxels; the whole array when there are none."""
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bbox.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, int(mask.shape[axis])))
    return tuple(bbox)


class CroppedCase(NamedTuple):
    """A case cropped to its non-zero region (:func:`crop_to_nonzero`)."""

    image: np.ndarray  # (C, W', H', D'), contiguous
    label: np.ndarray | None  # (W', H', D')
    mask: np.ndarray  # bool (W', H', D'): the hole-filled non-zero mask (all True for an all-zero image)
    bbox: tuple[tuple[int, int], ...]  # ((start, stop), ...) per axis, original voxel indices
    affine: np.ndarray  # (4, 4) affine of the cropped grid


def crop_to_nonzero(
    image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, name: str = ""
) -> CroppedCase:
    """Crop ``image`` ``(C, W, H, D)`` and ``label`` ``(W, H, D)`` to the voxels non-zero in any channel.

    Labelled voxels outside that region are lost, with a warning (as in nnU-Net); an image that is zero
    everywhere is not cropped (warning). ``name`` is the case name for the warnings.
    """
    nonzero = (image != 0).any(axis=0)
    if not nonzero.any():
        logger.warning("case '%s': the image is zero everywhere; nothing is cropped", name)
    bbox = nonzero_bbox(nonzero)
    crop = tuple(slice(a, b) for a, b in bbox)
    if label is not None:
        lost = int(np.count_nonzero(label)) - int(np.count_nonzero(label[crop]))
        if lost:
            logger.warning(
                "case '%s': %d labelled voxel(s) lie outside the non-zero image region and are cropped away",
                name,
                lost,
            )
    image = np.ascontiguousarray(image[(slice(None), *crop)])
    mask = ndimage.binary_fill_holes(nonzero[crop]) if nonzero.any() else np.ones(image.shape[1:], bool)
    if label is not None:
        label = np.ascontiguousarray(label[crop])
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ np.array([a for a, _ in bbox], dtype=np.float64) + affine[:3, 3]
    return CroppedCase(image, label, mask, bbox, cropped_affine)
