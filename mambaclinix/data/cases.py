"""Cases and their image files: the :class:`Case` record, file naming and finding images in folders.

* **Input formats** (read by TorchIO: SimpleITK, with nibabel as fallback): :data:`INPUT_EXTENSIONS`;
  :func:`split_extension` splits a file name at a supported extension (``.nii.gz`` is one extension).
* **Channel files** follow nnU-Net v2's naming: ``CASE_0000<ext>``, ``CASE_0001<ext>``… for channels 0,
  1…; a file without that suffix holds every channel of its case (MSD 4D NIfTI). The case name of a
  single file is its name without extension and without a trailing ``_0000``.
* Files whose name starts with ``.`` (e.g. macOS ``._`` resource forks shipped in MSD archives) are
  ignored when listing folders.

:func:`find_images` turns a folder or a list of files into cases (prediction inputs);
:mod:`mambaclinix.data.datasets` reads whole datasets (``dataset.json`` layouts, CSV manifests). This
module only lists folders; images are opened by :mod:`mambaclinix.data.loading`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "INPUT_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "Case",
    "DatasetError",
    "find_images",
    "split_extension",
]

INPUT_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
"""Image file extensions read everywhere in :mod:`mambaclinix.data` (longest first). The formats
predictions are written in are :data:`mambaclinix.inference.OUTPUT_EXTENSIONS`."""

SUPPORTED_EXTENSIONS = INPUT_EXTENSIONS
"""Former name of :data:`INPUT_EXTENSIONS`, kept as an alias."""

CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
"""A file stem ending in a 4-digit channel index (nnU-Net v2: ``CASE_0000``)."""


class DatasetError(ValueError):
    """A dataset on disk does not have the expected layout; the message names the file or case."""


@dataclass(frozen=True)
class Case:
    """One case of a dataset.

    Attributes:
        name: case identifier (unique within a dataset).
        image_paths: one file per channel (nnU-Net v2 / ``image_0…`` columns), or a single file that may
            hold several channels (MSD 4D NIfTI).
        label_path: the label map, ``None`` when there is none (prediction-only images).
        split: the manifest's ``split`` value (``"train"``, ``"val"``, ``"test"``), ``None`` when not
            given (always ``None`` for the Decathlon layout, where the folder decides).
    """

    name: str
    image_paths: tuple[Path, ...]
    label_path: Path | None = None
    split: str | None = field(default=None, compare=False)


def split_extension(path: str | Path) -> tuple[str, str] | None:
    """Split a file name into (stem, extension) for a supported extension, else ``None``.

    >>> split_extension("case_0000.nii.gz")
    ('case_0000', '.nii.gz')
    """
    name = Path(path).name
    lower = name.lower()
    for ext in INPUT_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext) :]
    return None


def case_name(image: Path) -> str:
    """The case name of a single image file: its name without extension and without a trailing ``_0000``.

    Raises:
        DatasetError: the file's extension is not in :data:`INPUT_EXTENSIONS`.
    """
    parts = split_extension(image)
    if parts is None:
        raise DatasetError(f"{image}: unsupported file type; expected one of {INPUT_EXTENSIONS}")
    match = CHANNEL_RE.match(parts[0])
    return match["case"] if match is not None and match["channel"] == "0000" else parts[0]


def visible_files(folder: Path) -> list[Path]:
    """The files of ``folder`` whose name does not start with ``.``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def group_channel_files(
    files: Iterable[Path], folder: Path, num_channels: int | None, file_ending: str | None
) -> dict[str, tuple[Path, ...]]:
    """Group ``CASE_0000<ext>`` files by case; every case must have channels 0..n-1.

    Args:
        files: candidate files (those without a supported extension, or another than ``file_ending``,
            are skipped).
        folder: where they were found (for messages).
        num_channels: channel files per case; ``None``: the most any case has.
        file_ending: the only extension accepted (nnU-Net v2's ``file_ending``), ``None``: any.

    Returns:
        Case name → its channel files in channel order, sorted by case name.
    """
    groups: dict[str, dict[int, Path]] = {}
    for path in files:
        parts = split_extension(path)
        if parts is None or (file_ending is not None and parts[1].lower() != file_ending.lower()):
            continue
        match = CHANNEL_RE.match(parts[0])
        if match is None:
            raise DatasetError(
                f"{path}: image file name must end with a 4-digit channel index, e.g. CASE_0000{parts[1]}"
            )
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
    if not groups:
        raise DatasetError(f"{folder}: no images found (expected CASE_0000{file_ending or '.nii.gz'} files)")
    counts = {name: len(ch) for name, ch in groups.items()}
    expected = num_channels if num_channels is not None else max(counts.values())
    result: dict[str, tuple[Path, ...]] = {}
    for name in sorted(groups):
        channels = groups[name]
        if sorted(channels) != list(range(expected)):
            raise DatasetError(
                f"case '{name}' in {folder}: mixed channel counts: found channels {sorted(channels)}, "
                f"expected {list(range(expected))} ({expected} channel file(s) per case)"
            )
        result[name] = tuple(channels[i] for i in range(expected))
    return result


