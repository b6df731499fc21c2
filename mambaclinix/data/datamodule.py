"""``SegmentationDataModule``: patch training on nnU-Net-preprocessed volumes (nnU-Net v2's recipe, as
MambaClinix trains, Bian et al., arXiv:2409.12533).

The data module reads a Decathlon / nnU-Net raw folder or a CSV manifest (:mod:`mambaclinix.data.datasets`),
splits the labelled training pool deterministically (by ``seed``, ``fold`` or ``val_fraction``, or the
manifest's ``val`` rows), checks every file (:mod:`mambaclinix.data.validation`) and preprocesses into
the on-disk cache in :meth:`~SegmentationDataModule.prepare_data` (:mod:`mambaclinix.data.preprocessing`,
:mod:`mambaclinix.data.cache`), and serves seeded batches of per-patch augmented patches for training
(:mod:`mambaclinix.data.patches`) and whole volumes for validation, test and prediction
(:mod:`mambaclinix.data.loaders`), sharded across ranks under
``torch.distributed``. Its ``state_dict`` records the position in the training stream so that a resumed
run trains on the patches the uninterrupted run would have.

``docs/data.md`` describes the split rule, the loaders, determinism, distributed training, resuming and
the batch format in full.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torchio as tio
from torch.utils.data import DataLoader, DistributedSampler

from mambaclinix.data.cache import CachedCase, case_signature, default_cache_root, stable_hash
from mambaclinix.data.datasets import (
    Case,
    DatasetError,
    DatasetInfo,
    find_images,
    read_cases,
    read_dataset_info,
)
from mambaclinix.data.loaders import cached_subject, collate_subjects, distributed_world, volume_loader
from mambaclinix.data.normalization import NORMALIZATIONS
from mambaclinix.data.patch_augmentation import PatchAugmentation
from mambaclinix.data.patches import OVERSAMPLING, TrainLoader, patch_loader
from mambaclinix.data.preprocessing import PreprocessingPlan, make_plan, preprocess_to_cache
from mambaclinix.data.resampling import IMAGE_INTERPOLATIONS, LABEL_INTERPOLATIONS
from mambaclinix.utils.atomic import write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["SegmentationDataModule", "collate_subjects"]


class SegmentationDataModule(L.LightningDataModule):
    """Patch-based 3D segmentation data with nnU-Net preprocessing, sampling and augmentation.

    Args:
        data_dir: folder in the Decathlon / nnU-Net raw layout (``dataset.json``, ``imagesTr``, …).
        manifest: CSV manifest instead of ``data_dir`` (exactly one of the two).
        patch_size: training patch ``(W, H, D)`` in voxels of the preprocessed grid.
        batch_size: training patches per batch (nnU-Net: 2). Validation/test/predict batches hold one
            whole volume.
        samples_per_volume: patches per training subject in each pass over the subjects (a pass mixes
            the subjects' patches in a seeded random order); with ``iterations_per_epoch=None`` an epoch
            is one pass.
        queue_length: deprecated and ignored (patches are no longer buffered in a ``tio.Queue``); a
            value other than ``None`` gives a ``FutureWarning``.
        num_workers: ``DataLoader`` worker processes of the training loader (reading and augmenting
            patches) and of the evaluation loaders, and processes of the preprocessing in
            ``prepare_data``.
        val_fraction: fraction of the training pool used for validation when ``fold`` is ``None``.
        fold: cross-validation fold in ``[0, num_folds)``; ``None`` uses ``val_fraction``.
        num_folds: number of folds for ``fold``.
        seed: seeds the split, the subject order, the augmentation and the patch positions.
        target_spacing: spacing (mm) to resample to, per TorchIO array axis; ``None``: median spacing of
            the training pool.
        normalization: ``"auto"`` (``dataset.json`` channel names: ``CT`` → ``"ct"``, otherwise
            ``"zscore"``), ``"ct"``, ``"zscore"`` or ``"none"``.
        foreground_probability: fraction of training patches centred on foreground (nnU-Net 1/3).
        oversampling: ``"batch"`` (nnU-Net): the last ``B − round(B·(1 − foreground_probability))``
            patches of each batch of ``B`` are centred on foreground (one of two for ``B = 2``);
            ``"patch"``: an independent coin per patch with probability ``foreground_probability``.
        augment: augment every training patch on its own
            (:class:`~mambaclinix.data.patch_augmentation.PatchAugmentation`, nnU-Net's defaults).
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
        queue_length: int | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
        seed: int = 0,
        target_spacing: tuple[float, float, float] | None = None,
        normalization: str = "auto",
        foreground_probability: float = 1 / 3,
        oversampling: str = "batch",
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
            ("num_workers", num_workers, 0),
            ("num_folds", num_folds, 2),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if queue_length is not None:
            warnings.warn(
                "SegmentationDataModule(queue_length=...) is deprecated and ignored: every training patch is "
                "read and augmented on its own in the DataLoader workers (no tio.Queue); remove the option",
                FutureWarning,
                stacklevel=2,
            )
        if oversampling not in OVERSAMPLING:
            raise ValueError(f"oversampling must be one of {OVERSAMPLING}, got {oversampling!r}")
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
        self.oversampling = oversampling
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
            self._info_value = read_dataset_info(self.data_dir, self.manifest)
            self._info_loaded = True
        return self._info_value

    def _cases(self) -> dict[str, list[Case]]:
        """Case lists by role: ``pool`` (labelled training pool), ``val`` (explicit), ``test``,
        ``predict``."""
        if self._case_lists is None:
            lists = read_cases(self.data_dir, self.manifest)
            self._case_lists = {
                "pool": lists.train,
                "val": lists.val,
                "test": lists.test,
                "predict": lists.test + lists.unlabelled,
            }
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
        """``(train, val)`` cases (the rule is in ``docs/data.md``, "Sources and splits")."""
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
        return default_cache_root(self.data_dir if self.data_dir is not None else self.manifest.parent)  # type: ignore[union-attr]

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
        from mambaclinix.data.validation import validate_cases

        info = self._info
        described = None if info is None else [list(info.channel_names), sorted(info.labels)]
        key = stable_hash([1, described, [case_signature(c) for c in cases]])
        marker = self.cache_root() / f"validated-{key}.json"
        if marker.is_file():
            logger.info("dataset check: %d case(s) unchanged since the last check (%s)", len(cases), marker)
            return
        report = validate_cases(cases, info)
        write_json_atomic(marker, {"cases": [c.name for c in cases], "empty_labels": report.empty_labels})

    def setup(self, stage: str | None = None) -> None:
        """Build the subject lists of ``stage`` from the cache.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"``, or ``None`` for all of them.
        """
        if stage in ("fit", "validate", None):
            train, val = self.split()
            if stage != "validate":
                self.train_subjects = [cached_subject(e) for e in self._cached(train)]
            self.val_subjects = [cached_subject(e) for e in self._cached(val)]
        if stage in ("test", None):
            self.test_subjects = [cached_subject(e) for e in self._cached(self._cases()["test"])]
        if stage in ("predict", None):
            self.predict_subjects = [cached_subject(e) for e in self._cached(self._cases()["predict"])]

    # ------------------------------------------------------------------------------------- loaders

    def train_augmentation(self) -> PatchAugmentation | None:
        """The augmentation applied to each training patch (``None`` when ``augment=False``)."""
        return PatchAugmentation() if self.augment else None

    def train_dataloader(self) -> DataLoader:
        if not self.train_subjects:
            raise RuntimeError("no training subjects: call prepare_data() and setup('fit') first")
        world, rank = distributed_world()
        loader = patch_loader(
            self.train_subjects,
            self.train_augmentation(),
            patch_size=self.patch_size,
            batch_size=self.batch_size,
            samples_per_volume=self.samples_per_volume,
            num_workers=self.num_workers,
            foreground_probability=self.foreground_probability,
            oversampling=self.oversampling,
            seed=self.seed,
            world=world,
            rank=rank,
            iterations_per_epoch=self.iterations_per_epoch,
            on_iter=self._start_epoch_stream,
            module=self,
        )
        self.train_subject_sampler = loader.subject_sampler
        return loader

    def _start_epoch_stream(self, loader: TrainLoader) -> None:
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
        if skip:
            logger.info("resuming epoch %d of the patch stream after %d batch(es)", epoch, skip)
        loader.stream_sampler.set_position(epoch, skip * self.batch_size)
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

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_subjects:
            return []
        return volume_loader(self.val_subjects, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        if not self.test_subjects:
            raise DatasetError(f"{self.data_dir or self.manifest}: no test cases (imagesTs / split 'test')")
        return volume_loader(self.test_subjects, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        if not self.predict_subjects:
            raise DatasetError(
                f"{self.data_dir or self.manifest}: no images to predict (predict_dir / imagesTs)"
            )
        return volume_loader(self.predict_subjects, self.num_workers)
