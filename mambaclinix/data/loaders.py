"""The loaders of :class:`~mambaclinix.data.datamodule.SegmentationDataModule` (``docs/data.md``).

* **Training**: :func:`mambaclinix.data.patches.patch_loader`, one seeded, augmented patch per index,
  cut in the ``DataLoader``'s workers from the subjects :func:`cached_subject` builds.
* **Evaluation** (:func:`volume_loader`): one whole volume per batch; under ``torch.distributed`` each
  case is evaluated on exactly one rank, with padding batches marked ``duplicate``
  (:class:`_ShardSampler`, :class:`_EvalDataset`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mambaclinix.data.cache import CachedCase, read_cached_array
from mambaclinix.data.cases import DatasetError

__all__ = ["cached_subject", "collate_subjects", "distributed_world", "volume_loader"]


def collate_subjects(subjects: Sequence[tio.Subject]) -> dict[str, Any]:
    """TorchIO subjects (whole volumes or patches) → a batch ``{"image", "label"?, "name", "meta",
    "duplicate"?}`` (``docs/data.md``); images are stacked as float32, labels as int64."""
    batch: dict[str, Any] = {"image": torch.stack([s["image"].data.float() for s in subjects])}
    if all("label" in s for s in subjects):
        batch["label"] = torch.stack([s["label"].data.long() for s in subjects])
    batch["name"] = [str(s["name"]) for s in subjects]
    batch["meta"] = [s["meta"] for s in subjects]
    if any(s.get("duplicate", False) for s in subjects):
        batch["duplicate"] = [bool(s.get("duplicate", False)) for s in subjects]
    return batch


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


def distributed_world() -> tuple[int, int]:
    """``(world size, rank)`` of the initialised ``torch.distributed`` group, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def cached_subject(entry: CachedCase) -> tio.Subject:
    """A ``tio.Subject`` reading a cache entry lazily (``image``, ``label`` if any, ``name``, ``meta``); the
    ``.npy`` headers are checked now, so that a truncated cache file fails before training."""
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


def volume_loader(subjects: list[tio.Subject], num_workers: int) -> DataLoader:
    """Whole volumes, one per batch, each case on exactly one rank under ``torch.distributed`` (Lightning's
    own sampler would repeat cases to even out the ranks); outside it, the plain sequential order."""
    dataset = _EvalDataset(subjects)
    world, rank = distributed_world()
    return DataLoader(
        dataset,
        batch_size=1,
        sampler=_ShardSampler(dataset, world, rank),
        num_workers=num_workers,
        collate_fn=collate_subjects,
    )
