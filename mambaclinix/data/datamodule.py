"""``SegmentationDataModule``: TorchIO patch training on nnU-Net-preprocessed volumes (spec §3).

**Sources.** ``data_dir`` (Decathlon / nnU-Net raw layout) or ``manifest`` (CSV), see
:mod:`mambaclinix.data.datasets`. A manifest may sit next to a ``dataset.json`` describing channels and
labels; otherwise channels are named ``"unknown"`` (so ``normalization="auto"`` means z-score) and the
classes are read from the training labels on first use.

**Splits** (deterministic). The training pool (``imagesTr``; manifest rows with a label and split
``train`` or empty) is sorted by case name and permuted with ``numpy.random.default_rng(seed)``. With
``fold=None`` the first ``round(val_fraction · n)`` cases of the permutation validate (at least one when
``val_fraction > 0`` and n ≥ 2; none when ``val_fraction == 0``, and then ``val_dataloader`` returns an
empty list); with ``fold=f`` the permutation is cut into ``num_folds`` near-equal parts
(``numpy.array_split``) and part ``f`` validates, so the folds partition the pool. A manifest with
``val`` rows uses exactly those for validation and ignores ``val_fraction``/``fold``. Test cases:
``imagesTs`` (+ ``labelsTs``) or manifest rows with split ``test``. Prediction: ``predict_dir`` (a folder
or a list of files; nnU-Net v2 channel files are grouped by case) or, by default, the test cases and
the manifest's unlabelled unassigned rows.

**Preprocessing** happens in :meth:`SegmentationDataModule.prepare_data` (one process per node, the
cache in ``cache_dir``; see :mod:`mambaclinix.data.preprocessing`), after a check of every file of the
stage's cases (:mod:`mambaclinix.data.validation`, ``validate=False`` skips it) that fails early with one
error listing every problem. The plan (median spacing, CT
statistics) always comes from the whole labelled training pool, so every fold shares one cache. When a
Trainer is attached only the cases its stage needs are preprocessed (fit/validate: training pool;
test: test cases; predict: prediction cases); called by hand, everything. :meth:`setup` only reads the
cache (and fills in what is missing, with a log message, if ``prepare_data`` was skipped).

**Training loader.** A ``tio.Queue`` of ``queue_length`` patches, ``samples_per_volume`` per loaded
subject, cut by :class:`~mambaclinix.data.sampling.ForegroundOversamplingSampler`; subjects are loaded
and augmented (:func:`~mambaclinix.data.augmentation.nnunet_augmentation`, unless ``augment=False``)
by the Queue's ``num_workers`` worker processes, while the outer ``DataLoader`` uses ``num_workers=0``
as TorchIO requires. An epoch is ``iterations_per_epoch`` batches (nnU-Net: 250) or, when ``None``, one
pass over this rank's training subjects (``ceil(subjects · samples_per_volume / batch_size)`` batches).

**Distributed training.** The Queue's subject sampler is always a ``DistributedSampler`` (world size 1
outside distributed runs): when ``torch.distributed`` is initialised at ``train_dataloader()`` time,
each rank loads only its own subjects (``drop_last=False``: with a subject count not divisible by the
world size, up to ``world − 1`` subjects per pass also appear on a second rank, as with Lightning's own
sampler). The outer loader's sampler is a one-replica ``DistributedSampler`` over the patch stream, so
Lightning does not inject its own sampler: ``use_distributed_sampler`` may keep its default ``True``.
Validation/test/predict loaders hold whole volumes, one per batch, and shard them without repetition: rank
``r`` of ``w`` takes cases ``r, r + w, …`` (each case on exactly one rank; Lightning's own sampler would
repeat cases to even out the ranks and count them twice). Ranks left with fewer cases get padding batches
of a repeated case marked ``batch["duplicate"] = [True]``, which
:class:`~mambaclinix.training.SegmentationModule` skips, so every rank runs the same number of steps.

**Determinism.** Given ``seed``: the split; the subject order of pass ``p`` (``DistributedSampler`` with
``set_epoch(p)``); the augmentation of each subject load (torch seeded from ``(seed, p, subject)``
inside ``torch.random.fork_rng``, independent of worker count and process); the patch positions (a
generator seeded per subject load); the Queue's patch shuffling (its own generator seeded from
``(seed, rank)`` and reseeded from it and the epoch at each epoch). The global RNG state of the training
process is not touched.

**Epochs and resuming.** Each epoch restarts the patch stream (empty queue; subject passes
``epoch · 2^20, …``; shuffle reseeded), so the patches of epoch ``e`` depend only on ``(seed, rank, world
size, e)`` and not on what earlier epochs left in the queue. :meth:`SegmentationDataModule.state_dict`
(saved in every checkpoint) records the epoch and the training batches already done in it; resuming from a
mid-epoch checkpoint (``--ckpt_path last``) regenerates that epoch's stream and skips those batches
(loading and cutting their patches again, without training on them), so the resumed run trains on
exactly the patches the uninterrupted run would have (same world size and data settings).

**Batches** — every loader yields a plain ``dict``:

* ``"image"``: float32 ``(B, C, W, H, D)`` (training: ``patch_size``; otherwise a whole preprocessed
  volume with ``B = 1``),
* ``"label"``: int64 ``(B, 1, W, H, D)``, present when every case of the batch has a label,
* ``"name"``: ``list[str]`` of case names,
* ``"meta"``: ``list[dict]``, one per case, with the keys listed in :mod:`mambaclinix.data.preprocessing`
  (``image_paths``, ``original_shape``, ``original_affine``, ``crop_bbox``, ``spacing``, …) — what
  :func:`~mambaclinix.data.preprocessing.invert_to_original` and a prediction writer need,
* ``"duplicate"``: ``list[bool]``, only in the padding batches of distributed evaluation (see above).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mambaclinix.data.augmentation import nnunet_augmentation
from mambaclinix.data.datasets import (
    Case,
    DatasetError,
    DatasetInfo,
    find_images,
    read_dataset_json,
    read_decathlon,
    read_manifest,
)
from mambaclinix.data.preprocessing import (
    IMAGE_INTERPOLATIONS,
    LABEL_INTERPOLATIONS,
    NORMALIZATIONS,
    CachedCase,
    PreprocessingPlan,
    make_plan,
    preprocess_to_cache,
    read_cached_array,
)
from mambaclinix.data.sampling import SEED_KEY, ForegroundOversamplingSampler

logger = logging.getLogger(__name__)

__all__ = ["SegmentationDataModule", "collate_subjects"]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(v) & ((1 << 63) - 1) for v in values]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0] & np.uint64((1 << 63) - 1))


def collate_subjects(subjects: Sequence[tio.Subject]) -> dict[str, Any]:
    """TorchIO subjects (whole volumes or patches) → ``{"image", "label"?, "name", "meta"}`` (see the module
    docstring); images are stacked as float32, labels as int64."""
    batch: dict[str, Any] = {"image": torch.stack([s["image"].data.float() for s in subjects])}
    if all("label" in s for s in subjects):
        batch["label"] = torch.stack([s["label"].data.long() for s in subjects])
    batch["name"] = [str(s["name"]) for s in subjects]
    batch["meta"] = [s["meta"] for s in subjects]
    if any(s.get("duplicate", False) for s in subjects):
        batch["duplicate"] = [bool(s.get("duplicate", False)) for s in subjects]
    return batch


class _SeededSubjectsDataset(tio.SubjectsDataset):
    """``SubjectsDataset`` whose keys encode ``(pass, index)``; each load is seeded from ``(seed, pass,
    index)`` so that its augmentation and patches do not depend on workers or on the global RNG."""

    def __init__(self, subjects: Sequence[tio.Subject], transform: tio.Transform | None, seed: int):
        super().__init__(list(subjects), transform=transform)
        self.seed = int(seed)

    def __getitem__(self, key: int) -> tio.Subject:
        pass_index, index = divmod(int(key), len(self._subjects))
        seed = _mix(self.seed, pass_index, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            subject = super().__getitem__(index)
        subject[SEED_KEY] = _mix(seed, 1)
        return subject


class _PassSampler(Sampler[int]):
    """Wraps a ``DistributedSampler``: each iteration (one Queue pass) sets its epoch to the pass index
    and yields ``pass · num_subjects + index`` keys for :class:`_SeededSubjectsDataset`."""

    def __init__(self, inner: DistributedSampler, num_subjects: int):
        self.inner = inner
        self.num_subjects = num_subjects
        self.pass_index = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        current = self.pass_index
        self.pass_index += 1
        self.inner.set_epoch(current)
        for index in self.inner:
            yield current * self.num_subjects + int(index)


_PASS_STRIDE = 1 << 20
"""Subject passes reserved per epoch: epoch ``e`` reads passes ``e · _PASS_STRIDE``, ``+ 1``, …"""


class _PatchQueue(tio.Queue):
    """``tio.Queue`` with a seeded patch shuffle, an epoch length that does not iterate the sampler, and
    :meth:`restart` to begin the patch stream of a given epoch."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._seed = int(seed)
        self._generator = torch.Generator().manual_seed(seed)

    def restart(self, epoch: int) -> None:
        """Drop the queued patches (and the subject loader with its workers) and start epoch ``epoch``'s
        stream: subject passes from ``epoch · _PASS_STRIDE``, patch shuffle seeded from ``(seed, epoch)``.
        The stream of an epoch is thus a function of ``(seed, rank, world size, epoch)`` alone."""
        self.patches_list = []
        self._incomplete_subject = None
        self._num_patches_incomplete = 0
        self._subjects_iterable = None
        self.subject_sampler.pass_index = int(epoch) * _PASS_STRIDE
        self._generator.manual_seed(_mix(self._seed, int(epoch)))

    @property
    def iterations_per_epoch(self) -> int:
        return self.num_subjects * self.samples_per_volume

    def _shuffle_patches_list(self) -> None:
        order = torch.randperm(self.num_patches, generator=self._generator)
        self.patches_list = [self.patches_list[i] for i in order]


