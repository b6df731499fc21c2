"""The demo dataset on disk: the Medical Segmentation Decathlon / nnU-Net v2 raw layout, published whole.

:func:`build_demo_dataset` writes the cases of :mod:`mambaclinix.demo.cases` so that training can be tried
without any user data::

    out_dir/
        dataset.json
        imagesTr/brain_000_0000.nii.gz   labelsTr/brain_000.nii.gz   (n_train cases)
        imagesTs/brain_008_0000.nii.gz   labelsTs/brain_008.nii.gz   (n_test cases, labels held out)

The folder is filled under a hidden temporary name beside ``out_dir`` and renamed into place by
:func:`mambaclinix.utils.atomic_directory`, so ``out_dir`` is either absent or complete. Calling the
builder again with the same arguments reuses the dataset; see ``docs/demo_data.md``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from mambaclinix.demo.cases import (
    DEMO_LABELS,
    _check_int,
    _check_spacing,
    _import_nilearn_datasets,
    make_case,
)
from mambaclinix.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)

# Recorded in dataset.json and compared before reusing a dataset: an identifier, not an import path (it
# names the module that first held the builder, so datasets built by earlier releases are still reused).
_GENERATOR = "mambaclinix.data.demo.build_demo_dataset"
_GENERATOR_VERSION = 1  # bump when the generated data change for the same arguments

_LICENCE = (
    "Derived from the MNI ICBM152 non-linear symmetric 2009a template (T1 and GM/WM probability maps as "
    "shipped in nilearn). Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal "
    "Neurological Institute, McGill University. Permission to use, copy, modify, and distribute this "
    "software and its documentation for any purpose and without fee is hereby granted, provided that the "
    "above copyright notice appear in all copies. The authors and McGill University make no "
    "representations about the suitability of this software for any purpose. It is provided 'as is' "
    "without express or implied warranty."
)
_REFERENCE = (
    "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL, Brain Development Cooperative "
    "Group. Unbiased average age-appropriate atlases for pediatric studies. NeuroImage 54(1):313-327, "
    "2011. Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average "
    "age-appropriate brain templates from birth to adulthood. NeuroImage 47:S102, 2009."
)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    nib.save(img, str(path))


def _case_ids(n_train: int, n_test: int) -> tuple[list[str], list[str]]:
    ids = [f"brain_{i:03d}" for i in range(n_train + n_test)]
    return ids[:n_train], ids[n_train:]


def _generator_params(n_train: int, n_test: int, spacing: float, seed: int) -> dict:
    return {
        "generator": _GENERATOR,
        "version": _GENERATOR_VERSION,
        "n_train": n_train,
        "n_test": n_test,
        "spacing": spacing,
        "seed": seed,
    }


def _dataset_json(n_train: int, n_test: int, spacing: float, seed: int) -> dict:
    train_ids, test_ids = _case_ids(n_train, n_test)
    return {
        "name": "MambaClinixBrainDemo",
        "description": (
            "Brain MRI tissue segmentation (CSF, grey matter, white matter) demo: each case is the MNI "
            "ICBM152 2009a T1 template (skull-stripped) and its tissue labels under a random affine + "
            "elastic deformation, with a random bias field and Gaussian noise on the image, resampled "
            f"to {spacing:g} mm isotropic. Labels: 1 + argmax(p_CSF, p_GM, p_WM) inside the template's "
            "brain mask, p_CSF = clip(1 - p_GM - p_WM, 0, 1). Synthetic: for trying the pipeline, not for "
            "scientific claims."
        ),
        "reference": _REFERENCE,
        "licence": _LICENCE,
        "release": f"mambaclinix demo v{_GENERATOR_VERSION}",
        "tensorImageSize": "3D",
        "channel_names": {"0": "T1"},
        "modality": {"0": "T1"},
        "labels": dict(DEMO_LABELS),
        "numTraining": n_train,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "training": [
            {"image": f"./imagesTr/{c}_0000.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train_ids
        ],
        "test": [
            {"image": f"./imagesTs/{c}_0000.nii.gz", "label": f"./labelsTs/{c}.nii.gz"} for c in test_ids
        ],
        "mambaclinix_demo": _generator_params(n_train, n_test, spacing, seed),
    }


def _listed_files(meta: dict) -> list[str]:
    files = []
    for key in ("training", "test"):
        for entry in meta.get(key, []):
            if isinstance(entry, dict):
                files.extend(str(v) for v in entry.values())
            else:
                files.append(str(entry))
    return files


def _is_complete(out_dir: Path) -> tuple[bool, dict | None]:
    """``(complete, dataset.json or None)``: complete = dataset.json parses and every file it lists exists."""
    path = out_dir / "dataset.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False, None
    if not isinstance(meta, dict):
        return False, None
    files = _listed_files(meta)
    complete = bool(files) and all((out_dir / f).is_file() for f in files)
    return complete, meta


def build_demo_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 3,
    spacing: float = 2.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build the MNI152 brain-tissue demo dataset (Decathlon / nnU-Net v2 raw layout) in ``out_dir``.

    See :mod:`mambaclinix.demo.cases` for the source, the labelling rule and the deformation model. The
    build goes to a temporary sibling folder that is renamed to ``out_dir`` at the end
    (:func:`mambaclinix.utils.atomic_directory`), so ``out_dir`` is either absent or complete (on an
    error the hidden ``.<name>.tmp-*`` sibling is removed; a killed process may leave it behind). If a
    concurrent build of the same dataset finishes first, its folder is kept and this one discarded.

    Args:
        out_dir: the dataset directory (created; its parent too).
        n_train: number of training cases (``imagesTr`` / ``labelsTr``), at least 1.
        n_test: number of held-out cases (``imagesTs`` / ``labelsTs``, labels included so a test stage
            can score them), at least 0.
        spacing: isotropic voxel size in mm, in [1, 8] (2 mm: ≈ 80–100 voxels per axis).
        seed: non-negative integer; case ``i`` is a pure function of ``(seed, i, spacing)``.
        overwrite: replace whatever is in ``out_dir``.

    Returns:
        ``Path`` of ``out_dir``.

    Raises:
        ValueError: for an invalid argument (named in the message).
        FileExistsError: ``out_dir`` exists, ``overwrite=False``, and it is not a complete demo dataset
            built with the same arguments (non-empty without ``dataset.json``, files missing, or other
            arguments).
        ImportError: nilearn is not installed (``pip install "mambaclinix[demo]"``).
    """
    out = Path(out_dir)
    n_train, n_test = _check_int("n_train", n_train, 1), _check_int("n_test", n_test, 0)
    seed = _check_int("seed", seed, 0)
    if n_train + n_test > 1000:
        raise ValueError(
            f"n_train + n_test must be at most 1000 (case ids are 3 digits), got {n_train + n_test}."
        )
    spacing = _check_spacing(spacing)
    wanted = _generator_params(n_train, n_test, spacing, seed)

    if out.exists() and not overwrite and _existing_is_usable(out, wanted):
        logger.info("Demo dataset already complete in %s; nothing to do.", out)
        return out

    # Fail fast on the optional dependency, before any file is written.
    _import_nilearn_datasets()
    kept_concurrent = []

    def concurrent_build_is_usable(path: Path) -> bool:
        # Called when the rename finds ``out`` filled meanwhile: keep it if it is this very dataset.
        kept_concurrent.append(_existing_is_usable(path, wanted))
        return kept_concurrent[-1]

    start = time.perf_counter()
    with atomic_directory(out, replace=overwrite, exists_ok=concurrent_build_is_usable) as tmp:
        _write_dataset(tmp, n_train, n_test, spacing, seed)
    if any(kept_concurrent):
        logger.info("Demo dataset completed in %s by a concurrent build; keeping that one.", out)
        return out
    logger.info(
        "Built the demo dataset (%d training, %d test cases, %g mm) in %s in %.1f s.",
        n_train,
        n_test,
        spacing,
        out,
        time.perf_counter() - start,
    )
    return out


