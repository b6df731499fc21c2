"""Convolutional building blocks of the MambaClinix U-Net, and the conv helpers they share.

Every block is channels first, then ``spatial_dims`` (3, or 2 for slices), then the injected choices:
``norm_layer`` and ``act_layer``, each a name, a class, a ``functools.partial`` or a factory (see
:func:`~mambaclinix.layers.get_norm_layer` and :func:`~mambaclinix.layers.get_act_layer`). Defaults follow
the paper: InstanceNorm(eps 1e-5, affine), LeakyReLU(0.01), conv bias on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaclinix.layers.factories import (
    ActFactory,
    ActSpec,
    NormFactory,
    NormSpec,
    check_spatial_dims,
    get_act_layer,
    get_norm_layer,
)

__all__ = [
    "NormFactory",
    "ActFactory",
    "to_tuple",
    "same_padding",
    "conv_type",
    "make_conv",
    "pool_type",
    "get_norm_layer",
    "get_act_layer",
    "ConvNormAct",
    "BasicBlockD",
    "DecoderResBlock",
    "UpsampleConv",
    "pointwise_conv",
]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _norm_act(norm_layer, act_layer, spatial_dims: int) -> tuple[NormFactory, ActFactory]:
    """The factories of a block's ``norm_layer`` / ``act_layer`` arguments (``None``: the paper's)."""
    norm = get_norm_layer("instance" if norm_layer is None else norm_layer, spatial_dims)
    return norm, get_act_layer("leakyrelu" if act_layer is None else act_layer)


def to_tuple(value: int | Sequence[int], spatial_dims: int, name: str = "value") -> tuple[int, ...]:
    """Broadcast an int to ``spatial_dims`` ints, or check a sequence has one positive int per axis.

    Raises:
        ValueError: wrong length, non-integer or non-positive entries (the message names ``name``).
    """
    check_spatial_dims(spatial_dims)
    items = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(items) != spatial_dims or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{name} must be an int or {spatial_dims} ints, got {value!r}")
    if any(v < 1 for v in items):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return items


def same_padding(kernel_size: Sequence[int], name: str = "kernel_size") -> tuple[int, ...]:
    """Symmetric "same" padding ``k // 2`` per axis; kernels must be odd so it is exact at any stride."""
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"{name} must be odd on every axis, got {tuple(kernel_size)}")
    return tuple(k // 2 for k in kernel_size)


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv3d`` or ``nn.Conv2d``."""
    return _CONV[check_spatial_dims(spatial_dims)]


def pool_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.AvgPool3d`` or ``nn.AvgPool2d``."""
    return _POOL[check_spatial_dims(spatial_dims)]


def make_conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int] | int = 1,
    stride: Sequence[int] | int = 1,
    bias: bool = True,
    groups: int = 1,
) -> nn.Module:
    """Conv{2,3}d with "same" padding (``k // 2``, odd kernels), so the output is ``ceil(S / stride)``."""
    kernel = to_tuple(kernel_size, spatial_dims, "kernel_size")
    stride = to_tuple(stride, spatial_dims, "stride")
    return conv_type(spatial_dims)(
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=same_padding(kernel),
        bias=bias,
        groups=groups,
    )


