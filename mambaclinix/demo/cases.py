"""The demo's cases: brain-MRI tissue segmentation made from the MNI ICBM152 2009a template.

:func:`make_case` returns one case ``(image, label, affine)`` in memory, and
:func:`~mambaclinix.demo.build_demo_dataset` writes them as a dataset. Every case is the template under a
random deformation, labelled by the rule below.

**Source.** The MNI ICBM152 non-linear *symmetric* 2009a T1 template and its grey-matter / white-matter
probability maps (1 mm, 197×233×189, MNI space), as shipped *inside* the ``nilearn`` wheel (read from its
package data folder; nothing is downloaded). The T1 shipped by nilearn is already skull-stripped, so the
demo images are skull-stripped brains (there is no skull to keep).

**Labels** (0 background, 1 CSF, 2 GM, 3 WM), on the 1 mm template:

* brain mask ``M`` = nilearn's MNI152 brain mask (``load_mni152_brain_mask()``: the T1 rescaled to [0, 1],
  ``> 0.2``; it is the support of the skull-stripped T1 to within 0.05 % of its voxels) with its 6 interior
  hole voxels filled;
* inside ``M``: ``p_CSF = clip(1 − p_GM − p_WM, 0, 1)`` and ``label = 1 + argmax(p_CSF, p_GM, p_WM)``;
  outside ``M``: 0.

Why: the ICBM152 2009 tissue maps are probabilities of a three-class (GM / WM / CSF) brain
classification averaged over the template population, so inside the brain mask, where the non-brain
class has negligible probability, ``p_GM + p_WM + p_CSF ≈ 1`` and the complement of GM + WM *is* the CSF
probability (ventricles, sulci, and the rim that the skull-stripping kept: 81 % of the mask's surface
voxels are CSF). On this template ``p_GM + p_WM ≤ 1`` everywhere, so the clip never acts. The argmax is the
maximum a-posteriori (Bayes-optimal under 0-1 loss) hard labelling of these posteriors. It refines the
rule "CSF = mask minus (p_GM > 0.5) minus (p_WM > 0.5)", which calls CSF every mixed voxel where neither
tissue reaches 0.5 even when e.g. ``p_GM = 0.45, p_WM = 0.4`` (``p_CSF = 0.15``); the two rules differ on
0.8 % of the brain voxels. Class fractions inside the mask: CSF 8.3 %, GM 57.9 %, WM 33.8 % (1 mm);
6.7 / 60.0 / 33.3 % on the 2 mm template grid; ≈ 6.2 / 60.4 / 33.3 % on the 2 mm subjects (thin CSF
loses voxels to partial volume as the grid coarsens; 3.2 % CSF at 4 mm). GM includes the cerebellar cortex
and the deep grey nuclei.

**Subjects.** The template is first resampled from 1 mm to ``spacing`` mm (linear, with TorchIO's Gaussian
anti-aliasing) on a canvas = brain bounding box + 32 mm. Each subject is then one seeded draw of, in a
*single* cubic B-spline resampling (``tio.RandomAffineElasticDeformation``): a random affine (rotations
±10°, scaling 0.9–1.1, translations ±10 mm, about the canvas centre) and a random elastic deformation
(7 B-spline control points per axis, displacement ≤ 7.5 mm); then, on the image only, a random
multiplicative polynomial bias field (order 3, coefficients ±0.2: typically ×0.77–1.19 across the brain)
and additive Gaussian noise (σ ~ U(0.01, 0.03), white matter ≈ 0.84 before the bias field). The volume is
finally cropped to the deformed brain's bounding box + 8 mm: 77–88 × 90–108 × 79–94 voxels at 2 mm for the
default 11 cases; each case has its own shape and affine (RAS, mm; image and label share it exactly).

The label travels through the deformation as the *tissue probabilities* (channels ``M``, ``M·p_GM``,
``M·p_WM``; ``M·p_CSF = M − M·p_GM − M·p_WM`` by linearity of the interpolation) and the labelling rule is
applied on the subject's grid: brain where the deformed ``M ≥ 0.5``, then the argmax. This deviates on
purpose from deforming a ``LabelMap`` with nearest neighbour: the label is exactly "the rule applied to the
subject's anatomy", without the staircase artefacts of nearest-neighbour resampling from 1 mm, and it is
how nnU-Net itself resamples segmentations (one-hot, interpolate, argmax). The B-spline (rather than
linear) interpolation keeps thin CSF (6.2 % instead of 5.2 % CSF at 2 mm). Image and tissue maps are
images of one ``tio.Subject``, so one transform deforms both.

**Reproducibility.** Case ``i`` uses the ``torch`` seed drawn from ``SeedSequence([seed, i])`` inside
``torch.random.fork_rng`` (the caller's RNG state is untouched); the same ``seed`` gives byte-identical
files with the same TorchIO / SimpleITK / nibabel versions (nibabel writes gzip with ``mtime = 0``), and
case ``i`` does not depend on ``n_train``/``n_test``.

Licence of the source data: Copyright (C) 1993–2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University (permissive: use, copy, modify and distribute for any
purpose without fee, provided the copyright notice appears in all copies; provided "as is"). Cite Fonov et
al., NeuroImage 54(1):313–327, 2011 and Fonov et al., NeuroImage 47:S102, 2009. See ``docs/demo_data.md``.

TorchIO and nilearn are imported lazily (``pip install "mambaclinix[demo]"`` for nilearn).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

DEMO_LABELS: dict[str, int] = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
"""Label name → value, nnU-Net v2 ``labels`` convention."""

_NILEARN_MASK_THRESHOLD = 0.2  # nilearn.datasets.load_mni152_brain_mask(threshold=0.2), its default
_CANVAS_MARGIN_MM = 32.0
_CROP_MARGIN_MM = 8.0
# The random transforms (TorchIO 2 renames the Random* classes: they are all in _augmentation()).
_AFFINE = {"scales": (0.9, 1.1), "degrees": 10.0, "translation": 10.0}
_ELASTIC = {"num_control_points": 7, "max_displacement": 7.5, "locked_borders": 2}
_BIAS_COEFFICIENTS = 0.2
_NOISE_STD = (0.01, 0.03)
_INTERPOLATION = "bspline"  # cubic B-spline: keeps thin CSF that linear interpolation blurs away

# --------------------------------------------------------------------------------------------------
# Lazy imports


def _import_nilearn_datasets():
    try:
        from nilearn import datasets
    except ImportError as err:
        raise ImportError(
            'The demo dataset needs nilearn (it ships the MNI152 template): pip install "mambaclinix[demo]"'
        ) from err
    return datasets


def _import_torchio():
    try:
        import torchio as tio
    except ImportError as err:  # pragma: no cover - torchio is a core dependency
        raise ImportError("The demo dataset needs torchio: pip install mambaclinix") from err
    return tio


# --------------------------------------------------------------------------------------------------
# Template and labelling rule


def tissue_labels(brain: np.ndarray, p_csf: np.ndarray, p_gm: np.ndarray, p_wm: np.ndarray) -> np.ndarray:
    """The labelling rule: 0 outside ``brain``, ``1 + argmax(p_CSF, p_GM, p_WM)`` inside.

    Args:
        brain: boolean brain mask ``(X, Y, Z)``.
        p_csf: CSF probability, same shape.
        p_gm: GM probability, same shape.
        p_wm: WM probability, same shape.

    Returns:
        ``uint8`` label map with values in {0, 1, 2, 3} (ties go to the lower label).
    """
    labels = (1 + np.argmax(np.stack([p_csf, p_gm, p_wm]), axis=0)).astype(np.uint8)
    labels[~brain] = 0
    return labels


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 ``(X, Y, Z)`` in [0, 1], tissue channels ``(3, X, Y, Z)`` = (M, M·p_GM, M·p_WM), and the affine.

    All on the template's native 1 mm grid, read from nilearn's package data (no download). ``M`` is
    nilearn's ``load_mni152_brain_mask()`` (T1 ``> 0.2``; computed here from the already loaded T1 to read
    the file once) with its interior holes filled. ``M·p_CSF`` needs no channel of its own: it is
    ``M − M·p_GM − M·p_WM`` (``p_GM`` is capped at ``1 − p_WM`` so that this is the clipped
    complement; on this template the cap never acts), and interpolation is linear in the values, so it
    commutes with this difference.
    """
    from scipy import ndimage

    datasets = _import_nilearn_datasets()
    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(t1_img.get_fdata(dtype=np.float32))  # nilearn rescales the template to [0, 1]
    p_gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32))
    p_wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    for name, img in (("GM", p_gm), ("WM", p_wm)):
        if img.shape != t1.shape:  # pragma: no cover - guards against a changed nilearn
            raise RuntimeError(f"nilearn's MNI152 {name} map has shape {img.shape}, the T1 {t1.shape}.")
    brain = ndimage.binary_fill_holes(t1 > _NILEARN_MASK_THRESHOLD)
    m = brain.astype(np.float32)
    tissue = np.stack([m, m * np.minimum(p_gm, 1.0 - p_wm), m * p_wm])
    return t1, tissue, np.asarray(t1_img.affine, dtype=np.float64)


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive-exclusive voxel bounding box ``(lo, hi)`` of a non-empty boolean mask."""
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0) + 1


def _crop_or_pad(
    arrays: np.ndarray, affine: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Window ``[lo, hi)`` of ``(C, X, Y, Z)`` arrays (zero-padded where outside) and its affine."""
    shape = np.asarray(arrays.shape[1:])
    out = np.zeros((arrays.shape[0], *(hi - lo)), dtype=arrays.dtype)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(hi, shape)
    src = (slice(None), *(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True)))
    dst = (slice(None), *(slice(a - l, b - l) for a, b, l in zip(src_lo, src_hi, lo, strict=True)))
    out[dst] = arrays[src]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return out, new_affine


