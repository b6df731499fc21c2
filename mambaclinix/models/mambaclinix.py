"""MambaClinix U-Net: the encoder (HGCN blocks in the shallow stages, residual Mamba layers in the deep ones)
and the residual decoder with deep supervision, and the registered presets.

Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for Enhanced 3D Medical
Image Segmentation", arXiv:2409.12533, §3 and Fig. 1. The topology and initialisation follow the authors'
code (the paper default); the figure's variants are options.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn as nn

from mambaclinix.layers.factories import ActSpec, NormSpec
from mambaclinix.models._common import Kernel, check_positive_int, init_conv_weights_, kaiming_slope
from mambaclinix.models.decoder import MambaClinixDecoder
from mambaclinix.models.encoder import STAGE_LAYER_TYPES, MambaClinixEncoder
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

# The layers of each part, in the order the U-Net registers them (the order of its state dict).
_PART_LAYERS = {
    "encoder": ("stem", "encoder_blocks", "stage_layers", "junction_norm"),
    "decoder": ("bottleneck", "skip_blocks", "up_convs", "decoder_blocks", "heads"),
}
_PART_OF_LAYER = {name: part for part, names in _PART_LAYERS.items() for name in names}
# Configuration the U-Net reports from its encoder.
_ENCODER_ATTRS = (
    "in_channels",
    "n_stages",
    "spatial_dims",
    "features_per_stage",
    "kernel_sizes",
    "strides",
    "stage_layer_types",
    "drop_path_rates",
    "junction_stage",
    "size_divisor",
)


def _legacy_norm_act(norm, act, norm_eps: float | None, negative_slope: float | None) -> tuple:
    """The former ``norm_eps`` / ``negative_slope`` arguments, as keyword arguments of ``norm`` / ``act``."""
    if norm_eps is not None:
        warnings.warn(
            "norm_eps is deprecated; use norm=('instance', {'eps': ...})", DeprecationWarning, stacklevel=3
        )
        norm = (norm, {"eps": norm_eps})
    if negative_slope is not None:
        warnings.warn(
            "negative_slope is deprecated; use act=('leakyrelu', {'negative_slope': ...})",
            DeprecationWarning,
            stacklevel=3,
        )
        act = (act, {"negative_slope": negative_slope})
    return norm, act


class MambaClinixUNet(nn.Module):
    """The MambaClinix U-Net (arXiv:2409.12533 §3, Fig. 1): :class:`MambaClinixEncoder` followed by
    :class:`MambaClinixDecoder`.

    Encoder (``model.encoder``): ``stem`` (Conv(k_0) → IN → LReLU, ``in_channels → C_0``); for every stage
    ``s`` a ResNet-D basic block ``encoder_blocks[s]`` (stride ``strides[s]``) followed by
    ``stage_layers[s]``: an :class:`~mambaclinix.layers.HGCNBlock` (order ``s + 2``, DropPath
    ``linspace(0, drop_path_rate, n)[s]``) for ``s < n_hgcn_stages`` (the adaptive stage-wise rule, default
    ``ceil(n / 2)``), a residual :class:`~mambaclinix.layers.MambaLayer` otherwise. ``junction_norm``
    (channel LayerNorm, eps 1e-6) sits between the basic block and the HGCN block of the last HGCN stage
    only (``junction_stage``). It returns the ``n`` stage outputs (skip features), finest first.

    Decoder (``model.decoder``): ``bottleneck`` (stride-1 basic block on the deepest feature); then for each
    level ``t = n-2, ..., 0`` (coarse → fine): ``up_convs[t]`` (nearest upsampling by ``strides[t+1]``,
    1×1 conv ``C_{t+1} → C_t``), ``skip_blocks[t]`` (stride-1 basic block on the skip ``F_t``),
    ``decoder_blocks[t]`` (residual block on ``cat([up, skip])``, ``2 C_t → C_t``) and ``heads[t]``
    (1×1 conv ``C_t → out_channels``). All decoder lists are indexed by the level ``t`` (0 = finest),
    so ``heads[t]`` produces ``output[t]``.

    How the parts are held: the U-Net registers the layers of both parts under its own names (``stem``,
    ``encoder_blocks``, ..., ``heads``), so its parameter names and state-dict keys are the flat ones its
    checkpoints have always had, and equal to the parts' own keys: checkpoints move between the U-Net and
    a stand-alone encoder or decoder without renaming. ``model.encoder`` and ``model.decoder`` are the
    part modules themselves, sharing those layers, but they are not registered as children (that would
    give every parameter a second name in ``state_dict``). So ``.to()``, ``.half()``, ``apply``,
    ``deepcopy``, pickling, DDP and ``torch.compile`` see each parameter exactly once, ``train()`` and
    ``eval()`` also set the parts' flags, and ``forward`` calls the two parts, so hooks registered on them
    fire. A layer replaced through the U-Net (``model.bottleneck = wrapped``, as activation-checkpointing
    and FSDP wrappers do) is replaced in its part too. The alternatives either rename every key
    (``encoder.stem.*``, as dynamic-network-architectures' ``PlainConvUNet`` has them), which breaks
    existing checkpoints, or rename them back with state-dict hooks, which leaves ``named_parameters`` and
    ``state_dict`` disagreeing.

    Output convention: logits (no softmax). With ``deep_supervision`` a list of ``n_stages - 1`` tensors,
    finest first: ``output[t]`` has shape ``(B, out_channels, *(S // output_scales[t]))``; without it the
    finest map only, ``(B, out_channels, *(S // output_scales[0]))`` (``S`` itself for the default stride-1
    first stage). The heads of the coarser levels exist either way (the parameter count does not change),
    and ``deep_supervision`` may be switched after construction (e.g. off for inference).

    Input: ``(B, in_channels, *S)`` with every axis of ``S`` divisible by ``size_divisor`` (the product of
    the strides per axis) and, with an instance norm, a bottleneck of more than one voxel; otherwise
    ``forward`` raises ``ValueError``.

    Init: Kaiming-normal on every conv weight (``a`` = the LeakyReLU slope, 0.01 by default) and zero conv
    biases, except inside the Mamba layers, which keep Mamba's own initialisation.

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
        norm: Normalisation of the stem and of the basic and residual blocks: a name (``"instance"``,
            ``"batch"``, ``"group"``, ``"layer"``), a class, a partial or ``(name, kwargs)``, e.g.
            ``("group", {"num_groups": 8})``, see :func:`~mambaclinix.layers.get_norm_layer`; default the
            paper's InstanceNorm(eps 1e-5, affine). The channel LayerNorms of the HGCN blocks and of the
            junction are part of the design and stay.
        act: Activation of those blocks and of the HGCN blocks, as :func:`~mambaclinix.layers.get_act_layer`
            takes it (``"relu"``, ``"gelu"``, ``("leakyrelu", {"negative_slope": 0.1})``, ...); default
            LeakyReLU(0.01).
        norm_eps: Deprecated: ``norm=("instance", {"eps": norm_eps})``.
        negative_slope: Deprecated: ``act=("leakyrelu", {"negative_slope": negative_slope})``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_stages: int = 6,
        features_per_stage: Sequence[int] | None = None,
        kernel_sizes: int | Sequence[Kernel] | None = None,
        strides: Sequence[Kernel] | None = None,
        deep_supervision: bool = True,
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
        norm_eps: float | None = None,
        negative_slope: float | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("out_channels", out_channels)
        norm, act = _legacy_norm_act(norm, act, norm_eps, negative_slope)
        # Both parts are built first and then initialised together in the order of the layers, so that a
        # seeded U-Net gets the same weights as in earlier versions (tests/test_model_state_compat.py).
        encoder = MambaClinixEncoder(
            in_channels,
            n_stages=n_stages,
            features_per_stage=features_per_stage,
            kernel_sizes=kernel_sizes,
            strides=strides,
            gating=gating,
            hgcn_order=hgcn_order,
            drop_path_rate=drop_path_rate,
            n_hgcn_stages=n_hgcn_stages,
            stage_layer_types=stage_layer_types,
            hgcn_final_act=hgcn_final_act,
            hgconv_kernel_size=hgconv_kernel_size,
            hgconv_scale=hgconv_scale,
            layer_scale_init=layer_scale_init,
            mamba_d_state=mamba_d_state,
            mamba_d_conv=mamba_d_conv,
            mamba_expand=mamba_expand,
            mamba_dt_rank=mamba_dt_rank,
            scan_backend=scan_backend,
            mamba_scan_order=mamba_scan_order,
            spatial_dims=spatial_dims,
            norm=norm,
            act=act,
            init_weights=False,
        )
        decoder = MambaClinixDecoder(
            encoder.features_per_stage,
            out_channels,
            strides=encoder.strides,
            kernel_sizes=encoder.kernel_sizes,
            spatial_dims=spatial_dims,
            deep_supervision=deep_supervision,
            norm=norm,
            act=act,
            init_weights=False,
        )
        parts = {"encoder": encoder, "decoder": decoder}
        for part, names in _PART_LAYERS.items():
            for name in names:
                setattr(self, name, getattr(parts[part], name))
        for part, module in parts.items():  # the parts themselves, outside _modules (see the docstring)
            object.__setattr__(self, part, module)
        for name in _ENCODER_ATTRS:
            setattr(self, name, getattr(encoder, name))
        self.out_channels = out_channels
        #: Per-axis downsampling of level t relative to the input: ``output[t]`` is ``S // output_scales[t]``.
        self.output_scales = encoder.skip_scales[:-1]
        init_conv_weights_(self, kaiming_slope(self.stem.act))

    @property
    def deep_supervision(self) -> bool:
        """Return every decoder level's logits (finest first) instead of the finest map; switchable."""
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, value: bool) -> None:
        self.decoder.deep_supervision = value

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        part = _PART_OF_LAYER.get(name)
        if part is not None and part in self.__dict__:  # a layer replaced after construction
            setattr(self.__dict__[part], name, value)

    def train(self, mode: bool = True) -> MambaClinixUNet:
        super().train(mode)
        self.encoder.training = self.decoder.training = mode
        return self

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *S)``, every axis of ``S`` a multiple of
        ``size_divisor``, with more than one voxel left at the bottleneck (for an instance norm)."""
        self.encoder.check_input_shape(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x``.

        Args:
            x: ``(B, in_channels, *S)``, ``S`` a multiple of ``size_divisor``.

        Returns:
            With ``deep_supervision``: ``n_stages - 1`` logit maps, finest first, ``output[t]`` of shape
            ``(B, out_channels, *(S // output_scales[t]))``. Without: the finest map only.
        """
        return self.decoder(self.encoder(x))


def _build(defaults: dict, kwargs: dict) -> MambaClinixUNet:
    return MambaClinixUNet(**{**defaults, **kwargs})


@register_model
def mambaclinix_paper(**kwargs) -> MambaClinixUNet:
    """Paper default: 6 stages (32..320 channels), 1 → 14 classes (abdominal CT); 48,883,846 parameters."""
    return _build(dict(in_channels=1, out_channels=14, n_stages=6), kwargs)


@register_model
def mambaclinix_5stage(**kwargs) -> MambaClinixUNet:
    """5 stages (32..320 channels), 1 → 2 classes; about 28.43 M parameters."""
    return _build(dict(in_channels=1, out_channels=2, n_stages=5), kwargs)


@register_model
def mambaclinix_7stage(**kwargs) -> MambaClinixUNet:
    """7 stages (32..320 channels), 1 → 4 classes; about 71.58 M parameters."""
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
