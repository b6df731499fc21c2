"""The training patch stream: one seeded, augmented patch per index, cut in ``DataLoader`` workers.

Patch ``i`` of epoch ``e`` on rank ``r`` is a pure function of ``(seed, r, world size, e, i)``:

* **Subject.** The epoch is cut into passes over this rank's subjects (``DistributedSampler`` order of
  pass ``e · 2^20 + q``, shuffled with ``set_epoch``); pass ``q`` holds ``samples_per_volume`` slots per
  subject in a seeded random order, so every subject gives ``samples_per_volume`` patches per pass and a
  batch mixes subjects.
* **Foreground oversampling.** ``oversampling="batch"`` (nnU-Net's default): in each batch of ``B`` the
  last ``B − round(B·(1 − p))`` patches (``p = foreground_probability``, 1/3: one of two for ``B = 2``)
  are centred on foreground: a class drawn uniformly among the classes present, then one of its voxels
  (up to ``max(10000, 1 %)`` per class, as nnU-Net stores), the patch shifted to lie in the volume.
  ``oversampling="patch"``: an independent coin with probability ``p`` per patch. Other patches, and
  every patch of a subject without foreground, are placed uniformly. An axis shorter than the patch is
  centred with zeros on both sides (the odd voxel at the end).
* **Augmentation.** :class:`~mambaclinix.data.patch_augmentation.PatchAugmentation` on that patch alone:
  rotation and scaling on the enlarged crop the patch needs, then the intensity transforms and mirroring
  with the patch's own statistics.

One ``numpy.random.Generator`` seeded from ``(seed, rank, epoch, i)`` draws everything of patch ``i``, so
the stream does not depend on the number of workers or on the global RNG state, an epoch's stream does
not depend on earlier epochs, and resuming mid-epoch starts the stream at the first batch not trained on.
Volumes are read as memory maps of the preprocessing cache (only the enlarged crop is read) in the
``DataLoader``'s worker processes; foreground locations are found once per subject and worker.

**Why not** ``tio.Queue``: the Queue augments a whole subject once and cuts ``samples_per_volume``
patches from it, so patches share one draw and intensity statistics are the volume's; nnU-Net augments
each patch. Per-patch transforms need the patch's position before augmenting, and the position must be
chosen per batch slot for batch-wise oversampling; a map-style dataset of patch indices gives both, and
keeps TorchIO where it serves (reading, ``Subject``, preprocessing, evaluation loaders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchio as tio
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mambaclinix.data.patch_augmentation import PatchAugmentation, plain_patch

__all__ = ["OVERSAMPLING", "PatchStream", "collate_patches", "forced_foreground", "patch_loader"]

OVERSAMPLING = ("batch", "patch")
PASS_STRIDE = 1 << 20
"""Subject passes reserved per epoch: epoch ``e`` reads passes ``e · PASS_STRIDE``, ``+ 1``, …"""
_KEY_STRIDE = 1 << 40
_MAX_LOCATIONS = 10000


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def forced_foreground(index: int, batch_size: int, foreground_probability: float) -> bool:
    """Whether patch ``index`` of the stream must contain foreground under batch-wise oversampling:
    its position in the batch is ``>= round(batch_size · (1 − foreground_probability))``."""
    return index % batch_size >= round(batch_size * (1 - foreground_probability))


def _volume(subject: tio.Subject, key: str) -> np.ndarray | None:
    """``subject[key]`` as ``(C, *spatial)``: a memory map of a not-yet-loaded ``.npy`` file, else the
    image's data."""
    image = subject.get(key)
    if not isinstance(image, tio.Image):
        return None
    path = image.path
    if not getattr(image, "_loaded", True) and isinstance(path, Path) and path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    return image.data.numpy()


