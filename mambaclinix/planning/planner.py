"""The dataset planner: fingerprint → spacing, patch, batch, topology; a plan and a LightningCLI config.

``plan_dataset`` does, in order (``docs/planning.md`` explains each rule):

1. **Read and check** the dataset (Decathlon / nnU-Net raw layout or CSV manifest): every file of every
   training case is checked by :func:`mambaclinix.data.validation.validate_cases` (missing or unreadable
   files, label/image shape or affine mismatch, label values outside ``dataset.json``'s classes, mixed
   channel counts, …); the first problem found raises :class:`~mambaclinix.data.datasets.DatasetError`
   naming the case.
2. **Fingerprint** (:func:`mambaclinix.data.fingerprint.compute_fingerprint` with ``full=True``, the one
   fingerprint the preprocessing also uses): spacings, shapes, shapes after cropping to the non-zero
   region, per-channel foreground intensity statistics, voxels per class; modalities from
   ``dataset.json``.
3. **Target spacing**: the median, with nnU-Net's anisotropic-axis rule
   (:func:`~mambaclinix.planning.topology.target_spacing`).
4. **Normalisation** per channel from the modality (``CT`` → clip to the foreground 0.5/99.5 percentiles
   and z-score with the foreground statistics; other modalities → per-image z-score).
5. **Patch, topology and batch** for the memory budget: start from a patch of 256³ voxels' volume with
   the target spacing's aspect ratio, capped at the median shape; plan the stages, strides and kernels
   for it (:func:`~mambaclinix.planning.topology.plan_topology`); while the predicted peak memory at the
   smallest batch is above the usable budget, shrink the axis that is largest relative to the median
   shape by one size-divisor step and plan again. The batch is then the largest that fits, but at most
   what covers ``max_dataset_fraction`` (5%) of the dataset's voxels, and at least ``min_batch_size``.
6. **Network**: channels ``min(base · 2**s, max_features)``, HGCN at stages ``s < ceil(n/2)`` and Mamba at
   the others (the adaptive stage-wise rule), foreground oversampling 1/3 (nnU-Net).
7. **Batch Dice** (:func:`uses_batch_dice`): on when the patch covers less than a quarter of the median
   image, where nnU-Net v2 adds a 3d_lowres configuration and trains 3d_fullres with batch Dice.

The usable budget is ``safety · (memory_gb − reserve_gb)`` GiB; the peak is predicted by the fitted memory
model of :mod:`mambaclinix.planning.memory` for the device and precision. :func:`write_plan`
(:mod:`mambaclinix.planning.render`) writes the plan and the config.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mambaclinix.planning.memory import count_parameters, load_coefficients, memory_terms, predict_peak
from mambaclinix.planning.plan import DatasetPlan
from mambaclinix.planning.render import config_text as config_text  # rendering moved; still importable here
from mambaclinix.planning.render import plan_text as plan_text
from mambaclinix.planning.render import write_plan
from mambaclinix.planning.topology import (
    ANISOTROPY_THRESHOLD,
    Topology,
    adaptive_layer_types,
    features_per_stage,
    plan_topology,
    target_spacing,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LOWRES_CREATION_THRESHOLD",
    "DatasetPlan",
    "PlanningError",
    "choose_patch_and_batch",
    "plan_dataset",
    "uses_batch_dice",
    "write_plan",
]

LOWRES_CREATION_THRESHOLD = 0.25
"""nnU-Net v2's ``lowres_creation_threshold``: a 3d_lowres configuration is made when the full-resolution
patch holds fewer voxels than this fraction of the median image."""


def uses_batch_dice(patch_size: Sequence[int], median_shape: Sequence[float]) -> bool:
    """nnU-Net v2's batch-Dice choice for the full-resolution configuration.

    nnU-Net's experiment planner adds a 3d_lowres configuration when ``prod(patch_size) /
    prod(median_shape) < 0.25`` (the patch sees less than a quarter of a typical image, e.g. abdominal CT)
    and then trains 3d_fullres with ``batch_dice=True``; otherwise 3d_fullres has ``batch_dice=False``.

    Args:
        patch_size: the planned patch, voxels per axis.
        median_shape: the median image shape at the target spacing (after cropping).
    """
    patch = math.prod(float(p) for p in patch_size)
    median = math.prod(float(m) for m in median_shape)
    if patch <= 0 or median <= 0:
        raise ValueError(
            f"patch_size {tuple(patch_size)} and median_shape {tuple(median_shape)} must be positive"
        )
    return patch / median < LOWRES_CREATION_THRESHOLD


ACCELERATORS = ("gpu", "cpu")
DEFAULT_MEMORY_GB = {"gpu": 24.0, "cpu": 8.0}
DEFAULT_RESERVE_GB = {"gpu": 1.0, "cpu": 0.0}
DEFAULT_PRECISION = {"gpu": "bf16-mixed", "cpu": "32-true"}
INITIAL_PATCH_VOXELS = 256**3


class PlanningError(ValueError):
    """No plan satisfies the constraints (e.g. a memory budget too small for the smallest patch)."""


# ------------------------------------------------------------------------------------------ patch search


def _predict(
    topo: Topology,
    batch: int,
    in_channels: int,
    num_classes: int,
    base: int,
    maximum: int,
    coefficients: dict[str, float],
) -> float:
    n = topo.n_stages
    features = features_per_stage(n, base, maximum)
    kwargs = {
        "in_channels": in_channels,
        "out_channels": num_classes,
        "n_stages": n,
        "features_per_stage": features,
        "kernel_sizes": topo.kernel_sizes,
        "strides": topo.strides,
    }
    params = count_parameters(kwargs)
    terms = memory_terms(
        topo.patch_size, batch, features, topo.strides, adaptive_layer_types(n), num_classes, params
    )
    return predict_peak(terms, coefficients)


def choose_patch_and_batch(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    usable_bytes: float,
    coefficients: dict[str, float],
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    base_features: int = 32,
    max_features: int = 320,
    max_stages: int | None = 7,
    min_feature_map_size: int = 4,
    min_batch_size: int = 2,
    max_batch_size: int | None = None,
) -> tuple[Topology, int, float]:
    """The patch, its topology and the batch size for a memory budget (module docstring, step 5).

    Args:
        spacing: target spacing per axis.
        median_shape: median case shape on the target grid (voxels).
        usable_bytes: the peak memory the training step may reach.
        coefficients: memory-model coefficients (:func:`~mambaclinix.planning.memory.load_coefficients`).
        in_channels: network input channels.
        num_classes: classes, background included.
        base_features: channels of stage 0; stage ``s`` has ``min(base_features · 2**s, max_features)``.
        max_features: the most channels of a stage.
        max_stages: most stages (see :func:`~mambaclinix.planning.topology.plan_topology`).
        min_feature_map_size: smallest feature-map edge (see
            :func:`~mambaclinix.planning.topology.plan_topology`).
        min_batch_size: the batch the patch must fit with (nnU-Net: 2).
        max_batch_size: upper bound for the batch (e.g. the dataset-coverage rule); ``None``: none.

    Returns:
        ``(topology, batch_size, predicted_peak_bytes)``.

    Raises:
        PlanningError: even the smallest patch does not fit at ``min_batch_size``.
    """
    spacing = [float(s) for s in spacing]
    median = np.maximum(np.asarray(median_shape, dtype=np.float64), 1.0)

    def predict(topo: Topology, batch: int) -> float:
        return _predict(topo, batch, in_channels, num_classes, base_features, max_features, coefficients)

    def topology(patch: Sequence[int]) -> Topology:
        return plan_topology(spacing, patch, min_feature_map_size, max_stages)

    inv = 1.0 / np.asarray(spacing)
    initial = np.round(inv * (INITIAL_PATCH_VOXELS / np.prod(inv)) ** (1 / 3))
    patch = [int(v) for v in np.maximum(np.minimum(initial, np.floor(median)), 1)]
    topo = topology(patch)
    if not _usable(topo):
        raise PlanningError(
            f"the median image ({tuple(int(v) for v in median)} voxels at the target spacing) is too small "
            f"for a U-Net of two stages (at least {2 * min_feature_map_size} voxels along one axis)"
        )
    estimate = predict(topo, min_batch_size)
    while estimate > usable_bytes:
        current = list(topo.patch_size)
        order = np.argsort(-(np.asarray(current) / median), kind="stable")
        for axis in order:
            shrunk = _shrink(current, int(axis), topology)
            if shrunk is not None:
                topo = shrunk
                break
        else:
            raise PlanningError(
                f"the memory budget ({usable_bytes / 2**30:.2f} GiB usable) is too small: the smallest patch "
                f"{tuple(current)} needs about {estimate / 2**30:.2f} GiB at batch size {min_batch_size}; "
                "raise the budget, lower --min-batch-size or use fewer channels (--base-features)"
            )
        estimate = predict(topo, min_batch_size)
    # peak(b) = fixed + b · per_batch (every term but the constant and the parameters grows with b)
    one, two = predict(topo, 1), predict(topo, 2)
    per_batch = max(two - one, 1.0)
    fixed = one - per_batch
    batch = max(min_batch_size, int((usable_bytes - fixed) // per_batch))
    if max_batch_size is not None:
        batch = max(min_batch_size, min(batch, max_batch_size))
    return topo, batch, predict(topo, batch)


def _shrink(patch: list[int], axis: int, topology) -> Topology | None:
    """The topology of ``patch`` made smaller along ``axis`` (by the size divisor of the smaller patch),
    or ``None`` when that axis cannot shrink."""
    start = patch[axis]
    size = start
    while size > 1:
        trial = list(patch)
        trial[axis] = size - 1
        step = topology(trial).size_divisor[axis]
        size = max(1, (size - 1) // step * step) if (size - 1) >= step else size - 1
        trial[axis] = size
        topo = topology(trial)
        if not _usable(topo):
            return None
        if topo.patch_size[axis] < start:
            return topo
    return None


def _usable(topo: Topology) -> bool:
    """At least two stages (the network's minimum) and more than one bottleneck voxel (InstanceNorm)."""
    return topo.n_stages >= 2 and math.prod(topo.stage_shapes()[-1]) > 1


# --------------------------------------------------------------------------------------------- planning


def plan_dataset(
    data_dir: str | Path | None = None,
    *,
    manifest: str | Path | None = None,
    accelerator: str = "gpu",
    memory_gb: float | None = None,
    reserve_gb: float | None = None,
    safety: float | None = None,
    precision: str | None = None,
    base_features: int = 32,
    max_features: int = 320,
    max_stages: int | None = 7,
    min_batch_size: int = 2,
    max_dataset_fraction: float = 0.05,
    min_feature_map_size: int = 4,
    anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
    normalization: str = "auto",
    foreground_probability: float = 1 / 3,
    validate: bool = True,
    cache_dir: str | Path | None = None,
) -> DatasetPlan:
    """Plan preprocessing and network for a dataset (module docstring).

    Args:
        data_dir: Decathlon / nnU-Net raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        manifest: CSV manifest instead (training rows: labelled, split ``train`` or empty).
        accelerator: ``"gpu"`` or ``"cpu"``: which memory model and defaults apply.
        memory_gb: memory budget in GiB (default: 24 for ``gpu``, 8 for ``cpu``). On a GPU the budget is
            the card's memory; on CPU it is the memory the training step adds to the process (the
            process itself, with Lightning and the data loader, needs about 1 GiB more).
        reserve_gb: taken off the budget first (default: 1 GiB on ``gpu`` for the CUDA context and
            libraries, 0 on ``cpu``).
        safety: the predicted peak must stay below ``safety · (memory_gb − reserve_gb)``; default
            ``1 / (1 + e)`` with ``e`` the largest relative error of the memory model on its measurements
            (fitted and held-out points), so that the worst error seen still fits.
        precision: Lightning precision (default ``bf16-mixed`` on ``gpu``, ``32-true`` on ``cpu``).
        base_features: channels of stage 0; stage ``s`` has ``min(base_features · 2**s, max_features)``
            (paper: 32).
        max_features: the most channels of a stage (paper: 320).
        max_stages: most U-Net stages (the paper's network has 6); ``None``: as the patch allows.
        min_batch_size: smallest batch (nnU-Net: 2).
        max_dataset_fraction: the batch covers at most this fraction of the dataset's voxels (nnU-Net: 5%).
        min_feature_map_size: smallest edge a feature map is downsampled to (nnU-Net: 4).
        anisotropy_threshold: spacing ratio that makes an axis anisotropic (nnU-Net: 3).
        normalization: ``"auto"`` (by modality) or one scheme for all channels (``"ct"``, ``"zscore"``,
            ``"none"``).
        foreground_probability: fraction of training patches centred on foreground (nnU-Net: 1/3).
        validate: check every file first with :func:`mambaclinix.data.validation.validate_cases`.
        cache_dir: where to cache the fingerprint (``None``: not cached).

    Raises:
        DatasetError: a bad dataset (the message names the case and file).
        PlanningError: no patch fits the budget.
    """
    from mambaclinix.data.datasets import read_cases, read_dataset_info
    from mambaclinix.data.fingerprint import compute_fingerprint
    from mambaclinix.data.normalization import resolve_normalization

    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    memory_gb = DEFAULT_MEMORY_GB[accelerator] if memory_gb is None else float(memory_gb)
    reserve_gb = DEFAULT_RESERVE_GB[accelerator] if reserve_gb is None else float(reserve_gb)
    precision = precision or DEFAULT_PRECISION[accelerator]
    if memory_gb <= reserve_gb:
        raise ValueError(f"memory_gb ({memory_gb}) must exceed reserve_gb ({reserve_gb})")
    if min_batch_size < 1:
        raise ValueError(f"min_batch_size must be >= 1, got {min_batch_size}")
    if accelerator == "cpu" and precision != "32-true":
        raise ValueError(f"on cpu the planner models precision '32-true' only, got {precision!r}")

    # the labelled training pool; with validate, a missing label is reported with every other problem
    cases = read_cases(data_dir, manifest, test=False, check_labels=not validate).train
    info = read_dataset_info(data_dir, manifest)
    source = {"data_dir": str(Path(data_dir).resolve())} if data_dir is not None else {
        "manifest": str(Path(manifest).resolve())  # type: ignore[arg-type]
    }  # fmt: skip
    if validate:
        from mambaclinix.data.validation import validate_cases

        validate_cases(cases, info)
    num_channels = info.num_channels if info is not None else len(cases[0].image_paths)
    channel_names = list(info.channel_names) if info is not None else ["unknown"] * num_channels
    num_classes_declared = info.num_classes if info is not None else None
    logger.info("fingerprinting %d training case(s)", len(cases))
    fp = compute_fingerprint(
        cases, num_channels, True, cache_root=cache_dir, full=True, num_classes=num_classes_declared
    )
    assert fp.cropped_shapes is not None and fp.class_voxels is not None and fp.intensity is not None
    num_classes = num_classes_declared or max(max(fp.class_voxels) + 1, 2)
    class_names = info.class_names if info is not None else [f"class_{v}" for v in range(num_classes)]

    spacings = np.asarray(fp.spacings, dtype=np.float64)
    cropped = np.asarray(fp.cropped_shapes, dtype=np.float64)
    target = list(target_spacing(spacings, cropped, anisotropy_threshold))
    median_spacing = np.median(spacings, axis=0)
    changed = [d for d in range(3) if not math.isclose(target[d], median_spacing[d], rel_tol=1e-9)]
    anisotropic_axis = changed[0] if changed else None
    on_target = cropped * spacings / np.asarray(target)
    median_shape = np.median(on_target, axis=0)
    total_voxels = float(np.prod(np.round(on_target), axis=1).sum())

    schemes = list(resolve_normalization(normalization, channel_names))

    coefficients = load_coefficients("cuda" if accelerator == "gpu" else "cpu", precision)
    if safety is None:
        errors = [coefficients.get(k) for k in ("fit_max_abs_rel_error", "heldout_max_abs_rel_error")]
        worst = max((float(e) for e in errors if e is not None and math.isfinite(float(e))), default=0.1)
        safety = math.floor(100 / (1 + worst)) / 100
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    usable = safety * (memory_gb - reserve_gb) * 2**30
    # the dataset-coverage cap needs the patch: search once without it, then cap
    topo, batch, predicted = choose_patch_and_batch(
        target, median_shape, usable, coefficients, in_channels=num_channels, num_classes=num_classes,
        base_features=base_features, max_features=max_features, max_stages=max_stages,
        min_feature_map_size=min_feature_map_size, min_batch_size=min_batch_size,
    )  # fmt: skip
    coverage_cap = max(1, round(total_voxels * max_dataset_fraction / math.prod(topo.patch_size)))
    if batch > coverage_cap:
        batch = max(min_batch_size, coverage_cap)
        predicted = _predict(
            topo, batch, num_channels, num_classes, base_features, max_features, coefficients
        )

    n = topo.n_stages
    features = list(features_per_stage(n, base_features, max_features))
    network = {
        "n_stages": n,
        "features_per_stage": features,
        "kernel_sizes": [list(k) for k in topo.kernel_sizes],
        "strides": [list(s) for s in topo.strides],
        "n_hgcn_stages": math.ceil(n / 2),
        "stage_layer_types": list(adaptive_layer_types(n)),
        "size_divisor": list(topo.size_divisor),
        "parameters": count_parameters(
            {
                "in_channels": num_channels,
                "out_channels": num_classes,
                "n_stages": n,
                "features_per_stage": features,
                "kernel_sizes": topo.kernel_sizes,
                "strides": topo.strides,
            }
        ),  # fmt: skip
    }
    total_class = sum(fp.class_voxels.values())
    fingerprint = {
        "cases": len(cases),
        "spacing_median": [float(v) for v in median_spacing],
        "spacing_min": [float(v) for v in spacings.min(axis=0)],
        "spacing_max": [float(v) for v in spacings.max(axis=0)],
        "shape_median": [float(v) for v in np.median(np.asarray(fp.shapes), axis=0)],
        "cropped_shape_median": [float(v) for v in np.median(cropped, axis=0)],
        "class_voxel_fraction": {
            class_names[k] if k < len(class_names) else f"class_{k}": round(v / total_class, 6)
            for k, v in fp.class_voxels.items()
        },
        "foreground_intensity": [
            {"channel": name, "mean": s.mean, "std": s.std, "p00_5": s.lower, "p99_5": s.upper}
            for name, s in zip(channel_names, fp.intensity, strict=True)
        ],
    }
    memory = {
        "accelerator": accelerator,
        "precision": precision,
        "budget_gib": memory_gb,
        "reserve_gib": reserve_gb,
        "safety": safety,
        "usable_gib": round(usable / 2**30, 3),
        "predicted_peak_gib": round(predicted / 2**30, 3),
        "model": coefficients.get("source", ""),
        "model_heldout_max_abs_rel_error": coefficients.get("heldout_max_abs_rel_error"),
        "dataset_coverage_batch_cap": coverage_cap,
    }
    training = {
        "max_epochs": 1000 if accelerator == "gpu" else 100,
        "iterations_per_epoch": 250 if accelerator == "gpu" else 50,
        "check_val_every_n_epoch": 10 if accelerator == "gpu" else 5,
        "channels_last": accelerator == "cpu",
    }
    plan = DatasetPlan(
        source=source,
        dataset={
            "name": (info.name if info is not None else None) or Path(data_dir or manifest).name,  # type: ignore[arg-type]
            "num_channels": num_channels,
            "channel_names": channel_names,
            "num_classes": num_classes,
            "class_names": list(class_names),
        },
        fingerprint=fingerprint,
        target_spacing=[float(v) for v in target],
        anisotropic_axis=anisotropic_axis,
        normalization=schemes,
        median_shape=[int(round(v)) for v in median_shape],
        patch_size=list(topo.patch_size),
        batch_size=int(batch),
        network=network,
        foreground_probability=float(foreground_probability),
        memory=memory,
        training=training,
        batch_dice=uses_batch_dice(topo.patch_size, median_shape),
    )
    logger.info(
        "plan: spacing %s, patch %s, batch %d, %d stages, predicted peak %.2f GiB of %.2f usable",
        plan.target_spacing, plan.patch_size, plan.batch_size, n, predicted / 2**30, usable / 2**30,
    )  # fmt: skip
    return plan
