"""The loaders of :class:`~mambaclinix.data.datamodule.SegmentationDataModule` (``docs/data.md``).

* **Training** (:func:`patch_loader`): a ``tio.Queue`` of patches cut by
  :class:`~mambaclinix.data.sampling.ForegroundOversamplingSampler` from subjects loaded and augmented by
  the Queue's worker processes, behind a ``DataLoader`` with ``num_workers=0`` (as TorchIO requires).
  Every subject load, patch position and shuffle is seeded from ``(seed, rank, epoch, pass, subject)``
  (:class:`_SeededSubjectsDataset`, :class:`_PassSampler`, :class:`_PatchQueue`), so that the patches
  of an epoch depend on nothing else and a resumed run can regenerate them (:class:`_TrainLoader`).
* **Evaluation** (:func:`volume_loader`): one whole volume per batch; under ``torch.distributed`` each
  case is evaluated on exactly one rank, with padding batches marked ``duplicate``
  (:class:`_ShardSampler`, :class:`_EvalDataset`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mambaclinix.data.cache import CachedCase, read_cached_array
from mambaclinix.data.cases import DatasetError
from mambaclinix.data.sampling import SEED_KEY, ForegroundOversamplingSampler

__all__ = ["cached_subject", "collate_subjects", "distributed_world", "patch_loader", "volume_loader"]


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(v) & ((1 << 63) - 1) for v in values]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0] & np.uint64((1 << 63) - 1))


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

    def __init__(self, *args, on_iter: Callable[[_TrainLoader], None], module: _Stateful, **kwargs):
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

    @property
    def subject_sampler(self) -> DistributedSampler:
        """The ``DistributedSampler`` over this rank's subjects (inside the queue's pass sampler)."""
        return self.dataset.queue.subject_sampler.inner  # type: ignore[attr-defined]


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


def patch_loader(
    subjects: Sequence[tio.Subject],
    transform: tio.Transform | None,
    *,
    patch_size: tuple[int, int, int],
    batch_size: int,
    samples_per_volume: int,
    queue_length: int,
    num_workers: int,
    foreground_probability: float,
    seed: int,
    iterations_per_epoch: int | None,
    on_iter: Callable[[_TrainLoader], None],
    module: _Stateful,
) -> _TrainLoader:
    """The training loader: patches of this rank's ``subjects`` (see the module docstring).

    ``iterations_per_epoch`` batches per epoch, or one pass over this rank's subjects
    (``ceil(subjects · samples_per_volume / batch_size)`` batches) when ``None``. ``on_iter`` is called
    with the loader at each ``iter()`` and must restart the stream (:meth:`_PatchQueue.restart`);
    ``module`` provides the loader's ``state_dict``.
    """
    world, rank = distributed_world()
    dataset = _SeededSubjectsDataset(subjects, transform, seed)
    subject_sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    queue = _PatchQueue(
        dataset,
        max_length=queue_length,
        samples_per_volume=samples_per_volume,
        sampler=ForegroundOversamplingSampler(patch_size, foreground_probability, seed=_mix(seed, rank, 2)),
        subject_sampler=_PassSampler(subject_sampler, len(dataset)),
        num_workers=num_workers,
        shuffle_subjects=False,
        shuffle_patches=True,
        start_background=False,
        seed=_mix(seed, rank, 3),
    )
    if iterations_per_epoch is not None:
        num_patches = iterations_per_epoch * batch_size
    else:
        num_patches = math.ceil(len(queue) / batch_size) * batch_size
    stream = _PatchStream(queue, num_patches)
    return _TrainLoader(
        stream,
        batch_size=batch_size,
        # One replica over the stream: Lightning then leaves the sampler alone under DDP.
        sampler=DistributedSampler(stream, num_replicas=1, rank=0, shuffle=False),
        num_workers=0,  # the Queue's own workers load the subjects
        collate_fn=collate_subjects,
        on_iter=on_iter,
        module=module,
    )


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
