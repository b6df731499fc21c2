"""Write predicted label maps with the geometry of the image they were predicted from.

**Axis convention.** A label map is indexed like the reference image's *file*: voxel ``[i, j, k]`` of the
label map is voxel ``(i, j, k)`` of the reference, with ``i`` the fastest-varying index on disk. This is
the array TorchIO loads without its channel axis — ``torchio.ScalarImage(ref).data[0]``, shape
``(W, H, D)`` — and equally the first three axes of ``nibabel.load(ref).get_fdata()``, or
``SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(ref)).T``. Nothing is reoriented: if the image was
reoriented or resampled before prediction (e.g. ``torchio.ToCanonical``), undo that first.

So ``image = torchio.ScalarImage(ref)``, ``probs = sliding_window_inference(image.data[None], roi, n, model)``
(``(1, K, W, H, D)``) and ``write_segmentation(probs[0].argmax(0), ref, out)`` keeps every voxel in place.

**Geometry.** The reference is read by the library native to its format: NIfTI (``.nii``, ``.nii.gz``,
``.hdr``/``.img``) with nibabel, everything else with SimpleITK. Its affine (voxel index → RAS+ world
mm, as TorchIO and nibabel define it) and the equivalent ITK spacing / origin / direction (LPS) are
written to the output:

* NIfTI output from a NIfTI reference: the reference header is copied (sform, qform and their codes, units)
  with the data type, shape and intensity scaling reset, so the geometry is bit-identical.
* NIfTI output from another format: the RAS affine is stored as both sform and qform (code 1, scanner).
* NRRD / MetaImage output: ITK spacing, origin and direction (the reference's own when it was read by
  SimpleITK; derived from the affine as TorchIO does for a NIfTI reference).

nibabel and SimpleITK are imported lazily, inside the functions that need them (TorchIO is not needed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mambaclinix.utils.atomic import atomic_path

__all__ = [
    "OUTPUT_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "ImageGeometry",
    "output_extension",
    "read_image_geometry",
    "write_segmentation",
]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
ITK_EXTENSIONS = (".nrrd", ".mha")
OUTPUT_EXTENSIONS: tuple[str, ...] = NIFTI_EXTENSIONS + ITK_EXTENSIONS
"""Output formats of :func:`write_segmentation`. Formats with a detached data file (``.nhdr``, ``.mhd``,
``.hdr``/``.img``) are not offered: two files cannot be replaced atomically together. (The input
formats the data pipeline reads are :data:`mambaclinix.data.datasets.INPUT_EXTENSIONS`.)"""

SUPPORTED_EXTENSIONS = OUTPUT_EXTENSIONS
"""Former name of :data:`OUTPUT_EXTENSIONS`, kept as an alias."""

_OUTPUT_FOR_INPUT = {
    ".nii.gz": ".nii.gz",
    ".nii": ".nii",
    ".nrrd": ".nrrd",
    ".nhdr": ".nrrd",  # detached header + data file -> the single-file form of the same format
    ".mha": ".mha",
    ".mhd": ".mha",
}
_DEFAULT_OUTPUT_EXTENSION = ".nii.gz"


def output_extension(input_path: str | os.PathLike) -> str:
    """The extension of a prediction written for the image ``input_path``: the input's own format when
    :func:`write_segmentation` writes it (:data:`OUTPUT_EXTENSIONS`), the single-file form of a
    detached-header format (``.nhdr`` → ``.nrrd``, ``.mhd`` → ``.mha``), and ``.nii.gz`` otherwise.
    The extension is matched case-insensitively and returned in lower case.

    >>> output_extension("case_001_0000.nhdr")
    '.nrrd'
    """
    ext = _extension(Path(input_path), tuple(_OUTPUT_FOR_INPUT))
    return _DEFAULT_OUTPUT_EXTENSION if ext is None else _OUTPUT_FOR_INPUT[ext]


_NIFTI_READ_EXTENSIONS = (".nii.gz", ".nii", ".hdr", ".img", ".hdr.gz", ".img.gz")
_FLIP_XY = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


@dataclass(frozen=True, eq=False)  # eq would compare numpy arrays ambiguously
class ImageGeometry:
    """Where the voxels of an image lie in the world.

    Attributes:
        shape: spatial shape ``(W, H, D)`` in the axis convention of this module (the file's index order).
        affine: ``(4, 4)`` float64 matrix from voxel indices ``(i, j, k, 1)`` to RAS+ world coordinates
            in mm (nibabel's and TorchIO's ``affine``).
        spacing: voxel size per axis in mm (ITK ``GetSpacing``).
        origin: world position of voxel ``(0, 0, 0)`` in LPS mm (ITK ``GetOrigin``).
        direction: ``(3, 3)`` direction cosines in LPS, column ``a`` being voxel axis ``a`` (ITK
            ``GetDirection``, row-major).
        reader: ``"nibabel"`` or ``"SimpleITK"``, whichever read the file.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    reader: str


def _extension(path: Path, candidates: tuple[str, ...]) -> str | None:
    name = path.name.lower()
    return next((ext for ext in candidates if name.endswith(ext)), None)


def _itk_from_affine(affine: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """RAS affine → ITK (spacing, origin, direction) in LPS, as TorchIO converts them."""
    rotation_zoom = affine[:3, :3]
    spacing = np.sqrt((rotation_zoom**2).sum(axis=0))
    direction = _FLIP_XY @ (rotation_zoom / spacing)
    origin = _FLIP_XY @ affine[:3, 3]
    return tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction.ravel()))


