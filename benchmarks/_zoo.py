"""The architectures compared in the model benchmarks, each configured as its authors' recipe would.

Every model maps ``(B, 1, *patch)`` to ``(B, 14, *patch)`` logits (one input modality, 13 organs +
background, the abdominal-CT setting of the MambaClinix paper) and returns a single full-resolution map:
deep supervision is off for all of them so that every model runs the same loss on the same output (the
deep-supervision heads of MambaClinix and nnU-Net are 1×1×1 convs and cost under 0.2 % of the MACs).

==========================  ========================================================================
name                        configuration
==========================  ========================================================================
``mambaclinix``             ``create_model("mambaclinix_paper")``: 6 stages 32..320, HGCN at 0-2,
                            Mamba at 3-5, gating "add" (48,883,846 parameters)
``mambaclinix_mul``         the same with ``gating="mul"`` (HorNet's gnConv combination)
``mambaclinix_no_mamba``    the same with ``stage_layer_types=("hgcn",)*3 + ("none",)*3``: the deep
                            stages keep their residual block only
``nnunet_plain``            dynamic-network-architectures ``PlainConvUNet`` as nnU-Net's 3d_fullres plan
                            builds it for an isotropic 128³ patch: 6 stages, features 32, 64, 128, 256,
                            320, 320, kernels 3, strides 1, 2, 2, 2, 2, 2, 2 convs per encoder and
                            decoder stage, conv bias, InstanceNorm3d(eps 1e-5, affine), LeakyReLU(0.01)
``nnunet_resenc_m``         ``ResidualEncoderUNet`` as nnU-Net's ResEnc-M plan: the same topology with
                            1, 3, 4, 6, 6, 6 BasicBlockD per encoder stage and 1 conv per decoder stage
``swinunetr``               MONAI ``SwinUNETR(feature_size=48)`` (the BTCV configuration of its paper);
                            patch axes must be multiples of 32
``segresnet``               MONAI ``SegResNet(init_filters=32, blocks_down=(1, 2, 2, 4),
                            blocks_up=(1, 1, 1))``; axes multiples of 8
``unetr``                   MONAI ``UNETR(img_size=patch, feature_size=16, hidden_size=768,
                            mlp_dim=3072, num_heads=12, proj_type="conv", res_block=True)``: built for
                            one patch size (its position embedding has one entry per 16³ patch)
==========================  ========================================================================

``dynamic-network-architectures`` and ``monai`` are optional (``pip install "mambaclinix[bench]"``); a model
whose package is missing or that cannot take a patch size raises :class:`Unavailable` with the reason,
which the benchmark prints in its table instead of dropping the row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from mambaclinix.models import create_model

IN_CHANNELS = 1
NUM_CLASSES = 14
FEATURES = (32, 64, 128, 256, 320, 320)
STRIDES = (1, 2, 2, 2, 2, 2)
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6)

#: Benchmark order; the baseline of every ratio is ``nnunet_plain``.
MODELS = (
    "mambaclinix",
    "mambaclinix_mul",
    "mambaclinix_no_mamba",
    "nnunet_plain",
    "nnunet_resenc_m",
    "swinunetr",
    "segresnet",
    "unetr",
)
BASELINE = "nnunet_plain"

#: Each axis of the patch must be a multiple of this.
DIVISOR = {
    "mambaclinix": 32,
    "mambaclinix_mul": 32,
    "mambaclinix_no_mamba": 32,
    "nnunet_plain": 32,
    "nnunet_resenc_m": 32,
    "swinunetr": 32,
    "segresnet": 8,
    "unetr": 16,
}


class Unavailable(RuntimeError):
    """A model that cannot be built here (missing package) or for this patch size."""


def nnunet_kwargs() -> dict:
    """The arguments nnU-Net's 3d_fullres plan passes to dynamic-network-architectures (isotropic patch)."""
    return dict(
        input_channels=IN_CHANNELS,
        n_stages=len(FEATURES),
        features_per_stage=list(FEATURES),
        conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * len(FEATURES),
        strides=[[s] * 3 for s in STRIDES],
        num_classes=NUM_CLASSES,
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    )


def _dna():
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError as e:
        raise Unavailable("needs dynamic-network-architectures (pip install 'mambaclinix[bench]')") from e
    return unet


def _monai_nets():
    try:
        from monai.networks import nets
    except ImportError as e:
        raise Unavailable("needs monai (pip install 'mambaclinix[bench]')") from e
    return nets


def build_model(name: str, patch: Sequence[int]) -> nn.Module:
    """Build benchmark model ``name`` for input patches of size ``patch`` (D, H, W).

    Raises:
        Unavailable: the model's package is missing or ``patch`` is not a multiple of its divisor.
        ValueError: unknown ``name``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {MODELS}")
    patch = tuple(int(p) for p in patch)
    div = DIVISOR[name]
    if any(p % div for p in patch):
        raise Unavailable(f"patch {patch} not a multiple of {div} per axis")
    if name.startswith("mambaclinix"):
        extra: dict = {}
        if name == "mambaclinix_mul":
            extra["gating"] = "mul"
        elif name == "mambaclinix_no_mamba":
            extra["stage_layer_types"] = ("hgcn",) * 3 + ("none",) * 3
        return create_model(
            "mambaclinix_paper",
            in_channels=IN_CHANNELS,
            out_channels=NUM_CLASSES,
            deep_supervision=False,
            **extra,
        )
    if name == "nnunet_plain":
        return _dna().PlainConvUNet(
            n_conv_per_stage=[2] * len(FEATURES), n_conv_per_stage_decoder=[2] * (len(FEATURES) - 1),
            **nnunet_kwargs(),
        )  # fmt: skip
    if name == "nnunet_resenc_m":
        return _dna().ResidualEncoderUNet(
            n_blocks_per_stage=list(RESENC_M_BLOCKS), n_conv_per_stage_decoder=[1] * (len(FEATURES) - 1),
            **nnunet_kwargs(),
        )  # fmt: skip
    nets = _monai_nets()
    if name == "swinunetr":
        return nets.SwinUNETR(
            in_channels=IN_CHANNELS, out_channels=NUM_CLASSES, feature_size=48, spatial_dims=3
        )
    if name == "segresnet":
        return nets.SegResNet(
            spatial_dims=3, init_filters=32, in_channels=IN_CHANNELS, out_channels=NUM_CLASSES,
            blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
        )  # fmt: skip
    return nets.UNETR(
        in_channels=IN_CHANNELS, out_channels=NUM_CLASSES, img_size=patch, feature_size=16, hidden_size=768,
        mlp_dim=3072, num_heads=12, proj_type="conv", norm_name="instance", res_block=True,
    )  # fmt: skip
