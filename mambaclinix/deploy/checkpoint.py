"""The prediction metadata of a training run: collected when a checkpoint is saved, read when exported.

:func:`checkpoint_metadata` is called by the training module's ``on_save_checkpoint`` and stores under
:data:`~mambaclinix.deploy.metadata.CHECKPOINT_KEY` what :mod:`mambaclinix.deploy.metadata` describes,
read from the module's hyper-parameters, the data module's preprocessing plan and dataset description,
and the Trainer's progress and validation scores. :func:`read_checkpoint` returns it with the network's
weights. Lightning itself is not imported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mambaclinix.deploy.metadata import (
    CHECKPOINT_KEY,
    CROP_RULE,
    PackageError,
    check_metadata,
    library_versions,
    utc_now,
)
from mambaclinix.layers import MambaLayer

__all__ = ["checkpoint_metadata", "find_checkpoint", "read_checkpoint"]

REEXPORT_HINT = (
    "it was saved by an older mambaclinix. Continue its training for one step with this version "
    "(`mambaclinix fit -c CONFIG --ckpt_path CKPT --trainer.max_steps=<its steps + 1>`), which saves a "
    "checkpoint with the metadata, and export that one"
)


def checkpoint_metadata(module: Any, datamodule: Any | None, trainer: Any | None) -> dict[str, Any]:
    """The prediction metadata of a training run (see :mod:`mambaclinix.deploy.metadata`).

    Args:
        module: the ``SegmentationModule`` (its ``hparams``: ``net``, ``net_kwargs``, ``in_channels``,
            ``num_classes``, ``patch_size``, ``sw_batch_size``, ``sw_overlap``, ``mirror_tta``).
        datamodule: the ``SegmentationDataModule`` (its ``plan()``, channel and class names, file ending,
            dataset name and training cases).
        trainer: for the training steps and the validation Dice per class (``val/dice_<class>``).

    Raises:
        PackageError: the network is not a registered preset, or there is no data module to read the
            preprocessing plan from.
    """
    hp = module.hparams
    if not isinstance(hp.get("net"), str):
        raise PackageError(
            "the network was given as a module object; a model package records a registered preset "
            "(model.net=NAME with model.net_kwargs), so that loading it never imports other code"
        )
    if datamodule is None or not hasattr(datamodule, "plan"):
        raise PackageError("no SegmentationDataModule attached: the preprocessing plan is unknown")
    plan = datamodule.plan()
    info = getattr(datamodule, "_info", None)
    class_names = list(datamodule.class_names)
    channel_names = list(info.channel_names) if info is not None else ["unknown"] * int(hp.in_channels)
    pool = datamodule._cases()
    metrics = {} if trainer is None else dict(getattr(trainer, "callback_metrics", {}) or {})
    dice = {
        name: float(metrics[f"val/dice_{name}"]) for name in class_names[1:] if f"val/dice_{name}" in metrics
    }
    source = datamodule.data_dir if datamodule.data_dir is not None else datamodule.manifest
    kwargs = dict(hp.get("net_kwargs") or {})
    # the token order the Mamba layers were trained with (the module sets it from its array_axes)
    orders = {m.scan_order for m in module.net.modules() if isinstance(m, MambaLayer)}
    if len(orders) == 1:
        kwargs["mamba_scan_order"] = orders.pop()
    try:
        kwargs = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise PackageError(
            f"model.net_kwargs must hold plain values (numbers, strings, lists) to be exported ({err})"
        ) from err
    return {
        "network": {"name": hp.net, "kwargs": kwargs},
        "in_channels": int(hp.in_channels),
        "num_classes": int(hp.num_classes),
        "channel_names": channel_names,
        "labels": {name: value for value, name in enumerate(class_names)},
        "file_ending": None if info is None else info.file_ending,
        "plan": plan.to_json(),
        "crop": CROP_RULE,
        "patch_size": [int(p) for p in hp.patch_size],
        "sliding_window": {
            "batch_size": int(hp.sw_batch_size),
            "overlap": float(hp.sw_overlap),
            "mode": "gaussian",
            "sigma_scale": 0.125,
        },
        "mirror_axes": [0, 1, 2],
        "tta": bool(hp.mirror_tta),
        "versions": library_versions(),
        "card": {
            "dataset": (info.name if info is not None and info.name else Path(str(source)).name),
            "training_cases": len(pool["pool"]) + len(pool["val"]),
            "fold": getattr(datamodule, "fold", None),
            "training_steps": None if trainer is None else int(trainer.global_step),
            "validation_dice": dice,
            "date": utc_now(),
        },
    }


def find_checkpoint(source: str | Path) -> Path:
    """The checkpoint file of ``source``: the file itself, or ``checkpoints/last.ckpt`` of a run folder.

    Raises:
        PackageError: no such file, or a run folder without ``checkpoints/last.ckpt``.
    """
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise PackageError(f"{path}: run folder without checkpoints/last.ckpt; give the checkpoint file")
    raise PackageError(f"{path}: no such checkpoint file or run folder")


def read_checkpoint(source: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """``(metadata, network state dict, checkpoint path)`` of a checkpoint file or run folder.

    The checkpoint is read with ``torch.load(weights_only=False)`` (Lightning checkpoints hold more
    than tensors): export only checkpoints you trust. The package written from it loads without pickle.

    Raises:
        PackageError: unreadable file, no prediction metadata (an older checkpoint; the message says how to
            re-export), or metadata that is incomplete.
    """
    path = find_checkpoint(source)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise PackageError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise PackageError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    meta = ckpt.get(CHECKPOINT_KEY)
    if meta is None:
        raise PackageError(f"{path}: the checkpoint holds no prediction metadata: {REEXPORT_HINT}")
    if isinstance(meta, Mapping) and "error" in meta:
        raise PackageError(f"{path}: the checkpoint cannot be exported: {meta['error']}")
    meta = check_metadata(meta, f"{path} (prediction metadata)", package=False)
    state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not state:
        raise PackageError(f"{path}: the checkpoint's state_dict holds no network weights ('net.*')")
    card = dict(meta["card"])
    card.setdefault("training_steps", ckpt.get("global_step"))
    meta["card"] = card
    return meta, state, path
