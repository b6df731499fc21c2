"""Reading segmentation datasets: the Decathlon / nnU-Net raw layout and CSV manifests.

Two sources are understood; both give a list of :class:`Case` (name, image file(s), label file or
``None``), validated early: every error names the offending file (or case, or key) and says what was
expected.

**Medical Segmentation Decathlon / nnU-Net raw layout** (:func:`read_decathlon`)::

    data_dir/
        dataset.json
        imagesTr/  labelsTr/  imagesTs/  [labelsTs/]

``dataset.json`` comes in two flavours, told apart by their keys:

* **nnU-Net v2**: ``channel_names`` (``{"0": "CT", ...}``), ``labels`` (name → int, ``background: 0``),
  ``file_ending`` (e.g. ``".nii.gz"``). Images are one file per channel, ``CASE_0000<ending>``,
  ``CASE_0001<ending>``…; labels ``labelsTr/CASE<ending>``. Cases are found by listing ``imagesTr``.
* **MSD** (also nnU-Net v1): ``modality`` (``{"0": "CT"}``), ``labels`` (int string → name) and
  ``training``: a list of ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``. A
  multi-channel image is one 4D file. nnU-Net v1 converted tasks list ``x.nii.gz`` but store
  ``x_0000.nii.gz``, ``x_0001.nii.gz``…: those channel files are used when the listed file is absent.

Test images are read from ``imagesTs`` (MSD: the ``test`` list when present); when ``labelsTs/`` exists
every test image needs its label there.

**CSV manifest** (:func:`read_manifest`): a header row with ``image`` (or ``image_0``, ``image_1``, … for
one file per channel), optional ``label``, optional ``split`` (``train``/``val``/``test``, empty =
unassigned) and optional ``name``; paths are relative to the CSV's folder (absolute paths also work).
Without a ``name`` column the case name is the first image's file name without extension and without a
trailing ``_0000``.

**Training pool.** :func:`read_cases` sorts a dataset's cases by role, with one rule for every user
(the data module, the planner): the labelled training pool is ``imagesTr`` + ``labelsTr``, or the
manifest rows with a label and split ``train`` or empty.

Input formats, file naming and :func:`find_images` are in :mod:`mambaclinix.data.cases` (re-exported
here). This module reads only JSON/CSV and directory listings; images are opened by
:mod:`mambaclinix.data.loading`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from mambaclinix.data.cases import (
    INPUT_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    Case,
    DatasetError,
    case_name,
    check_unique,
    find_images,
    group_channel_files,
    split_extension,
    visible_files,
)

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "Case",
    "CaseLists",
    "DatasetError",
    "DatasetInfo",
    "find_images",
    "read_cases",
    "read_dataset_info",
    "read_dataset_json",
    "read_decathlon",
    "read_manifest",
    "split_extension",
]

SPLITS = ("train", "val", "test")
TRAINING_SPLITS = (None, "train")
"""Manifest ``split`` values of the training pool (with a label): ``train`` or empty."""


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` says about channels and classes.

    Attributes:
        channel_names: modality of each channel (``"CT"``, ``"T2"``, …), in channel order.
        labels: label value → class name, always including 0 (``"background"`` when unnamed).
        file_ending: image file extension (nnU-Net v2), ``None`` for MSD.
        layout: ``"nnunetv2"`` or ``"msd"``.
        name: the dataset's ``name`` entry, if any.
    """

    channel_names: tuple[str, ...]
    labels: dict[int, str]
    file_ending: str | None = None
    layout: str = "nnunetv2"
    name: str | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of classes including background: the largest label value + 1."""
        return max(self.labels) + 1

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by label value (unlisted values are called ``class_<v>``)."""
        return [self.labels.get(v, f"class_{v}") for v in range(self.num_classes)]


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found (expected the Decathlon / nnU-Net raw layout)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _require(data: dict, key: str, path: Path, layout: str, kind: type | tuple[type, ...]):
    if key not in data:
        raise DatasetError(f"{path}: missing key '{key}' (required in the {layout} dataset.json)")
    value = data[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"{path}: key '{key}' must be a {names}, got {type(value).__name__}")
    return value


def _channel_names(mapping: dict, path: Path, key: str) -> tuple[str, ...]:
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: '{key}' keys must be channel indices '0', '1', …") from err
    if sorted(indexed) != list(range(len(indexed))) or not indexed:
        raise DatasetError(f"{path}: '{key}' must list channels 0..n-1, got {sorted(indexed)}")
    return tuple(indexed[i] for i in range(len(indexed)))


