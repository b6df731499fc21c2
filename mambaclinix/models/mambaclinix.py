"""MambaClinix U-Net: HGCN blocks in the shallow encoder stages, residual Mamba layers in the deep ones.

Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for Enhanced 3D Medical
Image Segmentation", arXiv:2409.12533, §3 and Fig. 1. The topology, init and sizes follow the project
spec (§1), which takes the authors' code as the paper default and offers the figure's variants as options.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from mambaclinix.layers import (
    GATINGS,
    BasicBlockD,
    ConvNormAct,
    DecoderResBlock,
    HGCNBlock,
    LayerNormChannels,
    MambaLayer,
    UpsampleConv,
    get_act_layer,
    get_norm_layer,
    make_conv,
    to_tuple,
)
from mambaclinix.models.registry import register_model

__all__ = [
    "STAGE_LAYER_TYPES",
    "MambaClinixUNet",
    "mambaclinix_paper",
    "mambaclinix_5stage",
    "mambaclinix_7stage",
    "mambaclinix_small",
    "mambaclinix_tiny",
]

STAGE_LAYER_TYPES = ("hgcn", "mamba", "none")

_Kernel = int | Sequence[int]


def _per_stage(value, n_stages: int, name: str, default) -> list:
    """``None`` → ``default`` (a list), a scalar int → repeated, a sequence → checked to have ``n_stages``."""
    if value is None:
        return list(default)
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n_stages
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n_stages:
        raise ValueError(f"{name} must have one entry per stage (n_stages={n_stages}), got {value!r}")
    return list(value)


class MambaClinixUNet(nn.Module):
    """The MambaClinix U-Net (arXiv:2409.12533 §3, Fig. 1; spec §1).

    Encoder: ``stem`` (Conv(k_0) → IN → LReLU, ``in_channels → C_0``); for every stage ``s`` a ResNet-D
    basic block ``encoder_blocks[s]`` (stride ``strides[s]``) followed by ``stage_layers[s]``: an
    :class:`~mambaclinix.layers.HGCNBlock` (order ``s + 2``, DropPath ``linspace(0, drop_path_rate, n)[s]``)
    for ``s < n_hgcn_stages`` (the adaptive stage-wise rule, default ``ceil(n / 2)``), a residual
    :class:`~mambaclinix.layers.MambaLayer` otherwise. ``junction_norm`` (channel LayerNorm, eps 1e-6)
    sits between the basic block and the HGCN block of the last HGCN stage only (``junction_stage``).

    Decoder: ``bottleneck`` (stride-1 basic block on the deepest feature); then for each level
    ``t = n-2, ..., 0`` (coarse → fine): ``up_convs[t]`` (nearest upsampling by ``strides[t+1]``, 1×1 conv
    ``C_{t+1} → C_t``), ``skip_blocks[t]`` (stride-1 basic block on the skip ``F_t``),
    ``decoder_blocks[t]`` (residual block on ``cat([up, skip])``, ``2 C_t → C_t``) and ``heads[t]``
    (1×1 conv ``C_t → out_channels``). All decoder lists are indexed by the level ``t`` (0 = finest),
    so ``heads[t]`` produces ``output[t]``.

    Output convention: logits (no softmax). With ``deep_supervision`` a list of ``n_stages - 1`` tensors,
    finest first: ``output[t]`` has shape ``(B, out_channels, *(S // output_scales[t]))``; without it the
    finest map only, ``(B, out_channels, *(S // output_scales[0]))`` (``S`` itself for the default stride-1
    first stage). The heads of the coarser levels exist either way (the parameter count does not change),
    and ``deep_supervision`` is a plain attribute that may be switched after construction (e.g. off for
    inference).

    Input: ``(B, in_channels, *S)`` with every axis of ``S`` divisible by ``size_divisor`` (the product of
    the strides per axis) and a bottleneck of more than one voxel (InstanceNorm needs it); otherwise
    ``forward`` raises ``ValueError``.

    Init: Kaiming-normal (a = 0.01) on every conv weight and zero conv biases, except inside the Mamba
    layers, which keep Mamba's own initialisation (spec §1).

    Args:
        in_channels: Input channels (image modalities).
        out_channels: Output classes (background included).
        n_stages: Number of encoder stages ``n >= 2``.
        features_per_stage: Channels per stage; default ``min(32 * 2**s, 320)``.
        kernel_sizes: Odd conv kernel per stage: one int for all, or one entry (int or per-axis tuple such
            as ``(1, 3, 3)``) per stage; default 3.
        strides: One entry (int or per-axis tuple such as ``(1, 2, 2)``) per stage; default
            ``1, 2, 2, ...``.
        deep_supervision: Return the logits of every decoder level (see above).
        gating: hgConv combination, ``"add"`` (authors' code and figure) or ``"mul"`` (HorNet's gnConv).
        hgcn_order: hgConv order, one int for all HGCN stages or one per stage; default ``s + 2``.
        drop_path_rate: Largest stochastic-depth rate; stage ``s`` uses ``linspace(0, rate, n)[s]``, inside
            HGCN blocks only.
        n_hgcn_stages: Stages ``s < n_hgcn_stages`` use HGCN, the rest Mamba; default ``ceil(n / 2)``.
        stage_layer_types: Ablations: one of ``"hgcn"``, ``"mamba"``, ``"none"`` per stage, overriding the
            stage-wise rule; ``"none"`` leaves the basic block alone, e.g. ``("hgcn",) * 3 + ("none",) * 3``
            removes the Mamba layers of the paper model. Exclusive with ``n_hgcn_stages``.
        hgcn_final_act: Apply LReLU to the HGCN block output, as Fig. 2 draws (the code does not).
        hgconv_kernel_size: Depthwise kernel of hgConv (int or per-axis tuple) for every HGCN stage;
            default the stage kernel (HorNet's gnConv used 7 with ``hgconv_scale=1/3``).
        hgconv_scale: Scale on hgConv's depthwise output.
        layer_scale_init: Initial HGCN layer scale gamma; ``None`` disables it.
        mamba_d_state: Mamba state size ``N``.
        mamba_d_conv: Mamba causal conv width.
        mamba_expand: Mamba expansion ``E / C``.
        mamba_dt_rank: Mamba ``Δ`` rank, or ``"auto"`` (``ceil(C / 16)``).
        scan_backend: Selective-scan backend of the Mamba layers (``None``: the process default, see
            :mod:`mambaclinix.ops.backend`).
        spatial_dims: 3 (volumes) or 2 (slices).
        norm_eps: InstanceNorm epsilon.
        negative_slope: LeakyReLU slope (also the Kaiming ``a``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_stages: int = 6,
        features_per_stage: Sequence[int] | None = None,
        kernel_sizes: int | Sequence[_Kernel] | None = None,
        strides: Sequence[_Kernel] | None = None,
        deep_supervision: bool = True,
        gating: str = "add",
        hgcn_order: int | Sequence[int] | None = None,
        drop_path_rate: float = 0.5,
        n_hgcn_stages: int | None = None,
        stage_layer_types: Sequence[str] | None = None,
        hgcn_final_act: bool = False,
        hgconv_kernel_size: _Kernel | None = None,
        hgconv_scale: float = 1.0,
        layer_scale_init: float | None = 1e-6,
        mamba_d_state: int = 16,
        mamba_d_conv: int = 4,
        mamba_expand: int = 2,
        mamba_dt_rank: int | str = "auto",
        scan_backend: str | None = None,
        spatial_dims: int = 3,
        norm_eps: float = 1e-5,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        n = n_stages
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n_stages must be an int >= 2, got {n!r}")
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate!r}")

        features = _per_stage(
            features_per_stage, n, "features_per_stage", [min(32 * 2**s, 320) for s in range(n)]
        )
        if any(not isinstance(c, int) or c < 1 for c in features):
            raise ValueError(f"features_per_stage must be positive ints, got {features_per_stage!r}")
        kernels = [
            to_tuple(k, spatial_dims, f"kernel_sizes[{s}]")
            for s, k in enumerate(_per_stage(kernel_sizes, n, "kernel_sizes", [3] * n))
        ]
        for s, k in enumerate(kernels):
            if any(v % 2 == 0 for v in k):
                raise ValueError(f"kernel_sizes[{s}] must be odd on every axis, got {k}")
        if isinstance(strides, int):
            raise ValueError(f"strides must have one entry per stage (n_stages={n}), got {strides!r}")
        stride_list = [
            to_tuple(st, spatial_dims, f"strides[{s}]")
            for s, st in enumerate(_per_stage(strides, n, "strides", [1] + [2] * (n - 1)))
        ]
        orders = _per_stage(hgcn_order, n, "hgcn_order", [s + 2 for s in range(n)])
        if hgconv_kernel_size is not None and any(
            k % 2 == 0 for k in to_tuple(hgconv_kernel_size, spatial_dims, "hgconv_kernel_size")
        ):
            raise ValueError(f"hgconv_kernel_size must be odd on every axis, got {hgconv_kernel_size!r}")

        if stage_layer_types is None:
            n_hgcn = math.ceil(n / 2) if n_hgcn_stages is None else n_hgcn_stages
            if not isinstance(n_hgcn, int) or not 0 <= n_hgcn <= n:
                raise ValueError(f"n_hgcn_stages must be an int in [0, n_stages={n}], got {n_hgcn_stages!r}")
            layer_types = ["hgcn"] * n_hgcn + ["mamba"] * (n - n_hgcn)
        else:
            if n_hgcn_stages is not None:
                raise ValueError("give either n_hgcn_stages or stage_layer_types, not both")
            layer_types = _per_stage(stage_layer_types, n, "stage_layer_types", [])
            if any(t not in STAGE_LAYER_TYPES for t in layer_types):
                raise ValueError(
                    f"stage_layer_types entries must be in {STAGE_LAYER_TYPES}, got {layer_types}"
                )
        for s, t in enumerate(layer_types):
            if t != "hgcn":
                continue
            c, order = features[s], orders[s]
            if not isinstance(order, int) or order < 1:
                raise ValueError(f"hgcn_order[{s}] must be an int >= 1, got {order!r}")
            if c % 2 or (c // 2) % 2 ** (order - 1):
                raise ValueError(
                    f"features_per_stage[{s}]={c} cannot host an HGCN block of order {order}: "
                    f"C/2 must be divisible by 2**(hgcn_order-1) = {2 ** (order - 1)}"
                )

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_stages = n
        self.spatial_dims = spatial_dims
        self.features_per_stage = tuple(features)
        self.kernel_sizes = tuple(kernels)
        self.strides = tuple(stride_list)
        self.stage_layer_types = tuple(layer_types)
        self.deep_supervision = deep_supervision
        self.drop_path_rates = tuple(drop_path_rate * s / (n - 1) for s in range(n))
        scales, acc = [], (1,) * spatial_dims
        for st in stride_list:
            acc = tuple(a * b for a, b in zip(acc, st, strict=True))
            scales.append(acc)
        #: Per-axis downsampling of level t relative to the input: ``output[t]`` is ``S // output_scales[t]``.
        self.output_scales = tuple(scales[:-1])
        #: Every input axis must be a multiple of this (the product of the strides per axis).
        self.size_divisor = scales[-1]

        norm = get_norm_layer(spatial_dims, eps=norm_eps)
        act = get_act_layer(negative_slope)
        common = dict(spatial_dims=spatial_dims, norm_layer=norm, act_layer=act)
        hgcn_kwargs = dict(
            spatial_dims=spatial_dims,
            layer_scale_init=layer_scale_init,
            gating=gating,
            hgconv_kernel_size=hgconv_kernel_size,
            hgconv_scale=hgconv_scale,
            final_act=hgcn_final_act,
            act_layer=act,
        )
        mamba_kwargs = dict(
            d_state=mamba_d_state,
            d_conv=mamba_d_conv,
            expand=mamba_expand,
            dt_rank=mamba_dt_rank,
            scan_backend=scan_backend,
        )
        self.stem = ConvNormAct(in_channels, features[0], kernel_size=kernels[0], **common)
        self.encoder_blocks = nn.ModuleList()
        self.stage_layers = nn.ModuleList()
        for s, c in enumerate(features):
            prev = features[max(s - 1, 0)]
            self.encoder_blocks.append(
                BasicBlockD(prev, c, kernel_size=kernels[s], stride=stride_list[s], **common)
            )
            if layer_types[s] == "hgcn":
                rate = self.drop_path_rates[s]
                layer = HGCNBlock(c, order=orders[s], kernel_size=kernels[s], drop_path=rate, **hgcn_kwargs)
            elif layer_types[s] == "mamba":
                layer = MambaLayer(c, **mamba_kwargs)
            else:
                layer = nn.Identity()
            self.stage_layers.append(layer)
        hgcn_stages = [s for s, t in enumerate(layer_types) if t == "hgcn"]
        #: Stage whose HGCN block is preceded by ``junction_norm`` (the last HGCN stage), or None.
        self.junction_stage = hgcn_stages[-1] if hgcn_stages else None
        self.junction_norm = (
            LayerNormChannels(features[self.junction_stage], eps=1e-6) if hgcn_stages else None
        )

        self.bottleneck = BasicBlockD(features[-1], features[-1], kernel_size=kernels[-1], **common)
        self.skip_blocks = nn.ModuleList(
            BasicBlockD(features[t], features[t], kernel_size=kernels[t], **common) for t in range(n - 1)
        )
        self.up_convs = nn.ModuleList(
            UpsampleConv(features[t + 1], features[t], stride_list[t + 1], spatial_dims) for t in range(n - 1)
        )
        self.decoder_blocks = nn.ModuleList(
            DecoderResBlock(2 * features[t], features[t], kernel_size=kernels[t], **common)
            for t in range(n - 1)
        )
        self.heads = nn.ModuleList(
            make_conv(spatial_dims, features[t], out_channels, 1) for t in range(n - 1)
        )
        self._init_weights(negative_slope)

    def _init_weights(self, a: float) -> None:
        """Kaiming-normal(a) conv weights and zero conv biases, leaving Mamba layers untouched."""

        def visit(module: nn.Module) -> None:
            for child in module.children():
                if isinstance(child, MambaLayer):
                    continue
                if isinstance(child, (nn.Conv2d, nn.Conv3d)):
                    nn.init.kaiming_normal_(child.weight, a=a)
                    if child.bias is not None:
                        nn.init.zeros_(child.bias)
                visit(child)

        visit(self)

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *S)``, every axis of ``S`` a multiple of
        ``size_divisor``, with more than one voxel left at the bottleneck."""
        shape = tuple(x.shape)
        if x.dim() != self.spatial_dims + 2 or shape[1] != self.in_channels:
            dims = ", ".join("DHW"[3 - self.spatial_dims :])
            raise ValueError(f"expected input (B, {self.in_channels}, {dims}), got shape {shape}")
        spatial = shape[2:]
        if any(size % d for size, d in zip(spatial, self.size_divisor, strict=True)):
            raise ValueError(
                f"input spatial size {spatial} (input shape {shape}) must be divisible by "
                f"size_divisor={self.size_divisor} per axis (the product of the strides {self.strides})"
            )
        if math.prod(size // d for size, d in zip(spatial, self.size_divisor, strict=True)) == 1:
            raise ValueError(
                f"input spatial size {spatial} (input shape {shape}) leaves a single voxel at the "
                "bottleneck, which InstanceNorm cannot normalise; use at least twice "
                f"size_divisor={self.size_divisor} on one axis"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, in_channels, *S)``, ``S`` a multiple of ``size_divisor``.

        Returns:
            With ``deep_supervision``: ``n_stages - 1`` logit maps, finest first, ``output[t]`` of shape
            ``(B, out_channels, *(S // output_scales[t]))``. Without: the finest map only.
        """
        self.check_input_shape(x)
        x = self.stem(x)
        skips = []
        for s in range(self.n_stages):
            x = self.encoder_blocks[s](x)
            if s == self.junction_stage:
                x = self.junction_norm(x)
            x = self.stage_layers[s](x)
            skips.append(x)
        x = self.bottleneck(x)
        logits = []
        for t in range(self.n_stages - 2, -1, -1):
            up = self.up_convs[t](x)
            x = self.decoder_blocks[t](torch.cat([up, self.skip_blocks[t](skips[t])], dim=1))
            if self.deep_supervision or t == 0:
                logits.append(self.heads[t](x))
        return logits[::-1] if self.deep_supervision else logits[0]


def _build(defaults: dict, kwargs: dict) -> MambaClinixUNet:
    return MambaClinixUNet(**{**defaults, **kwargs})


@register_model
def mambaclinix_paper(**kwargs) -> MambaClinixUNet:
    """Paper default: 6 stages (32..320 channels), 1 → 14 classes (abdominal CT); 48,883,846 parameters."""
    return _build(dict(in_channels=1, out_channels=14, n_stages=6), kwargs)


@register_model
def mambaclinix_5stage(**kwargs) -> MambaClinixUNet:
    """5 stages (32..320 channels), 1 → 2 classes; about 28.43 M parameters (spec §1)."""
    return _build(dict(in_channels=1, out_channels=2, n_stages=5), kwargs)


@register_model
def mambaclinix_7stage(**kwargs) -> MambaClinixUNet:
    """7 stages (32..320 channels), 1 → 4 classes; about 71.58 M parameters (spec §1)."""
    return _build(dict(in_channels=1, out_channels=4, n_stages=7), kwargs)


@register_model
def mambaclinix_small(**kwargs) -> MambaClinixUNet:
    """CPU-trainable: 5 stages of (8, 16, 32, 64, 64) channels, HGCN at 0-2, Mamba at 3-4; 1 → 2 classes."""
    return _build(
        dict(in_channels=1, out_channels=2, n_stages=5, features_per_stage=(8, 16, 32, 64, 64)), kwargs
    )


@register_model
def mambaclinix_tiny(**kwargs) -> MambaClinixUNet:
    """For unit tests: 4 stages of (4, 8, 16, 16) channels, HGCN at 0-1, Mamba at 2-3; 1 → 2 classes."""
    return _build(dict(in_channels=1, out_channels=2, n_stages=4, features_per_stage=(4, 8, 16, 16)), kwargs)
