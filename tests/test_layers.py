"""Layer tests against hand computations written here with plain torch.nn.functional."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaclinix.layers import (
    BasicBlockD,
    ConvNormAct,
    DecoderResBlock,
    DropPath,
    HGCNBlock,
    HgConv,
    LayerNormChannels,
    UpsampleConv,
    get_act_layer,
    get_norm_layer,
    hgconv_widths,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise(module: nn.Module) -> nn.Module:
    """Give every parameter random values so affine terms and biases are actually exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


# ---------------------------------------------------------------- channel LayerNorm
@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 5), (2, 6, 7, 5), (3, 6)])
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_channel_layernorm_matches_functional_layer_norm(shape, eps):
    norm = _randomise(LayerNormChannels(6, eps=eps))
    x = torch.randn(shape) * 3 + 1
    perm = (0, *range(2, x.dim()), 1)  # channels last
    inv = (0, x.dim() - 1, *range(1, x.dim() - 1))
    expected = F.layer_norm(x.permute(perm), (6,), norm.weight, norm.bias, eps).permute(inv)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_channel_layernorm_init_and_errors():
    norm = LayerNormChannels(4)
    assert norm.eps == 1e-6
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    x = torch.randn(2, 4, 3, 3, 3)
    y = norm(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 3, 3), atol=1e-5, rtol=0)
    assert LayerNormChannels(4, affine=False).weight is None
    with pytest.raises(ValueError, match=r"\(B, 4"):
        norm(torch.randn(2, 3, 4, 4, 4))


# ---------------------------------------------------------------- DropPath
def test_droppath_eval_is_identity_and_train_statistics():
    p = 0.3
    dp = DropPath(p)
    x = torch.rand(4000, 3, 2, 2, 2) + 0.5
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    ratio = (y / x).flatten(1)
    # Per sample: every element zero, or every element scaled by exactly 1 / keep.
    dropped = (ratio == 0).all(1)
    kept = torch.isclose(ratio, torch.full_like(ratio, 1 / (1 - p))).all(1)
    assert bool((dropped ^ kept).all())
    assert abs(dropped.float().mean().item() - p) < 0.04  # binomial sd ≈ 0.007
    assert abs(y.mean().item() - x.mean().item()) < 0.05 * x.mean().item()  # expectation kept


def test_droppath_edges():
    x = torch.randn(8, 2, 3)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert torch.equal(DropPath(1.0).train()(x), torch.zeros_like(x))
    y = DropPath(0.5, scale_by_keep=False).train()(x)
    assert all(torch.equal(y[i], x[i]) or torch.equal(y[i], torch.zeros_like(x[i])) for i in range(8))
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)


# ---------------------------------------------------------------- hgConv
def _gate(a, b, gating):
    return a + b if gating == "add" else a * b


