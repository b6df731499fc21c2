"""Synthetic Decathlon-layout datasets written to a temporary folder (shared by several test modules)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (20, 24, 28)
SPACING = (1.0, 1.5, 2.0)
BOX = (slice(2, 17), slice(3, 22), slice(1, 24))  # the non-zero region: borders are zero
CROP = ((2, 17), (3, 22), (1, 24))


def _affine(index: int, spacing=SPACING) -> np.ndarray:
    """Rotated / flipped, anisotropic, off-origin affines (different per case)."""
    rotation = (
        np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) if index % 2 else np.diag([-1.0, 1, 1])
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)[None, :]
    affine[:3, 3] = [10.0 + index, -20.0, 5.0 * index]
    return affine


def _volumes(index: int, channels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((channels, *SHAPE), np.float32)
    for c in range(channels):
        image[c][BOX] = rng.normal(100 + 10 * c, 20, size=image[c][BOX].shape)
    label = np.zeros(SHAPE, np.int16)
    label[6:12, 8:14, 6 + index % 3 : 14] = 1
    label[12:15, 14:18, 14:20] = 2
    image[:, label > 0] += 80
    return image, label


def make_dataset(
    root: Path,
    layout: str = "v2",
    n: int = 4,
    channels: int = 1,
    modality: str = "MRI",
    n_test: int = 0,
    test_labels: bool = False,
) -> Path:
    """Decathlon dataset: ``layout="v2"`` (nnU-Net v2, one file per channel) or ``"msd"`` (4D files)."""
    rng = np.random.default_rng(0)
    for folder in (
        ("imagesTr", "labelsTr") + (("imagesTs",) if n_test else ()) + (("labelsTs",) if test_labels else ())
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for i in range(n + n_test):
        is_test = i >= n
        name = f"case_{i:03d}"
        image, label = _volumes(i, channels, rng)
        affine = _affine(i)
        images, labels = ("imagesTs", "labelsTs") if is_test else ("imagesTr", "labelsTr")
        if layout == "v2":
            for c in range(channels):
                nib.save(nib.Nifti1Image(image[c], affine), root / images / f"{name}_{c:04d}.nii.gz")
        else:
            data = image[0] if channels == 1 else np.moveaxis(image, 0, -1)
            nib.save(nib.Nifti1Image(data, affine), root / images / f"{name}.nii.gz")
            entry = {"image": f"./{images}/{name}.nii.gz", "label": f"./{labels}/{name}.nii.gz"}
            (test if is_test else training).append(entry if not is_test else entry["image"])
        if not is_test or test_labels:
            nib.save(nib.Nifti1Image(label, affine), root / labels / f"{name}.nii.gz")
    if layout == "v2":
        description = {
            "channel_names": {str(c): modality for c in range(channels)},
            "labels": {"background": 0, "organ": 1, "tumour": 2},
            "numTraining": n,
            "file_ending": ".nii.gz",
        }
    else:
        description = {
            "name": "synthetic",
            "modality": {str(c): modality for c in range(channels)},
            "labels": {"0": "background", "1": "organ", "2": "tumour"},
            "numTraining": n,
            "training": training,
            "test": test,
        }
    (root / "dataset.json").write_text(json.dumps(description))
    return root
