"""The MambaClinix encoder: HGCN blocks in the shallow stages, residual Mamba layers in the deep ones.

Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for Enhanced 3D Medical
Image Segmentation", arXiv:2409.12533, §3.1-3.3 and Fig. 1. Usable on its own, as a backbone returning one
feature map per stage (for a classifier, or under another decoder), and the first half of
:class:`~mambaclinix.models.MambaClinixUNet`.
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
    HGCNBlock,
    LayerNormChannels,
    MambaLayer,
    get_act_layer,
    get_norm_layer,
    to_tuple,
)
from mambaclinix.layers.factories import ActSpec, NormSpec, check_spatial_dims
from mambaclinix.models._common import (
    Kernel,
    check_positive_int,
    cumulative_scales,
    init_conv_weights_,
    kaiming_slope,
    per_stage,
    stage_features,
    stage_kernels,
    stage_strides,
)

__all__ = ["STAGE_LAYER_TYPES", "MambaClinixEncoder"]

STAGE_LAYER_TYPES = ("hgcn", "mamba", "none")

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _layer_types(stage_layer_types, n_hgcn_stages, n: int) -> list[str]:
    """The stage-wise rule (HGCN for ``s < n_hgcn_stages``, default ``ceil(n / 2)``), or the explicit list."""
    if stage_layer_types is None:
        n_hgcn = math.ceil(n / 2) if n_hgcn_stages is None else n_hgcn_stages
        if not isinstance(n_hgcn, int) or not 0 <= n_hgcn <= n:
            raise ValueError(f"n_hgcn_stages must be an int in [0, n_stages={n}], got {n_hgcn_stages!r}")
        return ["hgcn"] * n_hgcn + ["mamba"] * (n - n_hgcn)
    if n_hgcn_stages is not None:
        raise ValueError("give either n_hgcn_stages or stage_layer_types, not both")
    types = per_stage(stage_layer_types, n, "stage_layer_types", [])
    if any(t not in STAGE_LAYER_TYPES for t in types):
        raise ValueError(f"stage_layer_types entries must be in {STAGE_LAYER_TYPES}, got {types}")
    return types


def _check_hgcn_orders(features: Sequence[int], orders: Sequence, types: Sequence[str]) -> None:
    for s, (c, order, t) in enumerate(zip(features, orders, types, strict=True)):
        if t != "hgcn":
            continue
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"hgcn_order[{s}] must be an int >= 1, got {order!r}")
        if c % 2 or (c // 2) % 2 ** (order - 1):
            raise ValueError(
                f"features_per_stage[{s}]={c} cannot host an HGCN block of order {order}: "
                f"C/2 must be divisible by 2**(hgcn_order-1) = {2 ** (order - 1)}"
            )


class MambaClinixEncoder(nn.Module):
    """The MambaClinix encoder (arXiv:2409.12533 §3, Fig. 1): one feature map per stage, finest first.

    ``stem`` (Conv(k_0) → norm → act, ``in_channels → C_0``); for every stage ``s`` a ResNet-D basic block
    ``encoder_blocks[s]`` (stride ``strides[s]``, ``C_{s-1} → C_s``) followed by ``stage_layers[s]``: an
    :class:`~mambaclinix.layers.HGCNBlock` (order ``s + 2``, DropPath ``linspace(0, drop_path_rate, n)[s]``)
    for ``s < n_hgcn_stages`` (the adaptive stage-wise rule, default ``ceil(n / 2)``), a residual
    :class:`~mambaclinix.layers.MambaLayer` otherwise. ``junction_norm`` (channel LayerNorm, eps 1e-6)
    sits between the basic block and the HGCN block of the last HGCN stage only (``junction_stage``).

    The parameter names are those of the encoder half of :class:`~mambaclinix.models.MambaClinixUNet`
    (``stem.*``, ``encoder_blocks.*``, ``stage_layers.*``, ``junction_norm.*``), so the encoder of a trained
    U-Net loads into a stand-alone encoder as is: ``encoder.load_state_dict(unet.encoder.state_dict())``.

    Input: ``(B, in_channels, *S)`` with every axis of ``S`` divisible by ``size_divisor`` (the product of
    the strides per axis) and, with an instance norm, more than one voxel at the deepest stage; otherwise
    ``forward`` raises ``ValueError``.

    Output: a list of ``n_stages`` feature maps, finest first: ``skips[s]`` has shape
    ``(B, features_per_stage[s], *(S // skip_scales[s]))``. The last one is the deepest (bottleneck)
    feature; e.g. for classification pool it: ``skips[-1].mean(dim=(2, 3, 4))`` is ``(B, C_{n-1})``.

    Init: Kaiming-normal on every conv weight (``a`` = the LeakyReLU slope, 0.01 by default) and zero conv
    biases, except inside the Mamba layers, which keep Mamba's own initialisation.

    Args:
        in_channels: Input channels (image modalities).
        n_stages: Number of stages ``n >= 2``.
        features_per_stage: Channels per stage; default ``min(32 * 2**s, 320)``.
        kernel_sizes: Odd conv kernel per stage: one int for all, or one entry (int or per-axis tuple such
            as ``(1, 3, 3)``) per stage; default 3.
        strides: One entry (int or per-axis tuple such as ``(1, 2, 2)``) per stage; default
            ``1, 2, 2, ...``.
        gating: hgConv combination, ``"add"`` (authors' code and figure) or ``"mul"`` (HorNet's gnConv).
        hgcn_order: hgConv order, one int for all HGCN stages or one per stage; default ``s + 2``.
        drop_path_rate: Largest stochastic-depth rate; stage ``s`` uses ``linspace(0, rate, n)[s]``, inside
            HGCN blocks only.
        n_hgcn_stages: Stages ``s < n_hgcn_stages`` use HGCN, the rest Mamba; default ``ceil(n / 2)``.
        stage_layer_types: Ablations: one of ``"hgcn"``, ``"mamba"``, ``"none"`` per stage, overriding the
            stage-wise rule; ``"none"`` leaves the basic block alone. Exclusive with ``n_hgcn_stages``.
        hgcn_final_act: Apply the activation to the HGCN block output, as Fig. 2 draws (the code does not).
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
        mamba_scan_order: Token order of the Mamba layers: ``"C"`` (last array axis fastest) or ``"F"``
            (first array axis fastest, the authors' physical order on TorchIO's ``(x, y, z)`` arrays); see
            :class:`~mambaclinix.layers.MambaLayer`. No parameters depend on it.
        spatial_dims: 3 (volumes) or 2 (slices).
        norm: Normalisation of the stem and the basic blocks: a name (``"instance"``, ``"batch"``,
            ``"group"``, ``"layer"``), a class, a partial or ``(name, kwargs)``, see
            :func:`~mambaclinix.layers.get_norm_layer`; default InstanceNorm(eps 1e-5, affine). The
            channel LayerNorms of the HGCN blocks and of the junction are part of the design and stay.
        act: Activation of the stem, the basic blocks and the HGCN blocks, as
            :func:`~mambaclinix.layers.get_act_layer` takes it; default LeakyReLU(0.01).
        init_weights: Kaiming-initialise the convolutions as described above; ``False`` keeps PyTorch's
            default initialisation (the U-Net initialises its encoder and decoder together).
    """

    def __init__(
        self,
        in_channels: int,
        n_stages: int = 6,
        features_per_stage: Sequence[int] | None = None,
        kernel_sizes: int | Sequence[Kernel] | None = None,
        strides: Sequence[Kernel] | None = None,
        gating: str = "add",
        hgcn_order: int | Sequence[int] | None = None,
        drop_path_rate: float = 0.5,
        n_hgcn_stages: int | None = None,
        stage_layer_types: Sequence[str] | None = None,
        hgcn_final_act: bool = False,
        hgconv_kernel_size: Kernel | None = None,
        hgconv_scale: float = 1.0,
        layer_scale_init: float | None = 1e-6,
        mamba_d_state: int = 16,
        mamba_d_conv: int = 4,
        mamba_expand: int = 2,
        mamba_dt_rank: int | str = "auto",
        scan_backend: str | None = None,
        mamba_scan_order: str = "C",
        spatial_dims: int = 3,
        norm: NormSpec = "instance",
        act: ActSpec = "leakyrelu",
        *,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        n = n_stages
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        features = stage_features(features_per_stage, n)
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate!r}")
        kernels = stage_kernels(kernel_sizes, n, spatial_dims)
        stride_list = stage_strides(strides, n, spatial_dims)
        orders = per_stage(hgcn_order, n, "hgcn_order", [s + 2 for s in range(n)])
        if hgconv_kernel_size is not None and any(
            k % 2 == 0 for k in to_tuple(hgconv_kernel_size, spatial_dims, "hgconv_kernel_size")
        ):
            raise ValueError(f"hgconv_kernel_size must be odd on every axis, got {hgconv_kernel_size!r}")
        layer_types = _layer_types(stage_layer_types, n_hgcn_stages, n)
        _check_hgcn_orders(features, orders, layer_types)
        norm_layer, act_layer = get_norm_layer(norm, spatial_dims), get_act_layer(act)

        self.in_channels = in_channels
        self.n_stages = n
        self.spatial_dims = spatial_dims
        self.features_per_stage = features
        self.kernel_sizes = kernels
        self.strides = stride_list
        self.stage_layer_types = tuple(layer_types)
        self.drop_path_rates = tuple(drop_path_rate * s / (n - 1) for s in range(n))
        #: Per-axis downsampling of stage s relative to the input: ``skips[s]`` is ``S // skip_scales[s]``.
        self.skip_scales = cumulative_scales(stride_list)
        #: Every input axis must be a multiple of this (the product of the strides per axis).
        self.size_divisor = self.skip_scales[-1]

        common = dict(spatial_dims=spatial_dims, norm_layer=norm_layer, act_layer=act_layer)
        hgcn_kwargs = dict(
            spatial_dims=spatial_dims,
            layer_scale_init=layer_scale_init,
            gating=gating,
            hgconv_kernel_size=hgconv_kernel_size,
            hgconv_scale=hgconv_scale,
            final_act=hgcn_final_act,
            act_layer=act_layer,
        )
        mamba_kwargs = dict(
            d_state=mamba_d_state,
            d_conv=mamba_d_conv,
            expand=mamba_expand,
            dt_rank=mamba_dt_rank,
            scan_backend=scan_backend,
            scan_order=mamba_scan_order,
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
        self._two_voxels = isinstance(self.encoder_blocks[-1].norm1, _INSTANCE_NORMS)
        if init_weights:
            init_conv_weights_(self, kaiming_slope(self.stem.act))

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *S)``, every axis of ``S`` a multiple of
        ``size_divisor``, with more than one voxel left at the deepest stage (for an instance norm)."""
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
        if self._two_voxels and all(size == d for size, d in zip(spatial, self.size_divisor, strict=True)):
            raise ValueError(
                f"input spatial size {spatial} (input shape {shape}) leaves a single voxel at the "
                "bottleneck, which InstanceNorm cannot normalise; use at least twice "
                f"size_divisor={self.size_divisor} on one axis"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode ``x``.

        Args:
            x: ``(B, in_channels, *S)``, ``S`` a multiple of ``size_divisor``.

        Returns:
            ``n_stages`` feature maps, finest first, ``skips[s]`` of shape
            ``(B, features_per_stage[s], *(S // skip_scales[s]))``.
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
        return skips
