"""``model.json``: everything a model package needs to predict, checked field by field when read.

A model package (:mod:`mambaclinix.deploy.package`) holds the network's weights (safetensors) and this
description: the network (a registered preset and its arguments), the preprocessing plan (target
spacing, normalisation scheme and per-channel statistics, crop rule, resampling orders), channel names,
class names with their label values, the dataset's file ending, the sliding-window settings, the allowed
mirror axes, the versions that trained it, and a model card (dataset, cases, training steps,
validation Dice per class, date). The same dictionary, without the fold list, is stored in every
checkpoint under :data:`CHECKPOINT_KEY` by the training module.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "PackageError",
    "check_metadata",
    "library_versions",
]

FORMAT = "mambaclinix-model"
FORMAT_VERSION = 1
"""Version of the ``model.json`` layout; a reader refuses versions it does not know."""

CHECKPOINT_KEY = "mambaclinix_deploy"
"""Key of the prediction metadata in a Lightning checkpoint."""

CROP_RULE = "nonzero"
"""The crop rule of the preprocessing: the bounding box of the voxels non-zero in any channel."""


_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a plain name inside the package, no path


class PackageError(ValueError):
    """A model package or checkpoint cannot be used; the message names the file and what is wrong."""


def library_versions() -> dict[str, str]:
    """The versions of mambaclinix and torch in this environment."""
    try:
        version = importlib.metadata.version("mambaclinix")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        version = "unknown"
    return {"mambaclinix": version, "torch": str(torch.__version__)}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "network": dict,
    "in_channels": int,
    "num_classes": int,
    "channel_names": list,
    "labels": dict,
    "file_ending": (str, type(None)),
    "plan": dict,
    "crop": str,
    "patch_size": list,
    "sliding_window": dict,
    "mirror_axes": list,
    "tta": bool,
    "versions": dict,
    "card": dict,
}


def check_metadata(data: Any, source: str, *, package: bool = True) -> dict[str, Any]:
    """Check a ``model.json`` (or a checkpoint's metadata with ``package=False``) and return it.

    Raises:
        PackageError: not a JSON object, another format or an unknown version, a missing or mistyped
            field, inconsistent counts (each names ``source`` and the field).
    """
    if not isinstance(data, Mapping):
        raise PackageError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if package:
        if data.get("format") != FORMAT:
            raise PackageError(f"{source}: not a mambaclinix model package (format {data.get('format')!r})")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise PackageError(
                f"{source}: model package format version {version!r} is not supported by this mambaclinix "
                f"(it reads version {FORMAT_VERSION}); install the mambaclinix version that wrote it "
                f"({(data.get('versions') or {}).get('mambaclinix', 'unknown')}) or re-export the model"
            )
    required = dict(_REQUIRED, **({"folds": list} if package else {}))
    for key, kind in required.items():
        if key not in data:
            raise PackageError(f"{source}: missing field {key!r}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise PackageError(f"{source}: field {key!r} has the wrong type ({type(data[key]).__name__})")
    net = data["network"]
    if not isinstance(net.get("name"), str) or not isinstance(net.get("kwargs", {}), dict):
        raise PackageError(f"{source}: field 'network' must hold a preset 'name' and its 'kwargs'")
    if data["in_channels"] < 1 or len(data["channel_names"]) != data["in_channels"]:
        raise PackageError(
            f"{source}: {len(data['channel_names'])} channel name(s) for in_channels={data['in_channels']}"
        )
    labels = data["labels"]
    values = sorted(labels.values()) if all(isinstance(v, int) for v in labels.values()) else None
    if values != list(range(data["num_classes"])):
        raise PackageError(
            f"{source}: field 'labels' must map one class name to each value 0..{data['num_classes'] - 1}, "
            f"got {labels}"
        )
    from mambaclinix.data.preprocessing import PreprocessingPlan  # TorchIO: only when a model is read

    try:
        plan = PreprocessingPlan.from_json(data["plan"])
    except (KeyError, TypeError, ValueError) as err:
        raise PackageError(f"{source}: field 'plan' is not a valid preprocessing plan ({err})") from err
    if plan.num_channels != data["in_channels"]:
        raise PackageError(
            f"{source}: the plan normalises {plan.num_channels} channel(s), not {data['in_channels']}"
        )
    if data["crop"] != CROP_RULE:
        raise PackageError(f"{source}: unknown crop rule {data['crop']!r} (this version knows {CROP_RULE!r})")
    patch = data["patch_size"]
    if len(patch) != 3 or not all(isinstance(p, int) and p > 0 for p in patch):
        raise PackageError(f"{source}: field 'patch_size' must be three positive ints, got {patch}")
    window = data["sliding_window"]
    if not isinstance(window.get("batch_size"), int) or not 0 <= float(window.get("overlap", -1)) < 1:
        raise PackageError(
            f"{source}: field 'sliding_window' needs 'batch_size' (int) and 'overlap' in [0, 1)"
        )
    if not all(a in (0, 1, 2) for a in data["mirror_axes"]):
        raise PackageError(f"{source}: field 'mirror_axes' must list spatial axes 0, 1, 2")
    if package:
        if not data["folds"]:
            raise PackageError(f"{source}: the package lists no weights (field 'folds' is empty)")
        numbers = [fold.get("fold") if isinstance(fold, dict) else None for fold in data["folds"]]
        if not all(isinstance(n, int) for n in numbers) or len(set(numbers)) != len(numbers):
            raise PackageError(f"{source}: every entry of 'folds' needs its own fold number, got {numbers}")
        for i, fold in enumerate(data["folds"]):
            if not isinstance(fold.get("weights"), str):
                raise PackageError(f"{source}: folds[{i}] must name its 'weights' file")
            for key in ("weights", "onnx"):
                name = fold.get(key)
                if name is not None and (not isinstance(name, str) or not _FILE_NAME.match(name)):
                    raise PackageError(
                        f"{source}: folds[{i}].{key} must be a file name in the package, got {name!r}"
                    )
            if not isinstance(fold.get("sha256"), str):
                raise PackageError(f"{source}: folds[{i}] must give the 'sha256' of its weights")
    return dict(data)