class _PatchStream(Dataset):
    """``length`` patches popped from a Queue (indices are ignored, as ``tio.Queue`` does)."""

    def __init__(self, queue: tio.Queue, length: int):
        self.queue = queue
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tio.Subject:
        return self.queue[index]


class _TrainLoader(DataLoader):
    """The training ``DataLoader``: each ``iter()`` (one epoch) first calls ``on_iter`` (which restarts the
    patch stream). ``state_dict``/``load_state_dict`` are the data module's stream position (Lightning saves
    and restores it as the data module's state; loading it twice is harmless)."""

    def __init__(
        self, *args, on_iter: Callable[[_TrainLoader], None], module: SegmentationDataModule, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._on_iter = on_iter
        self._module = module
        self.next_epoch = 0  # the epoch of the next iter() when no Trainer is attached

    def __iter__(self):
        self._on_iter(self)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return self._module.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._module.load_state_dict(state_dict)


class _ShardSampler(DistributedSampler):
    """Evaluation sampler: rank ``r`` of ``w`` takes cases ``r, r + w, r + 2w, …`` of the (unshuffled)
    dataset, each case on exactly one rank. Ranks with fewer cases are padded to the same number of
    batches with keys ``>= len(dataset)``, which :class:`_EvalDataset` turns into copies marked
    ``duplicate`` that the ``LightningModule`` skips; equal batch counts keep every collective call (DDP's
    buffer broadcast, metric syncs) matched across ranks. A ``DistributedSampler``, so Lightning does not
    replace it."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.num_samples = max(1, math.ceil(n / num_replicas))
        self.total_size = self.num_samples * num_replicas
        self.own = list(range(rank, n, num_replicas))

    def __iter__(self):
        n = len(self.dataset)  # type: ignore[arg-type]
        pad = [n + (i % max(n, 1)) for i in range(self.num_samples - len(self.own))]
        return iter(self.own + pad)

    def __len__(self) -> int:
        return self.num_samples


class _EvalDataset(tio.SubjectsDataset):
    """Whole-volume subjects; key ``n + i`` (``n`` subjects) is a copy of subject ``i`` marked
    ``duplicate=True`` (padding of :class:`_ShardSampler`)."""

    def __getitem__(self, index: int) -> tio.Subject:
        n = len(self._subjects)
        if int(index) < n:
            return super().__getitem__(int(index))
        subject = super().__getitem__(int(index) % n)
        subject["duplicate"] = True
        return subject


def _distributed_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _subject(entry: CachedCase) -> tio.Subject:
    for path in (entry.image_path, entry.label_path):
        if path is None:
            continue
        try:  # header and file size only (memory map): a truncated cache file fails here, before training
            np.load(path, mmap_mode="r")
        except Exception as err:
            raise DatasetError(
                f"case '{entry.name}': preprocessed file {path} is unreadable ({type(err).__name__}: {err}); "
                f"delete the folder {path.parent} to have the case preprocessed again"
            ) from err
    images: dict[str, Any] = {"image": tio.ScalarImage(entry.image_path, reader=read_cached_array)}
    if entry.label_path is not None:
        images["label"] = tio.LabelMap(entry.label_path, reader=read_cached_array)
    return tio.Subject(**images, name=entry.name, meta=entry.meta)


class SegmentationDataModule(L.LightningDataModule):
    """Patch-based 3D segmentation data with nnU-Net preprocessing, sampling and augmentation.

    Args:
        data_dir: folder in the Decathlon / nnU-Net raw layout (``dataset.json``, ``imagesTr``, …).
        manifest: CSV manifest instead of ``data_dir`` (exactly one of the two).
        patch_size: training patch ``(W, H, D)`` in voxels of the preprocessed grid.
        batch_size: training patches per batch (nnU-Net: 2). Validation/test/predict batches hold one
            whole volume.
        samples_per_volume: patches cut from each loaded (and augmented) subject.
        queue_length: maximum number of patches held by the ``tio.Queue``.
        num_workers: processes of the Queue (loading + augmenting subjects), of the evaluation loaders,
            and of the preprocessing in ``prepare_data``.
        val_fraction: fraction of the training pool used for validation when ``fold`` is ``None``.
        fold: cross-validation fold in ``[0, num_folds)``; ``None`` uses ``val_fraction``.
        num_folds: number of folds for ``fold``.
        seed: seeds the split, the subject order, the augmentation and the patch positions.
        target_spacing: spacing (mm) to resample to, per TorchIO array axis; ``None``: median spacing of
            the training pool.
        normalization: ``"auto"`` (``dataset.json`` channel names: ``CT`` → ``"ct"``, otherwise
            ``"zscore"``), ``"ct"``, ``"zscore"`` or ``"none"``.
        foreground_probability: probability that a training patch is centred on foreground (nnU-Net 1/3).
        augment: apply :func:`~mambaclinix.data.augmentation.nnunet_augmentation` to training subjects.
        cache_dir: preprocessing cache root; ``None``: ``<data_dir or manifest folder>/.mambaclinix_cache``,
            or ``$XDG_CACHE_HOME/mambaclinix/<hash of that folder>`` when it is not writable.
        predict_dir: folder or list of image files to predict; ``None``: the test images.
        iterations_per_epoch: training batches per epoch (nnU-Net: 250); ``None``: one pass over the
            training subjects.
        image_interpolation: image resampling in preprocessing, ``"bspline"`` (3rd order) or ``"linear"``.
        label_interpolation: label resampling in preprocessing, ``"nearest"`` or ``"onehot_linear"``.
        validate: in ``prepare_data``, check every file of the stage's cases with
            :func:`~mambaclinix.data.validation.validate_cases` before preprocessing, and raise one error
            listing every problem. It reads each file once (about the cost of preprocessing without the
            resampling); a passed check is remembered in the cache (keyed by the files' paths, sizes and
            modification times), so later runs on unchanged files skip it. ``False`` skips the check.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        manifest: str | None = None,
        patch_size: tuple[int, int, int] = (64, 64, 64),
        batch_size: int = 2,
        samples_per_volume: int = 8,
        queue_length: int = 64,
        num_workers: int = 2,
        val_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        seed: int = 0,
        target_spacing: tuple[float, float, float] | None = None,
        normalization: str = "auto",
        foreground_probability: float = 1 / 3,
        augment: bool = True,
        cache_dir: str | None = None,
        predict_dir: str | list[str] | None = None,
        iterations_per_epoch: int | None = None,
        image_interpolation: str = "bspline",
        label_interpolation: str = "nearest",
        validate: bool = True,
    ) -> None:
        super().__init__()
        if (data_dir is None) == (manifest is None):
            raise ValueError("give exactly one of data_dir (Decathlon / nnU-Net layout) and manifest (CSV)")
        patch = tuple(patch_size)
        if len(patch) != 3 or not all(isinstance(v, int) and v > 0 for v in patch):
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("samples_per_volume", samples_per_volume, 1),
            ("queue_length", queue_length, 1),
            ("num_workers", num_workers, 0),
            ("num_folds", num_folds, 2),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if queue_length < samples_per_volume:
            raise ValueError(
                f"queue_length ({queue_length}) must be >= samples_per_volume ({samples_per_volume})"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if fold is not None and not (isinstance(fold, int) and 0 <= fold < num_folds):
            raise ValueError(f"fold must be None or an int in [0, {num_folds}), got {fold!r}")
        if target_spacing is not None:
            spacing = tuple(target_spacing)
            if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
                raise ValueError(f"target_spacing must be 3 positive numbers, got {target_spacing}")
        if normalization != "auto" and normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be 'auto' or one of {NORMALIZATIONS}, got {normalization!r}"
            )
        if not 0.0 <= foreground_probability <= 1.0:
            raise ValueError(f"foreground_probability must be in [0, 1], got {foreground_probability}")
        if iterations_per_epoch is not None and (
            not isinstance(iterations_per_epoch, int) or iterations_per_epoch < 1
        ):
            raise ValueError(
                f"iterations_per_epoch must be None or an int >= 1, got {iterations_per_epoch!r}"
            )
        if image_interpolation not in IMAGE_INTERPOLATIONS:
            raise ValueError(
                f"image_interpolation must be one of {IMAGE_INTERPOLATIONS}, got {image_interpolation!r}"
            )
        if label_interpolation not in LABEL_INTERPOLATIONS:
            raise ValueError(
                f"label_interpolation must be one of {LABEL_INTERPOLATIONS}, got {label_interpolation!r}"
            )
        self.save_hyperparameters()
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.manifest = None if manifest is None else Path(manifest)
        self.patch_size = patch
        self.batch_size = batch_size
        self.samples_per_volume = samples_per_volume
        self.queue_length = queue_length
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.fold = fold
        self.num_folds = num_folds
        self.seed = int(seed)
        self.target_spacing = None if target_spacing is None else tuple(float(s) for s in target_spacing)
        self.normalization = normalization
        self.foreground_probability = float(foreground_probability)
        self.augment = augment
        self.cache_dir = cache_dir
        self.predict_dir = predict_dir
        self.iterations_per_epoch = iterations_per_epoch
        self.image_interpolation = image_interpolation
        self.label_interpolation = label_interpolation
        self.validate = bool(validate)

        self._info_loaded = False
        self._info_value: DatasetInfo | None = None
        self._case_lists: dict[str, list[Case]] | None = None
        self._num_classes_inferred: int | None = None
        self._plan_cache: PreprocessingPlan | None = None
        self.train_subjects: list[tio.Subject] = []
        self.val_subjects: list[tio.Subject] = []
        self.test_subjects: list[tio.Subject] = []
        self.predict_subjects: list[tio.Subject] = []
        self.train_subject_sampler: DistributedSampler | None = None
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches) from a checkpoint

    # ------------------------------------------------------------------------------ dataset description

    @property
    def _info(self) -> DatasetInfo | None:
        if not self._info_loaded:
            if self.data_dir is not None:
                self._info_value = read_dataset_json(self.data_dir)
            else:
                assert self.manifest is not None
                beside = self.manifest.parent / "dataset.json"
                self._info_value = read_dataset_json(self.manifest.parent) if beside.is_file() else None
            self._info_loaded = True
        return self._info_value

    def _cases(self) -> dict[str, list[Case]]:
        """Case lists by role: ``pool`` (labelled training pool), ``val`` (explicit), ``test``,
        ``predict``."""
        if self._case_lists is None:
            if self.data_dir is not None:
                pool = read_decathlon(self.data_dir, "train")
                val: list[Case] = []
                test = read_decathlon(self.data_dir, "test")
                default_predict = test
            else:
                assert self.manifest is not None
                rows = read_manifest(self.manifest)
                pool = [c for c in rows if c.label_path is not None and c.split in (None, "train")]
                val = [c for c in rows if c.split == "val"]
                test = [c for c in rows if c.split == "test"]
                default_predict = test + [c for c in rows if c.split is None and c.label_path is None]
            if not pool:
                raise DatasetError(f"{self.data_dir or self.manifest}: no labelled training cases")
            self._case_lists = {"pool": pool, "val": val, "test": test, "predict": default_predict}
            if self.predict_dir is not None:
                info = self._info
                # nnU-Net v2: one file per channel; MSD: one (4D) file per case; manifest: guessed, the
                # channel count telling "case_0000, case_0001" channels from single-channel cases.
                per_channel = None if info is None else info.layout == "nnunetv2"
                source = self.predict_dir if isinstance(self.predict_dir, str) else list(self.predict_dir)
                try:
                    self._case_lists["predict"] = find_images(source, self.num_channels, per_channel)
                except BaseException:
                    self._case_lists = None
                    raise
        return self._case_lists

    @property
    def num_channels(self) -> int:
        """Input channels (from ``dataset.json``, else from the manifest's first row)."""
        info = self._info
        if info is not None:
            return info.num_channels
        first = self._cases()["pool"][0]
        return sum(int(tio.ScalarImage(p).shape[0]) for p in first.image_paths)

    @property
    def num_classes(self) -> int:
        """Classes including background (``dataset.json``'s labels, else the largest training label + 1)."""
        info = self._info
        if info is not None:
            return info.num_classes
        if self._num_classes_inferred is None:
            cases = self._cases()
            highest = 0
            for case in cases["pool"] + cases["val"]:
                assert case.label_path is not None
                highest = max(highest, int(tio.LabelMap(case.label_path).data.max()))
            self._num_classes_inferred = max(highest + 1, 2)
            logger.info("num_classes = %d, read from the training labels", self._num_classes_inferred)
        return self._num_classes_inferred

    @property
    def class_names(self) -> list[str]:
        """Class names by label value, background first."""
        info = self._info
        if info is not None:
            return info.class_names
        return ["background"] + [f"class_{v}" for v in range(1, self.num_classes)]

    def _channel_names(self) -> tuple[str, ...]:
        info = self._info
        return info.channel_names if info is not None else ("unknown",) * self.num_channels

    # ---------------------------------------------------------------------------------------- splits

    def split(self) -> tuple[list[Case], list[Case]]:
        """``(train, val)`` cases (see the module docstring for the rule)."""
        cases = self._cases()
        pool = sorted(cases["pool"], key=lambda c: c.name)
        if cases["val"]:
            if self.fold is not None:
                logger.info("the manifest lists validation rows: fold=%s is ignored", self.fold)
            return pool, sorted(cases["val"], key=lambda c: c.name)
        n = len(pool)
        order = np.random.default_rng(self.seed).permutation(n)
        if self.fold is not None:
            if n < self.num_folds:
                raise DatasetError(f"{n} training case(s) cannot be split into {self.num_folds} folds")
            val_idx = set(np.array_split(order, self.num_folds)[self.fold].tolist())
        else:
            n_val = 0 if self.val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * self.val_fraction)))
            val_idx = set(order[:n_val].tolist())
        train = [c for i, c in enumerate(pool) if i not in val_idx]
        val = [c for i, c in enumerate(pool) if i in val_idx]
        return train, val

    # ----------------------------------------------------------------------------------- preprocessing

    def cache_root(self) -> Path:
        """The preprocessing cache root (created if needed)."""
        if self.cache_dir is not None:
            root = Path(self.cache_dir)
            root.mkdir(parents=True, exist_ok=True)
            return root
        base = self.data_dir if self.data_dir is not None else self.manifest.parent  # type: ignore[union-attr]
        root = base / ".mambaclinix_cache"
        try:
            root.mkdir(exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            pass
        digest = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:16]
        user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mambaclinix" / digest
        user.mkdir(parents=True, exist_ok=True)
        logger.info("%s is not writable; caching preprocessed data in %s", base, user)
        return user

    def plan(self) -> PreprocessingPlan:
        """The resolved preprocessing plan (computes and caches the dataset fingerprint if needed)."""
        if self._plan_cache is None:
            cases = self._cases()
            self._plan_cache = make_plan(
                cases["pool"] + cases["val"],
                self._channel_names(),
                target_spacing=self.target_spacing,
                normalization=self.normalization,
                image_interpolation=self.image_interpolation,
                label_interpolation=self.label_interpolation,
                cache_root=self.cache_root(),
            )
        return self._plan_cache

    def _known_num_classes(self) -> int | None:
        info = self._info
        return info.num_classes if info is not None else None

    def _cached(self, cases: Sequence[Case], num_workers: int = 0) -> list[CachedCase]:
        return preprocess_to_cache(
            cases,
            self.plan(),
            self.cache_root(),
            num_classes=self._known_num_classes(),
            num_workers=num_workers,
        )

    def _stage_cases(self, stage: str | None) -> list[Case]:
        cases = self._cases()
        train_pool = cases["pool"] + cases["val"]
        if stage in ("fit", "validate"):
            return train_pool
        if stage == "test":
            return cases["test"]
        if stage == "predict":
            return cases["predict"]
        unique: dict[tuple, Case] = {}
        for case in train_pool + cases["test"] + cases["predict"]:
            unique.setdefault((case.name, case.image_paths, case.label_path), case)
        return list(unique.values())

    def prepare_data(self) -> None:
        """Preprocess into the cache what the attached Trainer's stage needs (everything without one)."""
        fn = None if self.trainer is None else self.trainer.state.fn
        stage = None if fn is None else str(fn.value)
        cases = self._stage_cases(stage)
        if self.validate:
            self.validate_files(cases)
        entries = self._cached(cases, num_workers=self.num_workers)
        computed = sum(not e.from_cache for e in entries)
        logger.info(
            "preprocessing cache %s: %d case(s) computed, %d reused",
            self.cache_root(),
            computed,
            len(entries) - computed,
        )

    def validate_files(self, cases: Sequence[Case]) -> None:
        """Run :func:`~mambaclinix.data.validation.validate_cases` on ``cases`` against ``dataset.json``
        unless the same files (paths, sizes, modification times) already passed; remember a pass in the
        cache root.

        Raises:
            DatasetError: the problems found, each naming the case and file.
        """
        from mambaclinix.data.preprocessing import case_signature
        from mambaclinix.data.validation import validate_cases

        info = self._info
        described = None if info is None else [list(info.channel_names), sorted(info.labels)]
        key = json.dumps([1, described, [case_signature(c) for c in cases]], sort_keys=True)
        marker = self.cache_root() / f"validated-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if marker.is_file():
            logger.info("dataset check: %d case(s) unchanged since the last check (%s)", len(cases), marker)
            return
        report = validate_cases(cases, info)
        tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"cases": [c.name for c in cases], "empty_labels": report.empty_labels}))
        os.replace(tmp, marker)

    def setup(self, stage: str | None = None) -> None:
        """Build the subject lists of ``stage`` from the cache.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``, or ``None`` for all of them.
        """
        if stage in ("fit", "validate", None):
            train, val = self.split()
            if stage != "validate":
                self.train_subjects = [_subject(e) for e in self._cached(train)]
            self.val_subjects = [_subject(e) for e in self._cached(val)]
        if stage in ("test", None):
            self.test_subjects = [_subject(e) for e in self._cached(self._cases()["test"])]
        if stage in ("predict", None):
            self.predict_subjects = [_subject(e) for e in self._cached(self._cases()["predict"])]

    # ------------------------------------------------------------------------------------- loaders

    def train_transform(self) -> tio.Transform | None:
        """The augmentation applied to training subjects (``None`` when ``augment=False``)."""
        return nnunet_augmentation() if self.augment else None

    def train_dataloader(self) -> DataLoader:
        if not self.train_subjects:
            raise RuntimeError("no training subjects: call prepare_data() and setup('fit') first")
        world, rank = _distributed_world()
        dataset = _SeededSubjectsDataset(self.train_subjects, self.train_transform(), self.seed)
        subject_sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=False
        )
        self.train_subject_sampler = subject_sampler
        queue = _PatchQueue(
            dataset,
            max_length=self.queue_length,
            samples_per_volume=self.samples_per_volume,
            sampler=ForegroundOversamplingSampler(
                self.patch_size, self.foreground_probability, seed=_mix(self.seed, rank, 2)
            ),
            subject_sampler=_PassSampler(subject_sampler, len(dataset)),
            num_workers=self.num_workers,
            shuffle_subjects=False,
            shuffle_patches=True,
            start_background=False,
            seed=_mix(self.seed, rank, 3),
        )
        if self.iterations_per_epoch is not None:
            num_patches = self.iterations_per_epoch * self.batch_size
        else:
            num_patches = math.ceil(len(queue) / self.batch_size) * self.batch_size
        stream = _PatchStream(queue, num_patches)
        return _TrainLoader(
            stream,
            batch_size=self.batch_size,
            # One replica over the stream: Lightning then leaves the sampler alone under DDP.
            sampler=DistributedSampler(stream, num_replicas=1, rank=0, shuffle=False),
            num_workers=0,  # the Queue's own workers load the subjects
            collate_fn=collate_subjects,
            on_iter=self._start_epoch_stream,
            module=self,
        )

    def _start_epoch_stream(self, loader: _TrainLoader) -> None:
        """Restart the patch stream of ``loader`` at the current epoch (the Trainer's, else the loader's
        count of ``iter()`` calls). The
        first ``iter()`` after a checkpoint was loaded starts at the saved position instead: the Trainer may
        create its iterator before it restores its own epoch counter (``estimated_stepping_batches`` in
        ``configure_optimizers``), and keeps that iterator for the resumed epoch."""
        skip = 0
        if self._resume_position is not None:
            epoch, skip = self._resume_position
            self._resume_position = None
        elif self.trainer is not None:
            epoch = int(self.trainer.current_epoch)
        else:
            epoch = loader.next_epoch
        queue = loader.dataset.queue
        queue.restart(epoch)
        if skip:
            logger.info("resuming epoch %d of the patch stream after %d batch(es)", epoch, skip)
            for _ in range(skip * self.batch_size):
                queue[0]
        loader.next_epoch = epoch + 1

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position, saved in checkpoints: ``{"epoch", "batches", "seed"}``, the epoch
        to continue and the batches of it already trained on (the next epoch and 0 at an epoch's end);
        empty without a fitting Trainer."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn is None or str(trainer.state.fn.value) != "fit":
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress
        epoch, batches = int(trainer.current_epoch), int(progress.current.ready)
        if progress.is_last_batch or batches >= trainer.num_training_batches:
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the saved stream position: the next training ``iter()`` regenerates that epoch's stream
        and skips the batches already trained on, so the resumed run sees the patches the uninterrupted
        run would."""
        if not state_dict:
            return
        if state_dict.get("seed", self.seed) != self.seed:
            logger.warning(
                "the checkpoint was trained with data seed %s, this run uses %s: the patch stream differs",
                state_dict.get("seed"),
                self.seed,
            )
        self._resume_position = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def _volume_loader(self, subjects: list[tio.Subject]) -> DataLoader:
        dataset = _EvalDataset(subjects)
        world, rank = _distributed_world()
        return DataLoader(
            dataset,
            batch_size=1,
            # Under DDP each case is evaluated on exactly one rank (Lightning's own sampler would repeat
            # cases to even out the ranks); outside it, this is the plain sequential order.
            sampler=_ShardSampler(dataset, world, rank),
            num_workers=self.num_workers,
            collate_fn=collate_subjects,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_subjects:
            return []
        return self._volume_loader(self.val_subjects)

    def test_dataloader(self) -> DataLoader:
        if not self.test_subjects:
            raise DatasetError(f"{self.data_dir or self.manifest}: no test cases (imagesTs / split 'test')")
        return self._volume_loader(self.test_subjects)

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_subjects:
            raise DatasetError(
                f"{self.data_dir or self.manifest}: no images to predict (predict_dir / imagesTs)"
            )
        return self._volume_loader(self.predict_subjects)
