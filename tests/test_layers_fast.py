"""The CPU fast paths of the layer library against plain references: the channels-last depthwise conv of
hgConv and the matrix-product 1×1 convs against ``nn.Conv3d``, and the fused channel LayerNorm against the
mean/variance formula, on outputs and gradients (float64, so any difference is a bug, not rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mambaclinix.layers import HgConv, LayerNormChannels
from mambaclinix.layers.blocks import pointwise_conv
from mambaclinix.layers.hgconv import depthwise_conv


@pytest.mark.parametrize("kernel", [3, (1, 3, 3), 5])
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv_fast_path_matches_conv3d(kernel, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(6, 6, kernel, padding=tuple(k // 2 for k in nn.modules.utils._triple(kernel)), groups=6,
                     bias=bias).double()  # fmt: skip
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64)
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref, [x, *conv.parameters()], g)
    out = depthwise_conv(x, conv)
    grads = torch.autograd.grad(out, [x, *conv.parameters()], g)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_depthwise_conv_fast_path_float32_and_input_views():
    """A channel slice of a larger tensor (as hgConv passes it) in float32."""
    torch.manual_seed(1)
    conv = nn.Conv3d(4, 4, 3, padding=1, groups=4)
    big = torch.randn(2, 7, 6, 6, 6, requires_grad=True)
    x = big[:, 3:]
    ref_grads = torch.autograd.grad(conv(x).square().sum(), [big, conv.weight, conv.bias])
    grads = torch.autograd.grad(depthwise_conv(x, conv).square().sum(), [big, conv.weight, conv.bias])
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_other_cases_use_the_module():
    conv = nn.Conv3d(4, 4, 3, padding=1, groups=4, stride=2)  # strided: not the fast path's contract
    x = torch.randn(1, 4, 6, 6, 6)
    torch.testing.assert_close(depthwise_conv(x, conv), conv(x))


@pytest.mark.parametrize("gating", ["add", "mul"])
def test_hgconv_gradients_unchanged_by_fast_path(gating):
    """The whole hgConv with the fast depthwise conv against the same module run through nn.Conv3d."""
    torch.manual_seed(2)
    m = HgConv(8, order=3, gating=gating).double()
    x = torch.randn(2, 8, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    out = m(x)
    grads = torch.autograd.grad(out.sin().sum(), [x, *m.parameters()])
    import mambaclinix.layers.hgconv as mod

    orig = mod.depthwise_conv
    orig_pw = mod.pointwise_conv
    mod.depthwise_conv = mod.pointwise_conv = lambda t, conv: conv(t)
    try:
        ref = m(x)
        ref_grads = torch.autograd.grad(ref.sin().sum(), [x, *m.parameters()])
    finally:
        mod.depthwise_conv, mod.pointwise_conv = orig, orig_pw
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 6), (3, 5, 4, 4), (4, 5)])
def test_channel_layernorm_matches_formula(shape):
    torch.manual_seed(3)
    norm = LayerNormChannels(5, eps=1e-3).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
        norm.bias.copy_(torch.randn(5))
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    view = (1, -1) + (1,) * (x.dim() - 2)

    def formula(t):
        mean = t.mean(1, keepdim=True)
        var = ((t - mean) ** 2).mean(1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-3) * norm.weight.view(view) + norm.bias.view(view)

    out, ref = norm(x), formula(x)
    assert out.is_contiguous() and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, [x, *norm.parameters()], g),
                    torch.autograd.grad(ref, [x, *norm.parameters()], g), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [2, 3])
def test_pointwise_conv_fast_path_matches_conv(bias, dims):
    torch.manual_seed(4)
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(6, 5, 1, bias=bias).double()
    shape = (3, 6, 4, 5, 6)[: dims + 2]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn((3, 5, *shape[2:]), dtype=torch.float64)
    ref = conv(x)
    out = pointwise_conv(x, conv)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    params = [x, *conv.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pointwise_conv_non_contiguous_input_and_other_convs():
    torch.manual_seed(5)
    conv = nn.Conv3d(4, 3, 1)
    x = torch.randn(2, 7, 5, 5, 5)[:, 2:6]  # a channel slice, as hgConv's split produces
    torch.testing.assert_close(pointwise_conv(x, conv), conv(x), rtol=1e-5, atol=1e-6)
    strided = nn.Conv3d(4, 3, 1, stride=2)
    torch.testing.assert_close(pointwise_conv(x, strided), strided(x))
    dense = nn.Conv3d(4, 3, 3, padding=1)
    torch.testing.assert_close(pointwise_conv(x, dense), dense(x))


def test_blocks_unchanged_by_fast_paths():
    """Decoder and encoder blocks (1×1 shortcuts, upsampling conv) against the same modules called plainly."""
    import mambaclinix.layers.blocks as blocks

    torch.manual_seed(6)
    mods = [blocks.DecoderResBlock(8, 4), blocks.BasicBlockD(4, 8, stride=2), blocks.UpsampleConv(8, 4, 2)]
    for m in mods:
        m.double()
        x = torch.randn(2, m.conv1.in_channels if hasattr(m, "conv1") else 8, 4, 4, 4, dtype=torch.float64)
        x.requires_grad_()
        out = m(x)
        grads = torch.autograd.grad(out.sin().sum(), [x, *m.parameters()])
        orig = blocks.pointwise_conv
        blocks.pointwise_conv = lambda t, conv: conv(t)
        try:
            ref = m(x)
            ref_grads = torch.autograd.grad(ref.sin().sum(), [x, *m.parameters()])
        finally:
            blocks.pointwise_conv = orig
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
