"""Foreground-oversampling patch sampler for a ``tio.Queue`` of your own (nnU-Net's sampling, per patch).

:class:`~mambaclinix.data.datamodule.SegmentationDataModule` does not use it: its patch stream
(:mod:`mambaclinix.data.patches`) oversamples per batch, as nnU-Net does.

Each patch is, with probability ``foreground_probability`` (default 1/3, nnU-Net's
``oversample_foreground_percent``), centred on a random foreground voxel: a class is drawn uniformly
among the classes present in the (augmented) label, then a voxel of that class uniformly; the patch
start is then clipped so that the patch lies inside the volume (the chosen voxel always stays inside the
patch). Otherwise the patch is placed uniformly at random among the positions that fit. A subject
without a label, or whose label is all background, always gets uniform patches.

nnU-Net forces the *last third of each batch* to contain foreground; here the choice is an independent
coin flip per patch, which has the same expected fraction and does not depend on the batch size.

**Small volumes.** Any axis shorter than the patch is first padded symmetrically with zeros (extra
voxel at the end) for every image: 0 is the mean of z-scored/CT-normalised intensities and the
background label. The padded voxels never count as foreground. Patches therefore always have exactly
``patch_size``.

**Randomness.** A subject that carries an integer under :data:`SEED_KEY` (the DataModule sets it per
subject load) gets its own ``torch.Generator`` seeded from it, and the key is advanced on every call so
that a subject the ``tio.Queue`` samples in two rounds gets fresh patches; otherwise the sampler's own
generator (seeded by ``seed``) or, with ``seed=None``, torch's global RNG is used.

Patches are cut by slicing (no deep copy of the whole subject per patch, unlike TorchIO's
``Crop``-based samplers); non-image entries of the subject (``name``, ``meta``) are shared, and the patch
records its ``location`` (``(i0, j0, k0, i1, j1, k1)`` in the possibly padded volume) like TorchIO's.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F
import torchio as tio
from torchio.constants import LOCATION

__all__ = ["SEED_KEY", "ForegroundOversamplingSampler", "pad_to_shape"]

SEED_KEY = "_mambaclinix_seed"
"""Subject entry holding the integer that seeds the patch draws of this subject load."""

_MASK64 = (1 << 63) - 1


def _next_seed(seed: int) -> int:
    return int(
        np.random.SeedSequence([seed & _MASK64, 0x5EED]).generate_state(2, np.uint32).view(np.uint64)[0]
    )


def _translated(affine: np.ndarray, offset: np.ndarray) -> np.ndarray:
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, 3] = out[:3, :3] @ offset + out[:3, 3]
    return out


def pad_to_shape(subject: tio.Subject, min_shape: tuple[int, int, int]) -> tio.Subject:
    """Pad every image of ``subject`` with zeros so that each axis is at least ``min_shape``.

    Padding is symmetric (the odd voxel at the end); affines are shifted so that world positions are
    unchanged. Returns ``subject`` itself when nothing needs padding, else a new subject sharing the
    non-image entries.
    """
    shape = np.asarray(subject.spatial_shape)
    deficit = np.maximum(np.asarray(min_shape) - shape, 0)
    if not deficit.any():
        return subject
    before = deficit // 2
    after = deficit - before
    pad = []
    for axis in (2, 1, 0):  # F.pad lists the last dimension first
        pad += [int(before[axis]), int(after[axis])]
    entries = {}
    for key, value in subject.items():
        if isinstance(value, tio.Image):
            data = F.pad(value.data, pad, mode="constant", value=0)
            entries[key] = type(value)(
                tensor=data, affine=_translated(value.affine, -before.astype(np.float64))
            )
        else:
            entries[key] = value
    return tio.Subject(entries)


def _crop(subject: tio.Subject, start: np.ndarray, size: np.ndarray) -> tio.Subject:
    stop = start + size
    window = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    entries = {}
    for key, value in subject.items():
        if isinstance(value, tio.Image):
            data = value.data[(slice(None), *window)].clone()
            entries[key] = type(value)(
                tensor=data, affine=_translated(value.affine, start.astype(np.float64))
            )
        else:
            entries[key] = value
    patch = tio.Subject(entries)
    patch[LOCATION] = torch.as_tensor([*start.tolist(), *stop.tolist()])
    return patch


class ForegroundOversamplingSampler(tio.data.sampler.RandomSampler):
    """Random patches, a fraction of them centred on foreground (see the module docstring).

    Args:
        patch_size: ``(w, h, d)`` in voxels (an int means a cube).
        foreground_probability: probability that a patch is centred on a foreground voxel.
        label_name: subject key of the label map.
        seed: seeds the sampler's own generator (used for subjects without :data:`SEED_KEY`); ``None``
            uses torch's global RNG for them.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int, int],
        foreground_probability: float = 1 / 3,
        label_name: str = "label",
        seed: int | None = None,
    ):
        super().__init__(patch_size)
        if not 0.0 <= foreground_probability <= 1.0:
            raise ValueError(f"foreground_probability must be in [0, 1], got {foreground_probability}")
        self.foreground_probability = float(foreground_probability)
        self.label_name = label_name
        self._generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def __call__(self, subject: tio.Subject, num_patches: int | None = None) -> Generator[tio.Subject]:
        """Yield patches (``num_patches`` of them, or forever when ``None``)."""
        subject.check_consistent_space()
        generator = self._generator
        seed = subject.get(SEED_KEY)
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed) & _MASK64)
            subject[SEED_KEY] = _next_seed(int(seed))
        padded = pad_to_shape(subject, tuple(int(v) for v in self.patch_size))
        return self._patches(padded, num_patches, generator)

    def _generate_patches(
        self, subject: tio.Subject, num_patches: int | None = None
    ) -> Generator[tio.Subject]:
        return self._patches(pad_to_shape(subject, tuple(int(v) for v in self.patch_size)), num_patches, None)

    def _foreground(self, subject: tio.Subject) -> tuple[torch.Tensor | None, list[int]]:
        image = subject.get(self.label_name)
        if not isinstance(image, tio.Image):
            return None, []
        label = image.data[0]
        if label.is_floating_point():
            label = label.round().long()
        counts = torch.bincount(label.reshape(-1).clamp_min(0))  # O(voxels), unlike torch.unique's sort
        classes = [int(c) for c in torch.nonzero(counts).reshape(-1).tolist() if c > 0]
        return label, classes

    def _patches(
        self, subject: tio.Subject, num_patches: int | None, generator: torch.Generator | None
    ) -> Generator[tio.Subject]:
        shape = np.asarray(subject.spatial_shape, dtype=np.int64)
        size = self.patch_size.astype(np.int64)
        valid = shape - size  # inclusive upper bound of the start, >= 0 after padding
        label, classes = self._foreground(subject)
        locations: dict[int, torch.Tensor] = {}
        produced = 0
        while num_patches is None or produced < num_patches:
            use_foreground = bool(classes) and (
                torch.rand(1, generator=generator).item() < self.foreground_probability
            )
            if use_foreground:
                assert label is not None
                cls = classes[int(torch.randint(len(classes), (1,), generator=generator).item())]
                if cls not in locations:
                    locations[cls] = torch.nonzero(label == cls)
                voxels = locations[cls]
                voxel = voxels[int(torch.randint(len(voxels), (1,), generator=generator).item())].numpy()
                start = np.clip(voxel - size // 2, 0, valid)
            else:
                start = np.array(
                    [int(torch.randint(int(v) + 1, (1,), generator=generator).item()) for v in valid],
                    dtype=np.int64,
                )
            yield _crop(subject, start, size)
            produced += 1