@pytest.mark.parametrize("gating", ["add", "mul"])
@pytest.mark.parametrize(("kernel", "scale"), [(3, 1.0), ((1, 3, 3), 1 / 3), (5, 0.5)])
def test_hgconv_order2_matches_hand_computation(gating, kernel, scale):
    m = _randomise(HgConv(4, order=2, kernel_size=kernel, scale=scale, gating=gating))
    x = torch.randn(2, 4, 5, 6, 7)
    k = (kernel,) * 3 if isinstance(kernel, int) else kernel
    pad = tuple(v // 2 for v in k)
    # widths (2, 4): proj_in 4 -> 8 = P0 (2) + Q (6); Q -> Q0 (2), Q1 (4).
    proj = F.conv3d(x, m.proj_in.weight, m.proj_in.bias)
    p0, q = proj[:, :2], proj[:, 2:]
    dw = F.conv3d(q, m.dwconv.weight, m.dwconv.bias, padding=pad, groups=6) * scale
    u0 = _gate(p0, dw[:, :2], gating)
    u1 = _gate(F.conv3d(u0, m.pws[0].weight, m.pws[0].bias), dw[:, 2:], gating)
    expected = F.conv3d(u1, m.proj_out.weight, m.proj_out.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gating", ["add", "mul"])
def test_hgconv_order3_matches_hand_computation_2d(gating):
    m = _randomise(HgConv(8, order=3, spatial_dims=2, gating=gating))
    x = torch.randn(2, 8, 6, 5)
    proj = F.conv2d(x, m.proj_in.weight, m.proj_in.bias)  # 16 = P0 (2) + Q (2 + 4 + 8)
    dw = F.conv2d(proj[:, 2:], m.dwconv.weight, m.dwconv.bias, padding=1, groups=14)
    u = _gate(proj[:, :2], dw[:, :2], gating)
    u = _gate(F.conv2d(u, m.pws[0].weight, m.pws[0].bias), dw[:, 2:6], gating)
    u = _gate(F.conv2d(u, m.pws[1].weight, m.pws[1].bias), dw[:, 6:14], gating)
    expected = F.conv2d(u, m.proj_out.weight, m.proj_out.bias)
    torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-5)


def test_hgconv_widths_and_validation():
    assert hgconv_widths(16, 2) == (8, 16)
    assert hgconv_widths(32, 3) == (8, 16, 32)
    assert hgconv_widths(64, 4) == (8, 16, 32, 64)
    assert hgconv_widths(5, 1) == (5,)
    m = HgConv(64, order=4)
    assert m.dwconv.in_channels == m.dwconv.out_channels == m.dwconv.groups == 8 + 16 + 32 + 64
    assert [(pw.in_channels, pw.out_channels) for pw in m.pws] == [(8, 16), (16, 32), (32, 64)]
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(order-1\\) = 8"):
        HgConv(12, order=4)
    with pytest.raises(ValueError, match="gating"):
        HgConv(8, order=2, gating="max")
    with pytest.raises(ValueError, match="odd"):
        HgConv(8, order=2, kernel_size=4)


# ---------------------------------------------------------------- HGCN block
@pytest.mark.parametrize("final_act", [False, True])
def test_hgcn_block_matches_hand_computation(final_act):
    blk = _randomise(HGCNBlock(8, order=2, final_act=final_act)).eval()
    x = torch.randn(2, 8, 4, 5, 6)

    def ln(t, norm):
        return F.layer_norm(t.permute(0, 2, 3, 4, 1), (t.shape[1],), norm.weight, norm.bias, 1e-6).permute(
            0, 4, 1, 2, 3
        )

    z = F.conv3d(x, blk.reduce.weight, blk.reduce.bias)
    z = z + blk.gamma.view(1, -1, 1, 1, 1) * blk.hgconv(ln(z, blk.norm1))
    o = F.conv3d(ln(z, blk.norm2), blk.conv_a.weight, blk.conv_a.bias, padding=1)
    o = F.conv3d(F.leaky_relu(o, 0.01), blk.conv_b.weight, blk.conv_b.bias, padding=1)
    expected = x + o
    if final_act:
        expected = F.leaky_relu(expected, 0.01)
    torch.testing.assert_close(blk(x), expected, rtol=1e-4, atol=1e-4)


def test_hgcn_block_init_shapes_and_droppath():
    blk = HGCNBlock(
        32, order=4, drop_path=0.2, kernel_size=(1, 3, 3), hgconv_kernel_size=7, hgconv_scale=1 / 3
    )
    assert torch.equal(blk.gamma, torch.full((16,), 1e-6))
    assert blk.hgconv.widths == (2, 4, 8, 16)
    assert blk.conv_a.kernel_size == (1, 3, 3) and blk.hgconv.dwconv.kernel_size == (7, 7, 7)
    assert blk.drop_path.drop_prob == pytest.approx(0.2)
    assert isinstance(blk.final_act, nn.Identity)
    assert HGCNBlock(8, layer_scale_init=None).gamma is None
    x = torch.randn(1, 32, 2, 8, 8)
    assert blk(x).shape == x.shape
    with pytest.raises(ValueError, match="even"):
        HGCNBlock(7)
    with pytest.raises(ValueError, match="divisible"):
        HGCNBlock(8, order=4)  # C' = 4 not divisible by 8


# ---------------------------------------------------------------- conv blocks
def _in(t, norm):
    return F.instance_norm(t, weight=norm.weight, bias=norm.bias, eps=1e-5)


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "shortcut"),
    [
        (4, 4, 1, []),
        (4, 8, 1, [nn.Conv3d, nn.InstanceNorm3d]),
        (4, 4, 2, [nn.AvgPool3d]),
        (4, 8, 2, [nn.AvgPool3d, nn.Conv3d, nn.InstanceNorm3d]),
        (4, 8, (1, 2, 2), [nn.AvgPool3d, nn.Conv3d, nn.InstanceNorm3d]),
    ],
)
def test_basic_block_d_shortcut_and_shapes(cin, cout, stride, shortcut):
    blk = BasicBlockD(cin, cout, stride=stride)
    types = [type(m) for m in blk.shortcut] if isinstance(blk.shortcut, nn.Sequential) else []
    assert types == shortcut
    if nn.Conv3d in types:
        assert blk.shortcut[types.index(nn.Conv3d)].bias is None
    s = (stride,) * 3 if isinstance(stride, int) else stride
    for size in [(4, 8, 8), (5, 7, 9)]:  # odd sizes: pool (ceil mode) and strided conv agree
        y = blk(torch.randn(2, cin, *size))
        assert y.shape == (2, cout, *[-(-n // k) for n, k in zip(size, s, strict=True)])


def test_basic_block_d_matches_hand_computation():
    blk = _randomise(BasicBlockD(3, 6, stride=2))
    x = torch.randn(2, 3, 6, 4, 8)
    h = F.leaky_relu(_in(F.conv3d(x, blk.conv1.weight, blk.conv1.bias, stride=2, padding=1), blk.norm1), 0.01)
    h = _in(F.conv3d(h, blk.conv2.weight, blk.conv2.bias, padding=1), blk.norm2)
    sc = _in(F.conv3d(F.avg_pool3d(x, 2), blk.shortcut[1].weight), blk.shortcut[2])
    torch.testing.assert_close(blk(x), F.leaky_relu(h + sc, 0.01), rtol=1e-4, atol=1e-4)


def test_decoder_res_block_matches_hand_computation():
    blk = _randomise(DecoderResBlock(8, 4, kernel_size=(1, 3, 3)))
    x = torch.randn(2, 8, 3, 4, 5)
    h = F.leaky_relu(_in(F.conv3d(x, blk.conv1.weight, blk.conv1.bias, padding=(0, 1, 1)), blk.norm1), 0.01)
    h = _in(F.conv3d(h, blk.conv2.weight, blk.conv2.bias, padding=(0, 1, 1)), blk.norm2)
    sc = F.conv3d(x, blk.shortcut.weight, blk.shortcut.bias)
    torch.testing.assert_close(blk(x), F.leaky_relu(h + sc, 0.01), rtol=1e-4, atol=1e-4)
    # 2C -> C with bias everywhere: 27*8*4+4 + 2*4 + 27*4*4+4 + 2*4 + 8*4+4 (kernel 3)
    assert sum(p.numel() for p in DecoderResBlock(8, 4).parameters()) == 868 + 8 + 436 + 8 + 36


def test_upsample_conv_and_stem():
    up = _randomise(UpsampleConv(6, 3, scale_factor=(1, 2, 2)))
    x = torch.randn(2, 6, 3, 4, 5)
    rep = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    torch.testing.assert_close(up(x), F.conv3d(rep, up.conv.weight, up.conv.bias), rtol=1e-5, atol=1e-5)
    stem = ConvNormAct(1, 4, kernel_size=(1, 3, 3))
    assert stem(torch.randn(1, 1, 2, 6, 6)).shape == (1, 4, 2, 6, 6)
    assert isinstance(stem.act, nn.LeakyReLU) and stem.act.negative_slope == 0.01
    assert stem.norm.eps == 1e-5 and stem.norm.affine


def test_blocks_2d():
    x = torch.randn(2, 4, 8, 6)
    assert BasicBlockD(4, 8, spatial_dims=2, stride=2)(x).shape == (2, 8, 4, 3)
    assert DecoderResBlock(4, 2, spatial_dims=2)(x).shape == (2, 2, 8, 6)
    assert UpsampleConv(4, 2, 2, spatial_dims=2)(x).shape == (2, 2, 16, 12)
    assert HGCNBlock(8, spatial_dims=2, order=3)(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)
    with pytest.raises(ValueError, match="spatial_dims"):
        BasicBlockD(4, 4, spatial_dims=1)
    with pytest.raises(ValueError, match="stride"):
        BasicBlockD(4, 4, stride=(1, 2))


# ---------------------------------------------------------------- norm and activation factories
@pytest.mark.parametrize(
    ("spec", "kwargs", "dims", "expected_type", "attrs"),
    [
        ("instance", {}, 3, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}),
        ("InstanceNorm", {"eps": 1e-3}, 2, nn.InstanceNorm2d, {"eps": 1e-3, "affine": True}),
        ("batch", {}, 3, nn.BatchNorm3d, {"eps": 1e-5, "affine": True, "track_running_stats": True}),
        ("batch_norm", {"momentum": 0.3}, 2, nn.BatchNorm2d, {"momentum": 0.3}),
        ("group", {"num_groups": 3}, 3, nn.GroupNorm, {"num_groups": 3, "num_channels": 6}),
        ("layer", {}, 3, LayerNormChannels, {"eps": 1e-6, "num_channels": 6}),
        ("channel_layernorm", {"eps": 1e-5}, 2, LayerNormChannels, {"eps": 1e-5}),
        (nn.InstanceNorm3d, {}, 3, nn.InstanceNorm3d, {"affine": False}),  # a class: PyTorch's defaults
        (nn.GroupNorm, {"num_groups": 2}, 3, nn.GroupNorm, {"num_groups": 2, "num_channels": 6}),
        (functools.partial(nn.GroupNorm, 3), {}, 2, nn.GroupNorm, {"num_groups": 3, "num_channels": 6}),
        (functools.partial(nn.BatchNorm3d, eps=0.1), {"momentum": 0.5}, 3, nn.BatchNorm3d, {"eps": 0.1}),
        (("group", {"num_groups": 2, "eps": 0.1}), {}, 3, nn.GroupNorm, {"num_groups": 2, "eps": 0.1}),
        (["instance", {"affine": False}], {}, 3, nn.InstanceNorm3d, {"affine": False, "eps": 1e-5}),
        (lambda c: nn.GroupNorm(1, c), {}, 3, nn.GroupNorm, {"num_groups": 1}),
        ("torch.nn.BatchNorm3d", {}, 3, nn.BatchNorm3d, {"affine": True}),  # a YAML class path
        (["torch.nn.GroupNorm", {"num_groups": 3}], {}, 2, nn.GroupNorm, {"num_groups": 3}),
    ],
)
def test_get_norm_layer_names_classes_and_partials(spec, kwargs, dims, expected_type, attrs):
    factory = get_norm_layer(spec, spatial_dims=dims, **kwargs)
    norm = factory(6)
    assert type(norm) is expected_type
    assert factory(6) is not norm  # a new module per layer
    for name, value in attrs.items():
        assert getattr(norm, name) == value, name
    x = torch.randn(2, 6, *(3,) * dims)
    assert norm(x).shape == x.shape


def test_get_norm_layer_group_norm_matches_functional():
    norm = _randomise(get_norm_layer("group", num_groups=2)(4))
    x = torch.randn(2, 4, 3, 4, 5)
    torch.testing.assert_close(norm(x), F.group_norm(x, 2, norm.weight, norm.bias, 1e-5))


@pytest.mark.parametrize(
    ("spec", "kwargs", "expected_type", "attrs"),
    [
        ("leakyrelu", {}, nn.LeakyReLU, {"negative_slope": 0.01, "inplace": True}),
        ("Leaky_ReLU", {"negative_slope": 0.2}, nn.LeakyReLU, {"negative_slope": 0.2}),
        ("relu", {}, nn.ReLU, {"inplace": True}),
        ("gelu", {"approximate": "tanh"}, nn.GELU, {"approximate": "tanh"}),
        ("prelu", {}, nn.PReLU, {"init": 0.25}),
        ("swish", {}, nn.SiLU, {}),
        ("elu", {"alpha": 0.5}, nn.ELU, {"alpha": 0.5}),
        ("mish", {}, nn.Mish, {}),
        ("none", {}, nn.Identity, {}),
        (nn.GELU, {}, nn.GELU, {"approximate": "none"}),
        (functools.partial(nn.LeakyReLU, 0.3), {}, nn.LeakyReLU, {"negative_slope": 0.3, "inplace": False}),
        (("leakyrelu", {"negative_slope": 0.1}), {"inplace": False}, nn.LeakyReLU, {"negative_slope": 0.1}),
        ("torch.nn.Hardswish", {}, nn.Hardswish, {}),
    ],
)
def test_get_act_layer_names_classes_and_partials(spec, kwargs, expected_type, attrs):
    factory = get_act_layer(spec, **kwargs)
    act = factory()
    assert type(act) is expected_type and factory() is not act
    for name, value in attrs.items():
        assert getattr(act, name) == value, name


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: get_norm_layer("batchnrom"),
            r"unknown norm 'batchnrom'; valid names: instance, batch, group, layer",
        ),
        (lambda: get_norm_layer("group"), "needs num_groups"),
        (lambda: get_norm_layer(nn.GroupNorm), "needs num_groups"),
        (lambda: get_norm_layer(nn.BatchNorm2d), "BatchNorm2d is for 2 spatial axes, but spatial_dims=3"),
        (lambda: get_norm_layer("instance", spatial_dims=1), "spatial_dims must be 2 or 3"),
        (lambda: get_norm_layer(nn.InstanceNorm3d(4)), "not the module instance"),
        (lambda: get_norm_layer("batch", epsilon=1e-3), "norm: .*unexpected keyword argument 'epsilon'"),
        (lambda: get_norm_layer(("batch",)), r"\(name or class, kwargs dict\)"),
        (lambda: get_norm_layer(nn.Linear(2, 2)), "not the module instance"),
        (lambda: get_norm_layer(dict), "must be an nn.Module class"),
        (lambda: get_norm_layer(None), "must be a name, an nn.Module class or a callable"),
        (
            lambda: get_act_layer("relu6"),
            r"unknown act 'relu6'; valid names: leakyrelu, relu, prelu, elu, gelu",
        ),
        (
            lambda: get_act_layer("relu", negative_slope=0.1),
            "act: .*unexpected keyword argument 'negative_slope'",
        ),
        (lambda: get_act_layer(nn.ReLU()), "not the module instance"),
        (lambda: get_act_layer(str), "must be an nn.Module class"),
        (lambda: get_act_layer("torch.nn.NoSuchAct"), "'torch.nn.NoSuchAct' is not an importable name"),
    ],
)
def test_factories_reject_bad_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_factories_former_numeric_signatures_still_work():
    with pytest.warns(DeprecationWarning, match="get_norm_layer"):
        norm = get_norm_layer(2, eps=1e-3)(4)
    assert type(norm) is nn.InstanceNorm2d and norm.eps == 1e-3 and norm.affine
    with pytest.warns(DeprecationWarning, match="get_act_layer"):
        act = get_act_layer(0.2)()
    assert type(act) is nn.LeakyReLU and act.negative_slope == 0.2 and act.inplace