def read_dataset_json(data_dir: str | Path) -> DatasetInfo:
    """Parse ``data_dir/dataset.json`` (nnU-Net v2 or MSD flavour, see the module docstring).

    Raises:
        DatasetError: missing file, invalid JSON, a missing or mistyped key (named), region-based or
            ``ignore`` labels (not supported), non-integer label values.
    """
    path = Path(data_dir) / "dataset.json"
    return _parse_dataset_json(_load_json(path), path)


def _parse_dataset_json(data: dict, path: Path) -> DatasetInfo:
    if "channel_names" in data:
        layout = "nnunetv2"
        channels = _channel_names(_require(data, "channel_names", path, layout, dict), path, "channel_names")
        raw_labels = _require(data, "labels", path, layout, dict)
        file_ending = _require(data, "file_ending", path, layout, str)
        if file_ending.lower() not in INPUT_EXTENSIONS:
            raise DatasetError(
                f"{path}: file_ending '{file_ending}' is not supported; expected one of {INPUT_EXTENSIONS}"
            )
        labels: dict[int, str] = {}
        for name, value in raw_labels.items():
            if name == "ignore":
                raise DatasetError(f"{path}: the nnU-Net 'ignore' label is not supported")
            if isinstance(value, (list, tuple)):
                raise DatasetError(f"{path}: label '{name}' is region-based ({value}); not supported")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DatasetError(f"{path}: label '{name}' must map to a non-negative int, got {value!r}")
            if value in labels:
                raise DatasetError(f"{path}: labels '{labels[value]}' and '{name}' share the value {value}")
            labels[value] = str(name)
    elif "modality" in data:
        layout = "msd"
        channels = _channel_names(_require(data, "modality", path, layout, dict), path, "modality")
        raw_labels = _require(data, "labels", path, layout, dict)
        _require(data, "training", path, layout, list)
        file_ending = None
        labels = {}
        for key, name in raw_labels.items():
            try:
                value = int(key)
            except ValueError as err:
                raise DatasetError(f"{path}: MSD 'labels' keys must be integers, got '{key}'") from err
            if value < 0:
                raise DatasetError(f"{path}: label value {value} is negative")
            labels[value] = str(name)
    else:
        raise DatasetError(
            f"{path}: missing key 'channel_names' (nnU-Net v2) or 'modality' (MSD); one of them is required"
        )
    labels.setdefault(0, "background")
    return DatasetInfo(
        channel_names=channels,
        labels=dict(sorted(labels.items())),
        file_ending=file_ending,
        layout=layout,
        name=data.get("name"),
    )


def _label_for(case: str, label_dir: Path, ending: str, image: Path, check: bool = True) -> Path:
    label = label_dir / f"{case}{ending}"
    if check and not label.is_file():
        raise DatasetError(f"case '{case}': image {image} has no label; expected {label}")
    return label


