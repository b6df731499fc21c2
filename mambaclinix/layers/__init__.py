"""Building blocks of MambaClinix: small ``nn.Module``s that never import :mod:`mambaclinix.models`."""

from mambaclinix.layers.blocks import (
    BasicBlockD,
    ConvNormAct,
    DecoderResBlock,
    UpsampleConv,
    conv_type,
    get_act_layer,
    get_norm_layer,
    make_conv,
    pool_type,
    same_padding,
    to_tuple,
)
from mambaclinix.layers.drop import DropPath, drop_path
from mambaclinix.layers.hgconv import GATINGS, HGCNBlock, HgConv, hgconv_widths
from mambaclinix.layers.mamba import Mamba, MambaLayer
from mambaclinix.layers.norm import LayerNormChannels

__all__ = [
    "BasicBlockD",
    "ConvNormAct",
    "DecoderResBlock",
    "DropPath",
    "GATINGS",
    "HGCNBlock",
    "HgConv",
    "LayerNormChannels",
    "Mamba",
    "MambaLayer",
    "UpsampleConv",
    "conv_type",
    "drop_path",
    "get_act_layer",
    "get_norm_layer",
    "hgconv_widths",
    "make_conv",
    "pool_type",
    "same_padding",
    "to_tuple",
]
