"""The MAC counter of the benchmarks against hand counts: the paper preset at 1×1×128³ against its hand
count, nnU-Net's PlainConvUNet against an analytic sum over its layers, and what the counter does and
does not count. Everything runs on the meta device (no compute)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _flops import SCAN_FLOPS_PER_ELEMENT, count_macs  # noqa: E402

from mambaclinix.models import create_model  # noqa: E402

FEATURES = (32, 64, 128, 256, 320, 320)
CLASSES = 14


def test_paper_preset_macs_match_the_hand_count():
    """About 928 G MACs at 1×1×128³ (conv ≈ 925, linear ≈ 2.5, scan ≈ 0.1), summed by hand per layer."""
    macs = count_macs(lambda: create_model("mambaclinix_paper"), (1, 1, 128, 128, 128))
    assert macs["total"] == pytest.approx(928e9, rel=0.01)
    assert macs["conv"] == pytest.approx(925e9, rel=0.01)
    assert 2.0e9 < macs["matmul"] < 3.0e9
    # the scan term by hand: Mamba at stages 3, 4, 5 (16³, 8³, 4³ tokens; E = 2·256, 2·320, 2·320; N = 16)
    elems = sum(tokens**3 * e * 16 for tokens, e in ((16, 512), (8, 640), (4, 640)))
    assert macs["scan"] == SCAN_FLOPS_PER_ELEMENT * elems / 2


def plain_conv_unet_macs(size: int, features=FEATURES, in_channels=1, classes=CLASSES, n_conv=2) -> int:
    """Hand count of nnU-Net's PlainConvUNet forward (3×3×3 convs, strides 1, 2, 2, ..., no deep supervision).

    Encoder stage s at edge ``size / 2**s``: the first conv ``c_{s-1} → c_s`` (strided), then
    ``n_conv - 1`` convs ``c_s → c_s``. Decoder level t (coarse to fine): a transposed conv with kernel =
    stride = 2 (each of the ``n_t`` output voxels receives ``c_{t+1}·c_t`` MACs), a conv on the concatenation
    ``2 c_t → c_t`` and ``n_conv - 1`` convs ``c_t → c_t``; finally the 1×1×1 head ``c_0 → classes``.
    Biases are additions, not MACs.
    """
    total, c_in = 0, in_channels
    for s, c in enumerate(features):
        n = (size // 2**s) ** 3
        total += n * 27 * c_in * c + (n_conv - 1) * n * 27 * c * c
        c_in = c
    for t in range(len(features) - 2, -1, -1):
        n, c, c_up = (size // 2**t) ** 3, features[t], features[t + 1]
        total += n * c_up * c + n * 27 * 2 * c * c + (n_conv - 1) * n * 27 * c * c
    return total + size**3 * features[0] * classes


def plain_conv_unet_params(features=FEATURES, in_channels=1, classes=CLASSES, n_conv=2) -> int:
    """Hand count of its parameters: conv weights + biases, InstanceNorm affine (2 per channel), all heads."""
    conv = lambda ci, co, k: ci * co * k + co  # noqa: E731
    total, c_in = 0, in_channels
    for c in features:
        total += conv(c_in, c, 27) + (n_conv - 1) * conv(c, c, 27) + n_conv * 2 * c
        c_in = c
    for t in range(len(features) - 1):
        c, c_up = features[t], features[t + 1]
        total += conv(c_up, c, 8) + conv(2 * c, c, 27) + (n_conv - 1) * conv(c, c, 27) + n_conv * 2 * c
        total += conv(c, classes, 1)
    return total


class _ConvNormAct(nn.Sequential):
    def __init__(self, c_in, c_out, stride):
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, stride, 1),
            nn.InstanceNorm3d(c_out, eps=1e-5, affine=True),
            nn.LeakyReLU(),
        )


class PlainConvUNetEquivalent(nn.Module):
    """The PlainConvUNet of dynamic-network-architectures as nnU-Net configures it (2 convs per stage,
    transposed-conv upsampling, one head per decoder level, only the finest used), for when that package
    is not installed. Its parameter count and MACs are checked against the package's where it is."""

    def __init__(self, features=FEATURES, in_channels=1, classes=CLASSES):
        super().__init__()
        self.encoder = nn.ModuleList()
        c_in = in_channels
        for s, c in enumerate(features):
            self.encoder.append(
                nn.Sequential(_ConvNormAct(c_in, c, 1 if s == 0 else 2), _ConvNormAct(c, c, 1))
            )
            c_in = c
        n = len(features)
        self.up = nn.ModuleList(nn.ConvTranspose3d(features[t + 1], features[t], 2, 2) for t in range(n - 1))
        self.decoder = nn.ModuleList(
            nn.Sequential(
                _ConvNormAct(2 * features[t], features[t], 1), _ConvNormAct(features[t], features[t], 1)
            )
            for t in range(n - 1)
        )
        self.heads = nn.ModuleList(nn.Conv3d(features[t], classes, 1) for t in range(n - 1))

    def forward(self, x):
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for t in range(len(self.up) - 1, -1, -1):
            x = self.decoder[t](torch.cat([self.up[t](x), skips[t]], dim=1))
        return self.heads[0](x)


def _dna_plain_unet():
    from _zoo import build_model

    return build_model("nnunet_plain", (128, 128, 128))


def _has_dna() -> bool:
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("size", [64, 128])
def test_plain_conv_unet_macs_match_hand_count(size):
    build = _dna_plain_unet if _has_dna() else PlainConvUNetEquivalent
    macs = count_macs(build, (1, 1, size, size, size))
    assert macs["conv"] == macs["total"]
    assert macs["total"] == pytest.approx(plain_conv_unet_macs(size), rel=0.01)


def test_plain_conv_unet_equivalent_matches_package():
    with torch.device("meta"):
        ours = PlainConvUNetEquivalent()
    assert sum(p.numel() for p in ours.parameters()) == plain_conv_unet_params()
    if not _has_dna():
        return  # the hand counts above are the reference; the package comparison needs it installed
    with torch.device("meta"):
        theirs = _dna_plain_unet()
    assert sum(p.numel() for p in theirs.parameters()) == plain_conv_unet_params()
    shape = (1, 1, 64, 64, 64)
    assert count_macs(PlainConvUNetEquivalent, shape) == count_macs(_dna_plain_unet, shape)


def test_counter_counts_depthwise_and_matmul_but_not_norms():
    """What the docs say the counter counts: grouped convs by their true MACs, linear layers, no norms."""
    depthwise = lambda: nn.Conv3d(8, 8, 3, padding=1, groups=8)  # noqa: E731
    assert count_macs(depthwise, (2, 8, 4, 4, 4))["conv"] == 2 * 8 * 27 * 64
    linear = lambda: nn.Linear(16, 32)  # noqa: E731
    assert count_macs(linear, (3, 5, 16))["matmul"] == 3 * 5 * 16 * 32
    norm_act = lambda: nn.Sequential(nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(), nn.LayerNorm(4))  # noqa: E731
    assert count_macs(norm_act, (2, 8, 4, 4, 4))["total"] == 0
    # the scan: counted analytically, once per Mamba layer call
    macs = count_macs(lambda: create_model("mambaclinix_tiny"), (1, 1, 16, 16, 16))
    tokens = [math.prod((16 // 2**s,) * 3) for s in (2, 3)]  # Mamba at stages 2, 3 of the tiny preset
    assert macs["scan"] == SCAN_FLOPS_PER_ELEMENT * sum(t * 32 * 16 for t in tokens) / 2