def _affine_from_itk(spacing, origin, direction) -> np.ndarray:
    """ITK (spacing, origin, direction) in LPS → RAS affine, as TorchIO converts them."""
    affine = np.eye(4)
    affine[:3, :3] = _FLIP_XY @ np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing)
    affine[:3, 3] = _FLIP_XY @ np.asarray(origin, dtype=np.float64)
    return affine


def _check_reference(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image not found: '{path}'.")
    return path


def _load_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Pair | nib.Nifti2Pair):  # Nifti1Image subclasses Nifti1Pair
        raise ValueError(f"reference '{path}' is not a NIfTI image (nibabel read a {type(img).__name__}).")
    return img


def read_image_geometry(path: str | os.PathLike) -> ImageGeometry:
    """Read the spatial shape and geometry of a 3D image without loading its voxels.

    NIfTI files are read with nibabel (its ``affine``: the sform if its code is set, else the qform), other
    formats (NRRD, MetaImage, ...) with SimpleITK; the missing representation is derived as TorchIO does.
    Extra NIfTI dimensions (time, channels) are ignored; a 2D NIfTI has ``D = 1``.

    Args:
        path: image file.

    Returns:
        The :class:`ImageGeometry` of the image.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the image is not 3D (SimpleITK images of another dimension).
    """
    path = _check_reference(path)
    if _extension(path, _NIFTI_READ_EXTENSIONS) is not None:
        img = _load_nifti(path)
        shape = (tuple(int(s) for s in img.shape[:3]) + (1, 1, 1))[:3]
        affine = np.asarray(img.affine, dtype=np.float64)
        spacing, origin, direction = _itk_from_affine(affine)
        return ImageGeometry(shape, affine, spacing, origin, direction, "nibabel")

    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"reference '{path}' has {reader.GetDimension()} spatial dimensions; 3 are needed.")
    spacing = tuple(map(float, reader.GetSpacing()))
    origin = tuple(map(float, reader.GetOrigin()))
    direction = tuple(map(float, reader.GetDirection()))
    shape = tuple(int(s) for s in reader.GetSize())
    affine = _affine_from_itk(spacing, origin, direction)
    return ImageGeometry(shape, affine, spacing, origin, direction, "SimpleITK")


def _label_dtype(array: np.ndarray) -> np.dtype:
    """Smallest of uint8/uint16/uint32 (non-negative labels) or int16/int32 that holds every label."""
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo >= 0:
        for dtype in (np.uint8, np.uint16, np.uint32):
            if hi <= np.iinfo(dtype).max:
                return np.dtype(dtype)
    else:
        for dtype in (np.int16, np.int32):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                return np.dtype(dtype)
    raise ValueError(f"label_map values span [{lo}, {hi}], beyond 32-bit integers.")


