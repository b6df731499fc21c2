"""Argument handling and initialisation shared by the MambaClinix encoder, decoder and U-Net."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from mambaclinix.layers import MambaLayer, to_tuple
from mambaclinix.layers.factories import check_spatial_dims

Kernel = int | Sequence[int]


def per_stage(value, n_stages: int, name: str, default) -> list:
    """``None`` → ``default`` (a list), a scalar int → repeated, a sequence → checked to have ``n_stages``."""
    if value is None:
        return list(default)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n_stages
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n_stages:
        raise ValueError(f"{name} must have one entry per stage (n_stages={n_stages}), got {value!r}")
    return list(value)


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int >= 1, else ``ValueError`` naming the argument ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def stage_features(features_per_stage: Sequence[int] | None, n_stages: int) -> tuple[int, ...]:
    """Channels per stage; default ``min(32 * 2**s, 320)``."""
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or n_stages < 2:
        raise ValueError(f"n_stages must be an int >= 2, got {n_stages!r}")
    default = [min(32 * 2**s, 320) for s in range(n_stages)]
    features = per_stage(features_per_stage, n_stages, "features_per_stage", default)
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in features):
        raise ValueError(f"features_per_stage must be positive ints, got {features_per_stage!r}")
    return tuple(features)


def stage_kernels(kernel_sizes, n_stages: int, spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """Odd kernels per stage and axis; default 3."""
    check_spatial_dims(spatial_dims)
    kernels = [
        to_tuple(k, spatial_dims, f"kernel_sizes[{s}]")
        for s, k in enumerate(per_stage(kernel_sizes, n_stages, "kernel_sizes", [3] * n_stages))
    ]
    for s, k in enumerate(kernels):
        if any(v % 2 == 0 for v in k):
            raise ValueError(f"kernel_sizes[{s}] must be odd on every axis, got {k}")
    return tuple(kernels)


def stage_strides(strides, n_stages: int, spatial_dims: int) -> tuple[tuple[int, ...], ...]:
    """Strides per stage and axis; default ``1, 2, 2, ...``."""
    if isinstance(strides, int):
        raise ValueError(f"strides must have one entry per stage (n_stages={n_stages}), got {strides!r}")
    default = [1] + [2] * (n_stages - 1)
    return tuple(
        to_tuple(st, spatial_dims, f"strides[{s}]")
        for s, st in enumerate(per_stage(strides, n_stages, "strides", default))
    )


def cumulative_scales(strides: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Per-axis downsampling of every stage relative to the input (running product of the strides)."""
    scales, acc = [], (1,) * len(strides[0])
    for st in strides:
        acc = tuple(a * b for a, b in zip(acc, st, strict=True))
        scales.append(acc)
    return tuple(scales)


def kaiming_slope(act: nn.Module) -> float:
    """The ``a`` of Kaiming's init for activation ``act``: the LeakyReLU slope, PReLU's initial slope,
    else 0 (ReLU's gain)."""
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.PReLU):
        return float(act.init)
    return 0.0


def init_conv_weights_(module: nn.Module, a: float) -> None:
    """Kaiming-normal(a) weights and zero biases for every conv below ``module``, in registration order,
    leaving the Mamba layers (which keep Mamba's own initialisation) untouched."""
    for child in module.children():
        if isinstance(child, MambaLayer):
            continue
        if isinstance(child, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(child.weight, a=a)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        init_conv_weights_(child, a)
