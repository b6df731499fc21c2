"""Durable atomic writes: a file or a folder appears whole at its final path, or not at all.

Every file the library writes for a user (checkpoints, predictions, CSV tables, figures, the
preprocessing cache, plans, model packages) goes through this module, with one guarantee:

* **A file** is written to a hidden temporary file in the destination's folder
  (``.<name>.tmp-<random><suffix>``), flushed and ``fsync``-ed, renamed over the destination with
  ``os.replace`` (atomic on POSIX file systems), and then the folder itself is ``fsync``-ed so that the
  rename survives a power loss.
* **A folder** is filled under a hidden temporary name beside the destination, every file in it is
  ``fsync``-ed, and it is renamed into place (``os.rename``; an existing non-empty destination is either
  kept, ``replace=False``, or moved aside and deleted after the rename, ``replace=True``).

On any exception (``KeyboardInterrupt`` included) the temporary file or folder is removed and whatever
stood at the destination before is left untouched. A process killed outright (``SIGKILL``, power loss)
can leave a hidden temporary behind, never a partial destination.

The temporary file keeps the destination's suffix (``.nii.gz``, ``.png``, ``.npy``), because several
writers (nibabel, SimpleITK, matplotlib, numpy) choose the format from the file name. Where the suffix
would mislead a reader instead, ``suffix=""`` drops it: a checkpoint's temporary file must not end in
``.ckpt``, or a killed write's remains would look like a checkpoint to ``glob("*.ckpt")``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_path",
    "atomic_write",
    "fsync_directory",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for compound in _COMPOUND_SUFFIXES:
        if name.endswith(compound):
            return path.name[-len(compound) :]
    return path.suffix


def fsync_directory(path: str | os.PathLike) -> None:
    """``fsync`` a folder, so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path, tag: str = "tmp", suffix: str | None = None) -> Path:
    suffix = _suffix(path) if suffix is None else suffix
    return path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder for a writer that wants a file name (``np.save``,
    ``fig.savefig``, ``nib.save``, ``torch.save``); on success it is ``fsync``-ed and renamed to ``path``.

    ``suffix`` is the temporary file's suffix: ``None`` (default) keeps ``path``'s (``.nii.gz``, ``.png``)
    for writers that choose the format from the name; ``""`` drops it.

    Example::

        with atomic_path(out / "slices.png") as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, suffix=suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer did not create {tmp} (destination {path})")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "w",
    newline: str | None = None,
    encoding: str | None = None,
    suffix: str | None = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"w"`` or ``"wb"``); on success it is flushed,
    ``fsync``-ed and renamed to ``path``. ``suffix``: as in :func:`atomic_path`.

    Example::

        with atomic_write(out / "test_metrics.csv", newline="") as f:
            csv.writer(f).writerows(rows)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, suffix) as tmp, open(tmp, mode, newline=newline, encoding=encoding) as handle:
        yield handle
        handle.flush()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably; returns ``path``."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably; returns ``path``."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and durably; returns ``path``."""
    return write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_directory(folder)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    replace: bool = False,
    exists_ok: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success its files are ``fsync``-ed and it is
    renamed to ``path``.

    Args:
        path: the destination folder.
        replace: an existing ``path`` is moved aside, the new folder renamed into place, then the old one
            deleted. Without it ``path`` must be absent or empty, else ``FileExistsError`` (checked again
            at the rename, for concurrent writers).
        exists_ok: called with ``path`` when the rename finds it already filled (a concurrent writer
            finished first); returning ``True`` keeps that folder and discards ours instead of raising.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if replace and (path.exists() or path.is_symlink()):
            if path.is_symlink() or not path.is_dir():
                path.unlink()
                os.rename(tmp, path)
            else:
                trash = _temporary_name(path, "old")
                os.rename(path, trash)
                os.rename(tmp, path)
                shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                os.rename(tmp, path)  # refuses a non-empty folder
            except OSError as err:
                if exists_ok is not None and path.exists() and exists_ok(path):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                raise FileExistsError(f"{path} exists and is not empty; not replacing it") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