def _write_dataset(root: Path, n_train: int, n_test: int, spacing: float, seed: int) -> None:
    """Write every case and ``dataset.json`` into ``root``: the temporary folder of the atomic build,
    which is published (and ``fsync``-ed) whole, so the files in it are written directly."""
    meta = _dataset_json(n_train, n_test, spacing, seed)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir()
    for index, entry in enumerate(meta["training"] + meta["test"]):
        image, labels, affine = make_case(seed, index, spacing)
        _save_nifti(image, affine, root / entry["image"])
        _save_nifti(labels, affine, root / entry["label"])
        logger.debug("demo case %s: shape %s", entry["image"], image.shape)
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def _existing_is_usable(out: Path, wanted: dict) -> bool:
    """True if ``out`` is a complete demo dataset built with ``wanted``; False if it is an empty directory.

    Raises:
        FileExistsError: anything else (a file, a foreign or incomplete dataset, other arguments).
    """
    if not out.is_dir():
        raise FileExistsError(f"out_dir {out} exists and is not a directory; pass overwrite=True.")
    complete, meta = _is_complete(out)
    if complete and meta is not None:
        built_with = meta.get("mambaclinix_demo")
        if built_with == wanted:
            return True
        origin = "other arguments" if built_with else "another tool (no 'mambaclinix_demo' entry)"
        raise FileExistsError(
            f"out_dir {out} holds a complete dataset built with {origin}: found {built_with}, wanted "
            f"{wanted}; pass overwrite=True or choose another out_dir."
        )
    if meta is not None:
        raise FileExistsError(
            f"out_dir {out} holds an incomplete dataset (files listed in dataset.json are missing); "
            "pass overwrite=True to rebuild it."
        )
    if any(out.iterdir()):
        raise FileExistsError(
            f"out_dir {out} is not empty and has no dataset.json; refusing to write into it "
            "(pass overwrite=True to replace its contents)."
        )
    return False