def _resolve_listed(data_dir: Path, entry: object, what: str, where: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DatasetError(f"{where}: '{what}' must be a non-empty path string, got {entry!r}")
    path = Path(entry)
    return path if path.is_absolute() else (data_dir / path)


def _msd_image_files(image: Path, where: str) -> tuple[Path, ...]:
    if image.is_file():
        return (image,)
    parts = split_extension(image)
    if parts is not None:  # nnU-Net v1 conversion: x.nii.gz listed, x_0000.nii.gz stored
        stem, ext = parts
        channels = []
        while (candidate := image.with_name(f"{stem}_{len(channels):04d}{ext}")).is_file():
            channels.append(candidate)
        if channels:
            return tuple(channels)
    raise DatasetError(f"{where}: listed image file does not exist: {image}")


def read_decathlon(data_dir: str | Path, subset: str = "train", *, check_labels: bool = True) -> list[Case]:
    """List the cases of a Decathlon / nnU-Net raw dataset.

    Args:
        data_dir: folder holding ``dataset.json``.
        subset: ``"train"`` (``imagesTr`` + ``labelsTr``, every image needs its label) or ``"test"``
            (``imagesTs``, with labels from ``labelsTs`` when that folder exists; empty list when there is
            no ``imagesTs``).
        check_labels: raise when a label file is missing. ``False`` keeps the expected label path in the
            case, so that :func:`~mambaclinix.data.validation.validate_cases` reports the missing label
            together with every other problem.

    Returns:
        Cases sorted by name.

    Raises:
        DatasetError: see :func:`read_dataset_json`; a listed file that does not exist; an image without
            its label; a case whose channel count differs from ``dataset.json``'s.
    """
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
    root = Path(data_dir)
    json_path = root / "dataset.json"
    data = _load_json(json_path)
    info = _parse_dataset_json(data, json_path)
    image_dir = root / ("imagesTr" if subset == "train" else "imagesTs")
    label_dir = root / ("labelsTr" if subset == "train" else "labelsTs")
    need_labels = subset == "train" or label_dir.is_dir()
    if subset == "train" and not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: folder not found (expected training images next to {json_path})")
    if subset == "train" and not label_dir.is_dir():
        raise DatasetError(f"{label_dir}: folder not found (expected training labels next to {json_path})")

    cases: list[Case] = []
    if info.layout == "nnunetv2":
        if not image_dir.is_dir():
            return []
        ending = info.file_ending
        assert ending is not None
        groups = group_channel_files(visible_files(image_dir), image_dir, info.num_channels, ending)
        for name, paths in groups.items():
            label = _label_for(name, label_dir, ending, paths[0], check_labels) if need_labels else None
            cases.append(Case(name, paths, label))
    else:
        if subset == "train":
            for i, entry in enumerate(data["training"]):
                where = f"{json_path}: training[{i}]"
                if not isinstance(entry, dict) or "image" not in entry:
                    raise DatasetError(f"{where}: missing key 'image'")
                image = _resolve_listed(root, entry["image"], "image", where)
                name = case_name(image)
                if "label" not in entry or entry["label"] in (None, ""):
                    raise DatasetError(f"case '{name}' ({where}): image {image} has no label")
                label = _resolve_listed(root, entry["label"], "label", where)
                if check_labels and not label.is_file():
                    raise DatasetError(f"case '{name}' ({where}): listed label file does not exist: {label}")
                cases.append(Case(name, _msd_image_files(image, where), label))
        else:
            listed = data.get("test")
            if isinstance(listed, list) and listed:
                images = []
                for i, entry in enumerate(listed):
                    raw = entry.get("image") if isinstance(entry, dict) else entry
                    images.append(_resolve_listed(root, raw, "image", f"{json_path}: test[{i}]"))
            elif image_dir.is_dir():
                images = [p for p in visible_files(image_dir) if split_extension(p) is not None]
            else:
                return []
            for image in images:
                name = case_name(image)
                files = _msd_image_files(image, f"{json_path}: test case '{name}'")
                ext = split_extension(image)[1]  # type: ignore[index]
                label = _label_for(name, label_dir, ext, image, check_labels) if need_labels else None
                cases.append(Case(name, files, label))
        _check_channel_files(cases, info.num_channels)

    if subset == "train":
        listed = data.get("numTraining")
        if isinstance(listed, int) and listed != len(cases):
            logger.warning(
                "%s: numTraining is %d but %d training cases were found", json_path, listed, len(cases)
            )
        if label_dir.is_dir():
            names = {c.name for c in cases}
            ending = info.file_ending
            for label in visible_files(label_dir):
                parts = split_extension(label)
                if parts is not None and (ending is None or parts[1] == ending) and parts[0] not in names:
                    logger.warning("%s: label without an image in %s (ignored)", label, image_dir)
    check_unique(cases, json_path)
    return sorted(cases, key=lambda c: c.name)


def _check_channel_files(cases: Sequence[Case], num_channels: int) -> None:
    """MSD: per-channel files (v1 conversion) must number ``num_channels``; one 4D file is checked later."""
    for case in cases:
        if len(case.image_paths) > 1 and len(case.image_paths) != num_channels:
            raise DatasetError(
                f"case '{case.name}': mixed channel counts: {len(case.image_paths)} channel files, "
                f"dataset.json lists {num_channels} channel(s)"
            )


def read_manifest(manifest: str | Path, *, check_labels: bool = True) -> list[Case]:
    """Read a CSV manifest (see the module docstring for the columns).

    ``check_labels=False`` keeps a label path whose file does not exist (see :func:`read_decathlon`).

    Returns:
        Cases in file order, with ``split`` set from the ``split`` column (``None`` when absent/empty).

    Raises:
        DatasetError: missing file or columns, a missing image cell, an image or label file that does not
            exist (named, with the row), an unknown split value, a ``train``/``val`` row without a label,
            rows with different channel counts, duplicate case names.
    """
    path = Path(manifest)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest CSV not found")
    base = path.parent
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if "image" in header and "image_0" in header:
        raise DatasetError(f"{path}: use either an 'image' column or 'image_0', 'image_1', …, not both")
    if "image" in header:
        image_columns = ["image"]
    else:
        image_columns = []
        while f"image_{len(image_columns)}" in header:
            image_columns.append(f"image_{len(image_columns)}")
        if not image_columns:
            raise DatasetError(
                f"{path}: missing column 'image' (or 'image_0', 'image_1', …); found columns {header}"
            )
        extra = sorted(h for h in header if h.startswith("image_") and h not in image_columns)
        if extra:
            raise DatasetError(f"{path}: image columns must be consecutive from image_0; unexpected {extra}")
    if not rows:
        raise DatasetError(f"{path}: the manifest has no rows")

    def resolve(cell: str, what: str, row_no: int) -> Path:
        p = Path(cell)
        p = p if p.is_absolute() else base / p
        if not p.is_file() and (check_labels or what != "label"):
            raise DatasetError(f"{path}, row {row_no}: {what} file does not exist: {p}")
        if split_extension(p) is None:
            raise DatasetError(
                f"{path}, row {row_no}: {what} file {p} has an unsupported type; expected {INPUT_EXTENSIONS}"
            )
        return p

    cases: list[Case] = []
    num_files: dict[str, int] = {}
    for row_no, row in enumerate(rows, start=2):  # row 1 is the header
        cells = [row.get(c, "") for c in image_columns]
        if not cells[0]:
            raise DatasetError(f"{path}, row {row_no}: empty '{image_columns[0]}' cell")
        present = [c for c in cells if c]
        images = tuple(resolve(c, "image", row_no) for c in present)
        name = row.get("name") or row.get("case") or case_name(images[0])
        if len(present) != len(cells):
            raise DatasetError(
                f"case '{name}' ({path}, row {row_no}): mixed channel counts: {len(present)} image file(s), "
                f"the manifest has {len(cells)} image column(s)"
            )
        num_files[name] = len(images)
        split = row.get("split", "").lower() or None
        if split is not None and split not in SPLITS:
            raise DatasetError(f"{path}, row {row_no}: split must be one of {SPLITS} or empty, got '{split}'")
        label = resolve(row["label"], "label", row_no) if row.get("label") else None
        if label is None and split in ("train", "val"):
            raise DatasetError(
                f"case '{name}' ({path}, row {row_no}): split '{split}' needs a label, none given"
            )
        cases.append(Case(name, images, label, split))
    check_unique(cases, path)
    return cases


def read_dataset_info(
    data_dir: str | Path | None = None, manifest: str | Path | None = None
) -> DatasetInfo | None:
    """``dataset.json`` of a Decathlon folder, or the one beside a manifest (``None`` when there is none).

    Raises:
        DatasetError: see :func:`read_dataset_json`.
    """
    source = _one_source(data_dir, manifest)
    if data_dir is not None:
        return read_dataset_json(data_dir)
    return read_dataset_json(source.parent) if (source.parent / "dataset.json").is_file() else None


class CaseLists(NamedTuple):
    """A dataset's cases by role (:func:`read_cases`)."""

    train: list[Case]
    """The labelled training pool: ``imagesTr`` + ``labelsTr``, or manifest rows with a label and split
    ``train`` or empty."""
    val: list[Case]
    """Manifest rows with split ``val`` (always empty for a Decathlon folder)."""
    test: list[Case]
    """``imagesTs`` (+ ``labelsTs``), or manifest rows with split ``test``."""
    unlabelled: list[Case]
    """Manifest rows with neither split nor label (always empty for a Decathlon folder)."""


def read_cases(
    data_dir: str | Path | None = None,
    manifest: str | Path | None = None,
    *,
    test: bool = True,
    check_labels: bool = True,
) -> CaseLists:
    """Read a Decathlon / nnU-Net raw folder or a CSV manifest and sort its cases by role.

    Args:
        data_dir: folder holding ``dataset.json`` (exactly one of ``data_dir`` and ``manifest``).
        manifest: CSV manifest.
        test: list the test cases of ``data_dir`` (``imagesTs``); ``False`` leaves ``test`` empty and
            does not look at ``imagesTs``/``labelsTs``. A manifest is read whole either way.
        check_labels: see :func:`read_decathlon`.

    Raises:
        ValueError: both or neither of ``data_dir`` and ``manifest``.
        DatasetError: see :func:`read_decathlon` and :func:`read_manifest`; no labelled training case.
    """
    source = _one_source(data_dir, manifest)
    if data_dir is not None:
        train = read_decathlon(data_dir, "train", check_labels=check_labels)
        tests = read_decathlon(data_dir, "test", check_labels=check_labels) if test else []
        lists = CaseLists(train, [], tests, [])
    else:
        rows = read_manifest(source, check_labels=check_labels)
        lists = CaseLists(
            train=[c for c in rows if c.label_path is not None and c.split in TRAINING_SPLITS],
            val=[c for c in rows if c.split == "val"],
            test=[c for c in rows if c.split == "test"],
            unlabelled=[c for c in rows if c.split is None and c.label_path is None],
        )
    if not lists.train:
        raise DatasetError(f"{source}: no labelled training cases")
    return lists


def _one_source(data_dir: str | Path | None, manifest: str | Path | None) -> Path:
    if (data_dir is None) == (manifest is None):
        raise ValueError("give exactly one of data_dir (Decathlon / nnU-Net layout) and manifest (CSV)")
    return Path(data_dir if data_dir is not None else manifest)  # type: ignore[arg-type]