def test_blocks_take_norm_and_act_by_name_and_match_hand_computation():
    blk = _randomise(BasicBlockD(3, 4, stride=2, norm_layer=("group", {"num_groups": 2}), act_layer="gelu"))
    assert isinstance(blk.shortcut[2], nn.GroupNorm) and isinstance(blk.act, nn.GELU)
    x = torch.randn(2, 3, 6, 4, 8)

    def gn(h, norm):
        return F.group_norm(h, 2, norm.weight, norm.bias, 1e-5)

    h = F.gelu(gn(F.conv3d(x, blk.conv1.weight, blk.conv1.bias, stride=2, padding=1), blk.norm1))
    h = gn(F.conv3d(h, blk.conv2.weight, blk.conv2.bias, padding=1), blk.norm2)
    sc = gn(F.conv3d(F.avg_pool3d(x, 2), blk.shortcut[1].weight), blk.shortcut[2])
    torch.testing.assert_close(blk(x), F.gelu(h + sc), rtol=1e-4, atol=1e-4)
    stem = ConvNormAct(1, 4, spatial_dims=2, norm_layer=nn.BatchNorm2d, act_layer=nn.ReLU)
    assert isinstance(stem.norm, nn.BatchNorm2d) and isinstance(stem.act, nn.ReLU)
    dec = DecoderResBlock(8, 4, norm_layer=get_norm_layer("layer"), act_layer=get_act_layer("silu"))
    assert isinstance(dec.norm1, LayerNormChannels) and isinstance(dec.act1, nn.SiLU)