def pointwise_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv(x)`` for a 1×1(×1) convolution; on the CPU (float32/64, outside autocast) computed as one
    batched matrix product ``W (C_out × C_in) @ x (B, C_in, D·H·W)`` plus bias.

    oneDNN runs 1×1×1 convolutions on large channels-first volumes far below memory speed (reorders to
    its blocked layout and back): 0.85 s for 2×64×96³ → 32 channels, where the matrix product takes a
    small fraction of that. Same numbers up to float rounding; other cases call ``conv`` itself.
    """
    if (
        x.device.type != "cpu"
        or not isinstance(conv, (nn.Conv2d, nn.Conv3d))
        or x.dtype not in (torch.float32, torch.float64)
        or torch.is_autocast_enabled("cpu")
        or any(k != 1 for k in conv.kernel_size)
        or any(s != 1 for s in conv.stride)
        or any(p != 0 for p in conv.padding)
        or conv.groups != 1
    ):
        return conv(x)
    b, c = x.shape[:2]
    weight = conv.weight.view(conv.out_channels, c)
    flat = x.reshape(b, c, -1)
    if conv.bias is None:
        y = torch.matmul(weight, flat)
    else:
        y = torch.baddbmm(conv.bias.view(1, -1, 1), weight.expand(b, -1, -1), flat)
    return y.view(b, conv.out_channels, *x.shape[2:])


def _shortcut(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Sequential):
        for m in module:
            x = pointwise_conv(x, m) if isinstance(m, (nn.Conv2d, nn.Conv3d)) else m(x)
        return x
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return pointwise_conv(x, module)
    return module(x)


class ConvNormAct(nn.Module):
    """Conv → norm → activation; the stem of the MambaClinix encoder.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        spatial_dims: 3 (volumes) or 2.
        kernel_size: Odd kernel, an int or one per axis (e.g. ``(1, 3, 3)``).
        stride: Stride, an int or one per axis.
        norm_layer: Normalisation, anything :func:`~mambaclinix.layers.get_norm_layer` takes (a name, a
            class, a partial, a factory ``channels -> module``); default InstanceNorm(eps 1e-5, affine).
        act_layer: Activation, anything :func:`~mambaclinix.layers.get_act_layer` takes; default
            LeakyReLU(0.01).

    Shape:
        ``(B, in_channels, *S)`` → ``(B, out_channels, *ceil(S / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        norm_layer: NormSpec | None = None,
        act_layer: ActSpec | None = None,
    ) -> None:
        super().__init__()
        norm_layer, act_layer = _norm_act(norm_layer, act_layer, spatial_dims)
        self.conv = make_conv(spatial_dims, in_channels, out_channels, kernel_size, stride)
        self.norm = norm_layer(out_channels)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class BasicBlockD(nn.Module):
    """ResNet-D basic block (He et al. 2019, "Bag of tricks"), the first layer of every encoder stage.

    Main path: Conv(k, stride) → norm → act → Conv(k) → norm. Shortcut: AvgPool(stride) if strided, then
    1×1 conv (no bias) → norm if the channel count changes, else identity. Output: act(main + shortcut),
    as in the authors' code (an nnU-Net residual encoder). The pool uses ``ceil_mode`` so the shortcut
    matches the strided conv (``ceil(S / stride)``) on any input size.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        spatial_dims: 3 or 2.
        kernel_size: Odd kernel, an int or one per axis.
        stride: Stride of the first conv and of the shortcut pool, an int or one per axis.
        norm_layer: Normalisation, anything :func:`~mambaclinix.layers.get_norm_layer` takes (a name, a
            class, a partial, a factory ``channels -> module``); default InstanceNorm(eps 1e-5, affine).
        act_layer: Activation, anything :func:`~mambaclinix.layers.get_act_layer` takes; default
            LeakyReLU(0.01).

    Shape:
        ``(B, in_channels, *S)`` → ``(B, out_channels, *ceil(S / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        norm_layer: NormSpec | None = None,
        act_layer: ActSpec | None = None,
    ) -> None:
        super().__init__()
        norm_layer, act_layer = _norm_act(norm_layer, act_layer, spatial_dims)
        stride = to_tuple(stride, spatial_dims, "stride")
        self.conv1 = make_conv(spatial_dims, in_channels, out_channels, kernel_size, stride)
        self.norm1 = norm_layer(out_channels)
        self.act1 = act_layer()
        self.conv2 = make_conv(spatial_dims, out_channels, out_channels, kernel_size)
        self.norm2 = norm_layer(out_channels)
        shortcut: list[nn.Module] = []
        if any(s != 1 for s in stride):
            shortcut.append(pool_type(spatial_dims)(stride, stride, ceil_mode=True, count_include_pad=False))
        if in_channels != out_channels:
            shortcut += [
                make_conv(spatial_dims, in_channels, out_channels, 1, bias=False),
                norm_layer(out_channels),
            ]
        self.shortcut = nn.Sequential(*shortcut) if shortcut else nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act(out + _shortcut(self.shortcut, x))


class DecoderResBlock(nn.Module):
    """Residual block of a decoder level, applied to the concatenation ``[up, skip]`` (MambaClinix decoder).

    Main path: Conv(k) → norm → act → Conv(k) → norm; shortcut: 1×1 conv with bias (identity if the
    channel counts are equal); output act(main + shortcut).

    Args:
        in_channels: Input channels (``2 C_t`` in the U-Net).
        out_channels: Output channels (``C_t``).
        spatial_dims: 3 or 2.
        kernel_size: Odd kernel, an int or one per axis.
        norm_layer: Normalisation, anything :func:`~mambaclinix.layers.get_norm_layer` takes (a name, a
            class, a partial, a factory ``channels -> module``); default InstanceNorm(eps 1e-5, affine).
        act_layer: Activation, anything :func:`~mambaclinix.layers.get_act_layer` takes; default
            LeakyReLU(0.01).

    Shape:
        ``(B, in_channels, *S)`` → ``(B, out_channels, *S)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        kernel_size: int | Sequence[int] = 3,
        norm_layer: NormSpec | None = None,
        act_layer: ActSpec | None = None,
    ) -> None:
        super().__init__()
        norm_layer, act_layer = _norm_act(norm_layer, act_layer, spatial_dims)
        self.conv1 = make_conv(spatial_dims, in_channels, out_channels, kernel_size)
        self.norm1 = norm_layer(out_channels)
        self.act1 = act_layer()
        self.conv2 = make_conv(spatial_dims, out_channels, out_channels, kernel_size)
        self.norm2 = norm_layer(out_channels)
        self.shortcut = (
            make_conv(spatial_dims, in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act(out + _shortcut(self.shortcut, x))


class UpsampleConv(nn.Module):
    """Nearest-neighbour upsampling by ``scale_factor``, then a 1×1 conv with bias (MambaClinix decoder).

    Args:
        in_channels: Input channels (``C_{t+1}``).
        out_channels: Output channels (``C_t``).
        scale_factor: Integer factor per axis (the stride of the coarser stage), or one int for all.
        spatial_dims: 3 or 2.

    Shape:
        ``(B, in_channels, *S)`` → ``(B, out_channels, *(S * scale_factor))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale_factor: int | Sequence[int] = 2,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.scale_factor = to_tuple(scale_factor, spatial_dims, "scale_factor")
        self.conv = make_conv(spatial_dims, in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(f != 1 for f in self.scale_factor):
            size = [s * f for s, f in zip(x.shape[2:], self.scale_factor, strict=True)]
            x = F.interpolate(x, size=size, mode="nearest")
        return pointwise_conv(x, self.conv)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"
