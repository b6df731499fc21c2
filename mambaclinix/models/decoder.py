"""The MambaClinix decoder: residual U-Net decoder with deep-supervision heads over multi-scale features.

Bian et al., arXiv:2409.12533, §3 and Fig. 1 (the decoder of the authors' nnU-Net-based code). It takes
the skip features of :class:`~mambaclinix.models.MambaClinixEncoder`, or of any backbone that returns
feature maps at successively coarser, integer-related resolutions, and is the second half of
:class:`~mambaclinix.models.MambaClinixUNet`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from mambaclinix.layers import (
    BasicBlockD,
    DecoderResBlock,
    UpsampleConv,
    get_act_layer,
    get_norm_layer,
    make_conv,
)
from mambaclinix.layers.factories import ActSpec, NormSpec, check_spatial_dims
from mambaclinix.models._common import (
    Kernel,
    check_positive_int,
    init_conv_weights_,
    kaiming_slope,
    stage_features,
    stage_kernels,
    stage_strides,
)

__all__ = ["MambaClinixDecoder"]


class MambaClinixDecoder(nn.Module):
    """The MambaClinix decoder: from ``n`` skip features (finest first) to logits at ``n - 1`` scales.

    ``bottleneck`` (stride-1 basic block on the deepest feature ``skips[n-1]``); then for each level
    ``t = n-2, ..., 0`` (coarse → fine): ``up_convs[t]`` (nearest upsampling by ``strides[t+1]``, 1×1 conv
    ``C_{t+1} → C_t``), ``skip_blocks[t]`` (stride-1 basic block on ``skips[t]``), ``decoder_blocks[t]``
    (residual block on ``cat([up, skip])``, ``2 C_t → C_t``) and ``heads[t]`` (1×1 conv
    ``C_t → out_channels``). All lists are indexed by the level ``t`` (0 = finest), so ``heads[t]``
    produces ``output[t]``. The parameter names are those of the decoder half of
    :class:`~mambaclinix.models.MambaClinixUNet`.

    Input: a sequence of ``n = len(features_per_stage)`` tensors, finest first, ``skips[t]`` of shape
    ``(B, features_per_stage[t], *S_t)`` with ``S_t = S_{t+1} * strides[t+1]`` on every axis (what
    :class:`~mambaclinix.models.MambaClinixEncoder` returns, or the features of another backbone; with
    an instance norm the deepest needs more than one voxel). ``strides[0]`` is not used: it is the
    downsampling in front of the finest skip, which the decoder does not undo.

    Output: logits (no softmax). With ``deep_supervision`` a list of ``n - 1`` tensors, finest first,
    ``output[t]`` of shape ``(B, out_channels, *S_t)``; without it the finest map ``(B, out_channels, *S_0)``.
    The heads of the coarser levels exist either way, and ``deep_supervision`` may be switched after
    construction.

    Init: Kaiming-normal on every conv weight (``a`` = the LeakyReLU slope) and zero conv biases.

    Args:
        features_per_stage: Channels ``C_t`` of the skip features, finest first (at least two).
        out_channels: Output classes (background included).
        strides: Per-stage strides of the backbone, one entry (int or per-axis tuple) per skip: the
            upsampling from level ``t + 1`` to ``t`` is ``strides[t+1]``; default ``1, 2, 2, ...``.
        kernel_sizes: Odd kernel per level (one int for all, or one entry per skip); level ``t`` uses
            ``kernel_sizes[t]``, the bottleneck the last; default 3.
        spatial_dims: 3 (volumes) or 2 (slices).
        deep_supervision: Return the logits of every level (see above).
        norm: Normalisation, see :func:`~mambaclinix.layers.get_norm_layer`; default InstanceNorm(eps 1e-5,
            affine).
        act: Activation, see :func:`~mambaclinix.layers.get_act_layer`; default LeakyReLU(0.01).
        init_weights: Kaiming-initialise the convolutions; ``False`` keeps PyTorch's default initialisation.
    """

    def __init__(
        self,
        features_per_stage: Sequence[int],
        out_channels: int,
        strides: Sequence[Kernel] | None = None,
        kernel_sizes: int | Sequence[Kernel] | None = None,
        spatial_dims: int = 3,
        deep_supervision: bool = True,
        norm: NormSpec = "instance",
        act: ActSpec = "leakyrelu",
        *,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("out_channels", out_channels)
        if not isinstance(features_per_stage, Sequence) or isinstance(features_per_stage, str):
            raise ValueError(f"features_per_stage must be a sequence of channels, got {features_per_stage!r}")
        n = len(features_per_stage)
        if n < 2:
            raise ValueError(f"features_per_stage needs at least two stages, got {features_per_stage!r}")
        features = stage_features(features_per_stage, n)
        kernels = stage_kernels(kernel_sizes, n, spatial_dims)
        stride_list = stage_strides(strides, n, spatial_dims)
        norm_layer, act_layer = get_norm_layer(norm, spatial_dims), get_act_layer(act)

        self.features_per_stage = features
        self.out_channels = out_channels
        self.n_stages = n
        self.strides = stride_list
        self.kernel_sizes = kernels
        self.spatial_dims = spatial_dims
        self.deep_supervision = deep_supervision

        common = dict(spatial_dims=spatial_dims, norm_layer=norm_layer, act_layer=act_layer)
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
        if init_weights:
            init_conv_weights_(self, kaiming_slope(self.bottleneck.act))

    def check_skips(self, skips: Sequence[torch.Tensor]) -> None:
        """Raise ``ValueError`` unless ``skips`` are ``n_stages`` tensors ``(B, features_per_stage[t], *S_t)``
        with ``S_t = S_{t+1} * strides[t+1]``."""
        if isinstance(skips, torch.Tensor) or len(skips) != self.n_stages:
            got = f"a tensor of shape {tuple(skips.shape)}" if isinstance(skips, torch.Tensor) else len(skips)
            raise ValueError(
                f"expected a sequence of {self.n_stages} skip features (finest first), got {got}"
            )
        shapes = [tuple(s.shape) for s in skips]
        for t, (shape, c) in enumerate(zip(shapes, self.features_per_stage, strict=True)):
            if len(shape) != self.spatial_dims + 2 or shape[1] != c or shape[0] != shapes[0][0]:
                raise ValueError(
                    f"skips[{t}] must be (B, {c}, <{self.spatial_dims} spatial axes>) with the batch of "
                    f"skips[0]; got shapes {shapes}"
                )
        for t in range(self.n_stages - 1):
            expected = tuple(s * f for s, f in zip(shapes[t + 1][2:], self.strides[t + 1], strict=True))
            if shapes[t][2:] != expected:
                raise ValueError(
                    f"skips[{t}] must have the spatial size of skips[{t + 1}] times strides[{t + 1}]="
                    f"{self.strides[t + 1]}, i.e. {expected}; got shapes {shapes}"
                )

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decode the skip features.

        Args:
            skips: ``n_stages`` tensors, finest first, ``skips[t]`` of shape
                ``(B, features_per_stage[t], *S_t)``.

        Returns:
            With ``deep_supervision``: ``n_stages - 1`` logit maps, finest first, ``output[t]`` of shape
            ``(B, out_channels, *S_t)``. Without: the finest map only.
        """
        self.check_skips(skips)
        x = self.bottleneck(skips[-1])
        logits = []
        for t in range(self.n_stages - 2, -1, -1):
            up = self.up_convs[t](x)
            x = self.decoder_blocks[t](torch.cat([up, self.skip_blocks[t](skips[t])], dim=1))
            if self.deep_supervision or t == 0:
                logits.append(self.heads[t](x))
        return logits[::-1] if self.deep_supervision else logits[0]