@functools.lru_cache(maxsize=2)
def _template_arrays(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image (1, X, Y, Z), tissue (3, X, Y, Z), affine)`` of the template canvas at ``spacing`` mm.

    Cached (two spacings; ≈ 22 MB at 2 mm) so that repeated builds in one process skip the 1 mm work.
    """
    tio = _import_torchio()
    t1, tissue, affine = _load_template()
    lo, hi = _bbox(tissue[0] > 0)
    margin = int(round(_CANVAS_MARGIN_MM / float(np.abs(affine[0, 0]))))
    stacked, canvas_affine = _crop_or_pad(
        np.concatenate([t1[None], tissue]), affine, lo - margin, hi + margin
    )
    subject = tio.Subject(
        image=tio.ScalarImage(tensor=stacked[:1], affine=canvas_affine),
        tissue=tio.ScalarImage(tensor=stacked[1:], affine=canvas_affine),
    )
    subject = tio.Resample(spacing, image_interpolation="linear", antialias=True)(subject)
    image, tissue = subject["image"].data.numpy(), subject["tissue"].data.numpy()
    for arr in (image, tissue):
        arr.flags.writeable = False
    return image, tissue, np.asarray(subject["image"].affine, dtype=np.float64)


def template_subject(spacing: float = 2.0):
    """The undeformed template as a ``tio.Subject`` at ``spacing`` mm: the starting point of every case.

    Args:
        spacing: isotropic voxel size in mm, in [1, 8].

    Returns:
        ``tio.Subject`` with ``image`` (T1 in [0, 1], 1 channel) and ``tissue`` (3 channels: the brain
        mask ``M``, ``M·p_GM``, ``M·p_WM``) on a canvas = the brain's bounding box + 32 mm, resampled from
        1 mm to ``spacing`` mm (linear, anti-aliased). :func:`subject_labels` of it is the template's label
        map on that grid.
    """
    tio = _import_torchio()
    image, tissue, affine = _template_arrays(_check_spacing(spacing))
    return tio.Subject(
        image=tio.ScalarImage(tensor=image.copy(), affine=affine),
        tissue=tio.ScalarImage(tensor=tissue.copy(), affine=affine),
    )


def subject_labels(subject) -> np.ndarray:
    """The labelling rule on a subject's (possibly deformed) ``tissue`` channels; ``uint8 (X, Y, Z)``.

    Brain where the interpolated mask ``M ≥ 0.5``; there ``argmax(M − M·p_GM − M·p_WM, M·p_GM, M·p_WM)``
    (= ``argmax(p_CSF, p_GM, p_WM)``: the common factor ``M`` does not change it).
    """
    m, m_gm, m_wm = subject["tissue"].data.numpy()
    return tissue_labels(m >= 0.5, m - m_gm - m_wm, m_gm, m_wm)


# --------------------------------------------------------------------------------------------------
# Subjects


def _augmentation():
    """The random transform that turns the template into one subject (all TorchIO Random* in one place)."""
    tio = _import_torchio()
    return tio.Compose(
        [
            tio.RandomAffineElasticDeformation(  # one resampling for both
                affine_kwargs={
                    **_AFFINE,
                    "center": "image",
                    "default_pad_value": 0.0,
                    "image_interpolation": _INTERPOLATION,
                },
                elastic_kwargs={**_ELASTIC, "image_interpolation": _INTERPOLATION},
            ),
            tio.RandomBiasField(coefficients=_BIAS_COEFFICIENTS, order=3, include=["image"]),
            tio.RandomNoise(mean=0.0, std=_NOISE_STD, include=["image"]),
        ]
    )


def _case_seed(seed: int, index: int) -> int:
    """Torch seed of case ``index``: independent streams per case from ``SeedSequence([seed, index])``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_case(seed: int, index: int, spacing: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate case ``index`` of the demo dataset built with ``seed`` (no file is written).

    Args:
        seed: the dataset seed (non-negative integer).
        index: the case number (``brain_{index:03d}``), non-negative.
        spacing: isotropic voxel size in mm, in [1, 8].

    Returns:
        ``(image, label, affine)``: ``float32 (X, Y, Z)`` T1, ``uint8 (X, Y, Z)`` labels in {0, 1, 2, 3},
        ``float64 (4, 4)`` voxel-to-world (RAS, mm) affine shared by both; cropped to the brain's bounding
        box + 8 mm.
    """
    import torch

    seed, index = _check_int("seed", seed, 0), _check_int("index", index, 0)
    template = template_subject(_check_spacing(spacing))  # before seeding: its first build may draw numbers
    transform = _augmentation()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_case_seed(seed, index))
        subject = transform(template)
    labels = subject_labels(subject)
    image = subject["image"].data.numpy()[0].astype(np.float32)
    affine = np.asarray(subject["image"].affine, dtype=np.float64)
    if not labels.any():  # pragma: no cover - the deformation is far too mild for this
        raise RuntimeError(f"demo case {index} (seed {seed}) lost the whole brain; please report this.")
    lo, hi = _bbox(labels > 0)
    if (lo == 0).any() or (hi == labels.shape).any():  # pragma: no cover - canvas margin is 32 mm
        raise RuntimeError(
            f"demo case {index} (seed {seed}): the deformed brain reaches the canvas border; "
            "please report this."
        )
    margin = int(math.ceil(_CROP_MARGIN_MM / spacing))
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, labels.shape)
    stacked, affine = _crop_or_pad(np.stack([image, labels.astype(np.float32)]), affine, lo, hi)
    return stacked[0], stacked[1].astype(np.uint8), affine


# --------------------------------------------------------------------------------------------------
# Argument checks and statistics


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_spacing(spacing: float) -> float:
    try:
        value = float(spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a number of mm, got {spacing!r}.") from None
    if not (math.isfinite(value) and 1.0 <= value <= 8.0):
        raise ValueError(
            f"spacing must be in [1, 8] mm (the template is 1 mm; coarser than 8 mm leaves no cortex), "
            f"got {spacing!r}."
        )
    return value


def class_fractions(labels: np.ndarray, values: Sequence[int] = (1, 2, 3)) -> list[float]:
    """Fraction of the non-zero voxels of ``labels`` that carry each of ``values``."""
    labels = np.asarray(labels)
    brain = int((labels > 0).sum())
    if brain == 0:
        raise ValueError("labels has no non-zero voxel.")
    return [float((labels == v).sum()) / brain for v in values]