def check_unique(cases: Sequence[Case], source: Path) -> None:
    """Raise :class:`DatasetError` naming ``source`` when two cases share a name."""
    seen: dict[str, Case] = {}
    for case in cases:
        if case.name in seen:
            raise DatasetError(
                f"{source}: two cases are named '{case.name}' ({seen[case.name].image_paths[0]} and "
                f"{case.image_paths[0]}); case names must be unique"
            )
        seen[case.name] = case


def find_images(
    source: str | Path | Sequence[str | Path],
    num_channels: int | None = None,
    per_channel_files: bool | None = None,
) -> list[Case]:
    """Cases (without labels) from a folder of images or a list of image files, e.g. for prediction.

    Args:
        source: a folder (its visible files with a supported extension) or a list of files.
        num_channels: expected channel files per case when ``per_channel_files``.
        per_channel_files: ``True``: files are ``CASE_0000<ext>``, ``CASE_0001<ext>``… and are grouped
            by case (nnU-Net v2), except that with ``num_channels=1`` a file without the channel index
            is a case of its own (``brain1.nrrd``); ``False``: every file is one case (possibly a 4D
            multi-channel file);
            ``None``: group only if every file ends in a 4-digit channel index and grouping gives every
            case the channels 0..n-1 (or ``num_channels`` of them), otherwise one file per case.

    Raises:
        DatasetError: missing folder or file (named), unsupported file type, bad channel grouping.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            if folder.is_file():
                files = [folder]
                folder = folder.parent
            else:
                raise DatasetError(f"{folder}: folder or image file to predict does not exist")
        else:
            files = [p for p in visible_files(folder) if split_extension(p) is not None]
            if not files:
                raise DatasetError(f"{folder}: no images with a supported extension {INPUT_EXTENSIONS}")
    else:
        files = [Path(p) for p in source]
        if not files:
            raise DatasetError("find_images: the list of images is empty")
        for p in files:
            if not p.is_file():
                raise DatasetError(f"{p}: image file to predict does not exist")
            if split_extension(p) is None:
                raise DatasetError(f"{p}: unsupported file type; expected one of {INPUT_EXTENSIONS}")
        folder = files[0].parent
    if per_channel_files is None:
        stems = [split_extension(p)[0] for p in files]  # type: ignore[index]
        per_channel_files = all(CHANNEL_RE.match(s) for s in stems)
        if per_channel_files:
            try:
                group_channel_files(files, folder, num_channels, None)
            except DatasetError:
                per_channel_files = False
    if per_channel_files:
        plain: list[Path] = []
        if num_channels == 1:  # single-channel data may also be named one file per case (brain1.nrrd)
            plain = [p for p in files if CHANNEL_RE.match(split_extension(p)[0]) is None]  # type: ignore[index]
            files = [p for p in files if p not in plain]
        groups = group_channel_files(files, folder, num_channels, None) if files else {}
        cases = [Case(name, paths) for name, paths in groups.items()]
        cases += [Case(case_name(p), (p,)) for p in plain]
    else:
        cases = [Case(case_name(p), (p,)) for p in files]
    check_unique(cases, folder)
    return sorted(cases, key=lambda c: c.name)
