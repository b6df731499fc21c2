"""Data: nnU-Net's data pipeline on TorchIO readers (preprocessing, sampling, augmentation; ``docs/data.md``).

:class:`SegmentationDataModule` (Lightning); the dataset
readers of :mod:`mambaclinix.data.datasets` and :mod:`mambaclinix.data.cases` (:func:`read_decathlon`,
:func:`read_manifest`, :func:`read_cases`, :func:`find_images`, :class:`Case`); the preprocessing of
:mod:`mambaclinix.data.preprocessing` (:class:`PreprocessingPlan`, :func:`make_plan`,
:func:`preprocess_case`; loading, normalisation, resampling and the fingerprint in their own modules)
and its on-disk cache (:mod:`mambaclinix.data.cache`); :func:`invert_to_original` (defined in
:mod:`mambaclinix.inference.geometry`); the training patch stream of :mod:`mambaclinix.data.patches`
(batch-wise foreground oversampling, one seeded patch per index) with nnU-Net's per-patch augmentation
(:class:`PatchAugmentation`, :mod:`mambaclinix.data.patch_augmentation`); the evaluation loaders of
:mod:`mambaclinix.data.loaders`. The TorchIO sampler of :mod:`mambaclinix.data.sampling` and the TorchIO
transforms of :mod:`mambaclinix.data.augmentation` serve whole-volume pipelines of your own.

The demo dataset (MNI152 brain tissues) and its k-means baseline live in :mod:`mambaclinix.demo`, which
builds on this package. Importing this package imports no TorchIO: the pipeline's names below are
loaded on first access (``from mambaclinix.data import SegmentationDataModule`` imports TorchIO and
Lightning at that moment).
"""

from mambaclinix.utils.lazy import lazy_attributes

_LAZY = {
    # name: defining module (the TorchIO pipeline, imported on first access)
    "SegmentationDataModule": "mambaclinix.data.datamodule",
    "collate_subjects": "mambaclinix.data.loaders",
    "Case": "mambaclinix.data.cases",
    "DatasetError": "mambaclinix.data.cases",
    "find_images": "mambaclinix.data.cases",
    "CaseLists": "mambaclinix.data.datasets",
    "DatasetInfo": "mambaclinix.data.datasets",
    "read_cases": "mambaclinix.data.datasets",
    "read_dataset_info": "mambaclinix.data.datasets",
    "read_dataset_json": "mambaclinix.data.datasets",
    "read_decathlon": "mambaclinix.data.datasets",
    "read_manifest": "mambaclinix.data.datasets",
    "PreprocessingPlan": "mambaclinix.data.preprocessing",
    "make_plan": "mambaclinix.data.preprocessing",
    "preprocess_case": "mambaclinix.data.preprocessing",
    "preprocess_to_cache": "mambaclinix.data.preprocessing",
    "invert_to_original": "mambaclinix.inference.geometry",
    "ForegroundOversamplingSampler": "mambaclinix.data.sampling",
    "nnunet_augmentation": "mambaclinix.data.augmentation",
    "PatchAugmentation": "mambaclinix.data.patch_augmentation",
    "validate_cases": "mambaclinix.data.validation",
}

__all__ = [*_LAZY]


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
