"""The on-disk preprocessing cache: its keys and the format of its entries (``docs/data.md``).

Results go to ``<cache_root>/<plan key>/<case key>/`` as ``image.npy`` (float32 ``(C, W', H', D')``),
``label.npy`` (``(1, W', H', D')``, uint8, or int16/int32 for more classes) and ``meta.json`` (the
metadata listed in :mod:`mambaclinix.data.preprocessing`). The plan key
(:attr:`~mambaclinix.data.preprocessing.PreprocessingPlan.key`) hashes every preprocessing parameter
after resolution (target spacing, normalisation per channel, CT statistics, interpolations,
:data:`CACHE_VERSION`); the CT statistics and median spacing themselves are cached in
``<cache_root>/fingerprint-<key>.json`` (:mod:`mambaclinix.data.fingerprint`), keyed by the training
files. The case key (:func:`case_key`) hashes the case name and the path, size and modification time
of each source file, so an edited file is preprocessed again while the rest of the cache is reused.

Every entry is filled in a temporary folder, ``fsync``-ed and renamed into place
(:func:`write_entry`, through :func:`mambaclinix.utils.atomic_directory`): a crashed or concurrent run
never leaves a half-written entry, and a second run reads instead of recomputing (when two processes
fill the same entry, the first rename wins and the other discards its copy). Stale entries are not
deleted. :func:`mambaclinix.data.preprocessing.preprocess_to_cache` fills the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mambaclinix.data.cases import Case, DatasetError
from mambaclinix.utils.atomic import atomic_directory

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_VERSION",
    "CachedCase",
    "case_key",
    "case_signature",
    "default_cache_root",
    "is_entry",
    "load_entry",
    "meta_from_json",
    "read_cached_array",
    "stable_hash",
    "write_entry",
]

CACHE_VERSION = 1
"""Part of every plan and fingerprint key: raising it invalidates every cache entry."""


@dataclass(frozen=True)
class CachedCase:
    """A preprocessed case on disk.

    Attributes:
        name: case name.
        directory: the entry's folder.
        image_path: ``image.npy``.
        label_path: ``label.npy`` or ``None``.
        meta: metadata as loaded by :func:`meta_from_json`.
        from_cache: ``True`` when the entry existed before this call (nothing was recomputed).
    """

    name: str
    directory: Path
    image_path: Path
    label_path: Path | None
    meta: dict[str, Any]
    from_cache: bool


def stable_hash(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted-key JSON (the same in every process and run)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def case_signature(case: Case) -> list:
    """Name, and absolute path, size and mtime (ns) of every source file of a case."""
    files = [*case.image_paths, *([case.label_path] if case.label_path is not None else [])]
    sig: list = [case.name]
    for path in files:
        try:
            st = Path(path).stat()
        except FileNotFoundError as err:
            raise DatasetError(f"case '{case.name}': file does not exist: {path}") from err
        sig.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return sig


def case_key(case: Case) -> str:
    """Folder name of a case's cache entry: a readable prefix of the name plus a hash of its files."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case.name)[:64]
    return f"{safe}-{stable_hash(case_signature(case))}"


def default_cache_root(base: Path) -> Path:
    """``base/.mambaclinix_cache``, or ``$XDG_CACHE_HOME/mambaclinix/<hash of base>`` (default
    ``~/.cache``) when ``base`` is not writable; created if needed."""
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


def meta_from_json(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as stored in ``meta.json`` → affines as float64 ``(4, 4)`` arrays, shapes and spacings as
    tuples, ``crop_bbox`` as a tuple of ``(start, stop)``."""
    out = dict(meta)
    for key in ("original_affine", "cropped_affine", "preprocessed_affine"):
        out[key] = np.asarray(meta[key], dtype=np.float64)
    for key in ("original_shape", "cropped_shape", "preprocessed_shape", "classes_present"):
        out[key] = tuple(int(v) for v in meta[key])
    for key in ("original_spacing", "spacing"):
        out[key] = tuple(float(v) for v in meta[key])
    out["crop_bbox"] = tuple((int(a), int(b)) for a, b in meta["crop_bbox"])
    out["normalization"] = tuple(meta["normalization"])
    out["image_paths"] = [str(p) for p in meta["image_paths"]]
    return out


def read_cached_array(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO ``reader`` for cache entries: the ``.npy`` array and the preprocessed affine from the
    ``meta.json`` beside it."""
    path = Path(path)
    try:
        array = np.load(path)
        affine = np.asarray(json.loads((path.parent / "meta.json").read_text())["preprocessed_affine"])
    except Exception as err:  # truncated/corrupt .npy or meta.json, file removed under a running job
        raise DatasetError(
            f"preprocessed case {path.parent.name}: cannot read {path} ({type(err).__name__}: {err}); "
            f"delete the folder {path.parent} to have the case preprocessed again"
        ) from err
    return torch.from_numpy(array), affine


def is_entry(directory: Path) -> bool:
    """Whether ``directory`` holds a complete cache entry (its ``meta.json``, written last, exists)."""
    return (directory / "meta.json").is_file()


def load_entry(case: Case, directory: Path, from_cache: bool) -> CachedCase:
    """The :class:`CachedCase` of ``case`` stored in ``directory``."""
    meta = meta_from_json(json.loads((directory / "meta.json").read_text()))
    label = directory / "label.npy"
    return CachedCase(
        case.name, directory, directory / "image.npy", label if label.is_file() else None, meta, from_cache
    )


def write_entry(
    directory: str | Path, image: np.ndarray, label: np.ndarray | None, meta: Mapping[str, Any]
) -> None:
    """Store a preprocessed case in ``directory`` atomically and durably; a complete entry a concurrent
    writer put there first is kept (and this one discarded)."""
    with atomic_directory(directory, exists_ok=is_entry) as tmp:
        np.save(tmp / "image.npy", image)
        if label is not None:
            np.save(tmp / "label.npy", label)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