def _as_label_array(label_map: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    array = np.asarray(label_map)
    if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"label_map must hold integer (or bool) labels, got dtype {array.dtype}; "
            "e.g. pass probs.argmax(0) for a (K, W, H, D) prediction."
        )
    if array.ndim == len(shape) + 1 and array.shape[0] == 1:
        array = array[0]  # (1, W, H, D): a channel axis of size 1
    if tuple(array.shape) != tuple(shape):
        raise ValueError(
            f"label_map shape {tuple(np.shape(label_map))} does not match the reference image's spatial "
            f"shape {tuple(shape)} (expected (W, H, D) or (1, W, H, D), indexed like the reference file)."
        )
    return np.ascontiguousarray(array.astype(_label_dtype(array), copy=False))


def _save_nifti(array: np.ndarray, reference: Path, geometry: ImageGeometry, path: Path) -> None:
    import nibabel as nib

    if geometry.reader == "nibabel":
        ref = _load_nifti(reference)
        header = ref.header.copy()
        if isinstance(header, nib.Nifti2Header):
            header = nib.Nifti1Header.from_header(header)
        header.extensions.clear()
        header.set_data_dtype(array.dtype)
        header["scl_slope"] = np.nan
        header["scl_inter"] = np.nan
        header["cal_min"] = 0
        header["cal_max"] = 0
        header.set_intent("none")
        # The affine equals the header's best affine, so nibabel keeps sform/qform (and codes) as they are.
        img = nib.Nifti1Image(array, ref.affine, header=header)
    else:
        img = nib.Nifti1Image(array, geometry.affine)
        img.header.set_data_dtype(array.dtype)
        img.header.set_sform(geometry.affine, code=1)
        img.header.set_qform(geometry.affine, code=1)
    nib.save(img, str(path))


def _save_itk(array: np.ndarray, geometry: ImageGeometry, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.T)  # ITK's numpy view is (D, H, W)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(path), True)


def write_segmentation(
    label_map: np.ndarray | torch.Tensor,
    reference_path: str | os.PathLike,
    output_path: str | os.PathLike,
) -> Path:
    """Write a label map with the geometry of a reference image, atomically.

    The format follows ``output_path``'s extension (:data:`SUPPORTED_EXTENSIONS`: ``.nii.gz``, ``.nii``,
    ``.nrrd``, ``.mha``); the reference may be any 3D format nibabel or SimpleITK reads. The labels are
    stored as the smallest integer type holding them: uint8, uint16 or uint32 (int16/int32 with negative
    labels). The file is written atomically and durably (:mod:`mambaclinix.utils.atomic`): first to a
    hidden temporary file next to ``output_path`` (same extension, e.g.
    ``.case_001.nii.gz.tmp-1a2b3c4d.nii.gz``), flushed to disk and renamed over ``output_path``, then the
    folder is synced; on any error the temporary file is removed and an existing ``output_path`` is left
    untouched. The output directory is created if missing.

    Args:
        label_map: integer (or bool) array or tensor ``(W, H, D)`` — or ``(1, W, H, D)`` — indexed like
            the reference file, i.e. like ``torchio.ScalarImage(reference_path).data[0]`` (see the module
            docstring).
        reference_path: the image the prediction was made from.
        output_path: file to write.

    Returns:
        ``output_path`` as a ``Path``.

    Raises:
        FileNotFoundError: if ``reference_path`` does not exist.
        ValueError: on an unsupported output extension, a label map that is not integer or whose shape
            differs from the reference's spatial shape, or ``output_path`` equal to ``reference_path``.
    """
    output = Path(output_path)
    ext = _extension(output, SUPPORTED_EXTENSIONS)
    if ext is None:
        raise ValueError(
            f"output_path '{output}' has an unsupported extension; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}."
        )
    reference = _check_reference(reference_path)
    if output.exists() and output.resolve() == reference.resolve():
        raise ValueError(f"output_path '{output}' is the reference image itself; refusing to overwrite it.")
    geometry = read_image_geometry(reference)
    array = _as_label_array(label_map, geometry.shape)

    # The temporary file ends in the (lower-case) extension, from which nibabel / SimpleITK pick the format.
    with atomic_path(output, suffix=ext) as tmp:
        if ext in NIFTI_EXTENSIONS:
            _save_nifti(array, reference, geometry, tmp)
        else:
            _save_itk(array, geometry, tmp)
    return output