def _locations(label: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Flat voxel indices per foreground class (at most ``max(10000, ceil(1 %))`` per class)."""
    flat = np.asarray(label).reshape(-1)
    where = np.flatnonzero(flat > 0)
    values = flat[where]
    out = {}
    for value in np.unique(values):
        chosen = where[values == value]
        keep = max(min(_MAX_LOCATIONS, len(chosen)), math.ceil(len(chosen) * 0.01))
        if keep < len(chosen):
            chosen = np.sort(rng.choice(chosen, keep, replace=False))
        out[int(value)] = chosen.astype(np.int64)
    return out


class PatchStream(Dataset):
    """Map-style dataset of training patches: key ``e · 2^40 + i`` is patch ``i`` of epoch ``e`` (see the
    module docstring). Items are dicts ``{"image", "label"?, "name", "meta"}`` of numpy arrays."""

    def __init__(
        self,
        subjects: Sequence[tio.Subject],
        *,
        patch_size: Sequence[int],
        batch_size: int,
        samples_per_volume: int,
        seed: int,
        augmentation: PatchAugmentation | None,
        oversampling: str = "batch",
        foreground_probability: float = 1 / 3,
        world: int = 1,
        rank: int = 0,
    ):
        if oversampling not in OVERSAMPLING:
            raise ValueError(f"oversampling must be one of {OVERSAMPLING}, got {oversampling!r}")
        if not subjects:
            raise ValueError("PatchStream needs at least one subject")
        self.subjects = list(subjects)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.seed = int(seed)
        self.augmentation = augmentation
        self.oversampling = oversampling
        self.foreground_probability = float(foreground_probability)
        self.rank = int(rank)
        self.subject_sampler = DistributedSampler(
            self.subjects, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=False
        )
        self._passes: dict[int, tuple[list[int], np.ndarray]] = {}
        self._volumes: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._foreground: dict[int, dict[int, np.ndarray]] = {}

    @property
    def patches_per_pass(self) -> int:
        return len(self.subject_sampler) * self.samples_per_volume

    def __len__(self) -> int:
        return self.patches_per_pass

    def subject_index(self, epoch: int, index: int) -> int:
        """The subject (index into ``subjects``) of patch ``index`` of epoch ``epoch``."""
        q, slot = divmod(int(index), self.patches_per_pass)
        pass_index = int(epoch) * PASS_STRIDE + q
        if pass_index not in self._passes:
            if len(self._passes) > 4:
                self._passes.clear()
            self.subject_sampler.set_epoch(pass_index)
            order = [int(i) for i in self.subject_sampler]
            rng = np.random.default_rng([self.seed, self.rank, pass_index, 0x5107])
            self._passes[pass_index] = (order, rng.permutation(self.patches_per_pass))
        order, slots = self._passes[pass_index]
        return order[int(slots[slot]) // self.samples_per_volume]

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if index not in self._volumes:
            subject = self.subjects[index]
            self._volumes[index] = (_volume(subject, "image"), _volume(subject, "label"))
        return self._volumes[index]

    def _foreground_of(self, index: int, label: np.ndarray | None) -> dict[int, np.ndarray]:
        if label is None:
            return {}
        if index not in self._foreground:
            rng = np.random.default_rng([self.seed, index, 0xF6])
            self._foreground[index] = _locations(label, rng)
        return self._foreground[index]

    def _start(
        self, shape: np.ndarray, forced: bool, foreground: dict, rng: np.random.Generator
    ) -> np.ndarray:
        size = np.asarray(self.patch_size)
        deficit = np.maximum(size - shape, 0)
        low = -(deficit // 2)
        high = np.maximum(shape - size, low)
        if forced and foreground:
            classes = sorted(foreground)
            voxels = foreground[classes[int(rng.integers(len(classes)))]]
            voxel = np.array(np.unravel_index(int(voxels[int(rng.integers(len(voxels)))]), tuple(shape)))
            return np.clip(voxel - size // 2, low, high)
        return np.array([int(rng.integers(a, b + 1)) for a, b in zip(low, high, strict=True)])

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, index = divmod(int(key), _KEY_STRIDE)
        subject_index = self.subject_index(epoch, index)
        subject = self.subjects[subject_index]
        image, label = self._load(subject_index)
        rng = np.random.default_rng([self.seed, self.rank, epoch, index])
        if self.oversampling == "batch":
            forced = forced_foreground(index, self.batch_size, self.foreground_probability)
        else:
            forced = bool(rng.random() < self.foreground_probability)
        foreground = self._foreground_of(subject_index, label) if forced else {}
        start = self._start(np.asarray(image.shape[1:]), forced, foreground, rng)
        if self.augmentation is None:
            patch, patch_label = plain_patch(image, label, start, self.patch_size)
        else:
            patch, patch_label = self.augmentation.patch(image, label, start, self.patch_size, rng)
        item = {"image": patch, "name": subject.get("name", ""), "meta": subject.get("meta")}
        if patch_label is not None:
            item["label"] = patch_label
        item["location"] = np.concatenate([start, start + np.asarray(self.patch_size)])
        return item


def collate_patches(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Patches of :class:`PatchStream` → ``{"image" float32, "label" int64?, "name", "meta"}``."""
    batch: dict[str, Any] = {"image": torch.from_numpy(np.stack([i["image"] for i in items])).float()}
    if all("label" in i for i in items):
        batch["label"] = torch.from_numpy(np.stack([i["label"].astype(np.int64) for i in items]))
    batch["name"] = [str(i["name"]) for i in items]
    batch["meta"] = [i["meta"] for i in items]
    return batch


class StreamSampler(DistributedSampler):
    """Keys of one epoch's patches, ``start`` to ``length`` (set by :meth:`set_position`). A one-replica
    ``DistributedSampler``, so Lightning leaves it in place under DDP."""

    def __init__(self, stream: PatchStream, length: int):
        super().__init__(stream, num_replicas=1, rank=0, shuffle=False)
        self.length = int(length)
        self.stream_epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.stream_epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        base = self.stream_epoch * _KEY_STRIDE
        return iter(range(base + self.start, base + self.length))

    def __len__(self) -> int:
        return self.length


class TrainLoader(DataLoader):
    """The training ``DataLoader``: each ``iter()`` (one epoch) first calls ``on_iter``, which places the
    stream (:meth:`StreamSampler.set_position`). ``state_dict``/``load_state_dict`` are the data module's
    stream position (Lightning saves and restores it as the data module's state)."""

    def __init__(self, *args, on_iter: Callable[[TrainLoader], None], module: _Stateful, **kwargs):
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
        """The ``DistributedSampler`` over this rank's subjects."""
        return self.dataset.subject_sampler  # type: ignore[attr-defined]

    @property
    def stream_sampler(self) -> StreamSampler:
        return self.sampler  # type: ignore[return-value]


def patch_loader(
    subjects: Sequence[tio.Subject],
    augmentation: PatchAugmentation | None,
    *,
    patch_size: Sequence[int],
    batch_size: int,
    samples_per_volume: int,
    num_workers: int,
    foreground_probability: float,
    oversampling: str,
    seed: int,
    iterations_per_epoch: int | None,
    world: int,
    rank: int,
    on_iter: Callable[[TrainLoader], None],
    module: _Stateful,
) -> TrainLoader:
    """The training loader over this rank's ``subjects``: ``iterations_per_epoch`` batches per epoch, or
    one pass (``ceil(subjects · samples_per_volume / batch_size)`` batches) when ``None``."""
    stream = PatchStream(
        subjects,
        patch_size=patch_size,
        batch_size=batch_size,
        samples_per_volume=samples_per_volume,
        seed=seed,
        augmentation=augmentation,
        oversampling=oversampling,
        foreground_probability=foreground_probability,
        world=world,
        rank=rank,
    )
    batches = iterations_per_epoch or math.ceil(stream.patches_per_pass / batch_size)
    return TrainLoader(
        stream,
        batch_size=batch_size,
        sampler=StreamSampler(stream, batches * batch_size),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # workers keep their memory maps and foreground locations
        collate_fn=collate_patches,
        on_iter=on_iter,
        module=module,
    )
