"""Model tests: exact sizes from the spec, every registered preset end to end, argument validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import mambaclinix.models.mambaclinix as mcx
from mambaclinix import MambaClinixUNet, create_model, list_models
from mambaclinix.layers import HGCNBlock, LayerNormChannels, MambaLayer
from mambaclinix.layers.drop import DropPath

PRESETS = ("mambaclinix_paper", "mambaclinix_5stage", "mambaclinix_7stage", "mambaclinix_small")
PRESETS += ("mambaclinix_tiny",)


def _count(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def paper_meta():
    with torch.device("meta"):
        return create_model("mambaclinix_paper")


# ---------------------------------------------------------------- sizes (spec §1 "Sizes to check against")
def test_paper_preset_exact_parameter_counts(paper_meta):
    m = paper_meta
    assert next(m.parameters()).is_meta
    assert _count(m) == 48_883_846
    assert _count(m.stem) == 960
    encoder = [55_488, 168_448, 672_768, 2_689_024, 5_061_120, 5_531_520]
    assert [_count(b) for b in m.encoder_blocks] == encoder
    assert [_count(b) for b in m.stage_layers] == [43_776, 173_680, 691_024, 504_064, 778_560, 778_560]
    assert _count(m.junction_norm) == 256
    assert _count(m.bottleneck) == 5_531_520
    # The spec lists the decoder parts coarse -> fine; the model indexes them by level t (0 = finest).
    coarse_to_fine = {
        "skip_blocks": [5_531_520, 3_540_480, 885_504, 221_568, 55_488],
        "decoder_blocks": [8_501_440, 5_441_280, 1_360_768, 340_416, 85_216],
        "up_convs": [102_720, 82_176, 32_896, 8_256, 2_080],
        "heads": [4_494, 3_598, 1_806, 910, 462],
    }
    for name, counts in coarse_to_fine.items():
        assert [_count(b) for b in getattr(m, name)] == counts[::-1], name
    parts = [m.stem, m.encoder_blocks, m.stage_layers, m.junction_norm, m.bottleneck]
    parts += [getattr(m, name) for name in coarse_to_fine]
    assert sum(_count(p) for p in parts) == _count(m)  # nothing outside the named parts


def test_paper_preset_structure(paper_meta):
    m = paper_meta
    assert m.features_per_stage == (32, 64, 128, 256, 320, 320)
    assert m.stage_layer_types == ("hgcn",) * 3 + ("mamba",) * 3
    assert m.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5 and m.size_divisor == (32, 32, 32)
    assert m.junction_stage == 2 and isinstance(m.junction_norm, LayerNormChannels)
    assert m.junction_norm.eps == 1e-6
    for s in range(3):
        blk = m.stage_layers[s]
        assert isinstance(blk, HGCNBlock) and blk.hgconv.order == s + 2
        assert blk.hgconv.widths == tuple(m.features_per_stage[s] // 2 // 2**k for k in range(s + 1, -1, -1))
        assert blk.drop_path.drop_prob == pytest.approx(0.1 * s)
        assert blk.gamma.shape == (m.features_per_stage[s] // 2,) and blk.hgconv.gating == "add"
    assert all(isinstance(m.stage_layers[s], MambaLayer) for s in range(3, 6))
    # DropPath lives only inside the HGCN blocks.
    assert all(
        name.startswith(("stage_layers.0.", "stage_layers.1.", "stage_layers.2."))
        for name, mod in m.named_modules()
        if isinstance(mod, DropPath)
    )


@pytest.mark.parametrize(("name", "millions"), [("mambaclinix_5stage", 28.43), ("mambaclinix_7stage", 71.58)])
def test_other_spec_sizes(name, millions):
    with torch.device("meta"):
        m = create_model(name)
    # The spec gives two decimals ("about"); allow one unit in the last place.
    assert abs(_count(m) / 1e6 - millions) <= 0.01, _count(m)


def test_preset_defaults():
    with torch.device("meta"):
        five, seven = create_model("mambaclinix_5stage"), create_model("mambaclinix_7stage")
    assert (five.n_stages, five.out_channels) == (5, 2)
    assert five.stage_layer_types == ("hgcn",) * 3 + ("mamba",) * 2
    assert (seven.n_stages, seven.out_channels) == (7, 4)
    assert seven.stage_layer_types == ("hgcn",) * 4 + ("mamba",) * 3
    assert seven.junction_stage == 3 and seven.stage_layers[3].hgconv.order == 5


# ---------------------------------------------------------------- every preset, end to end
def test_registry_lists_presets():
    assert set(PRESETS) <= set(list_models())
    assert list_models("*tiny") == ["mambaclinix_tiny"]
    with pytest.raises(ValueError, match="unknown model 'nope'.*mambaclinix_paper"):
        create_model("nope")
    assert create_model("mambaclinix_tiny", in_channels=2, out_channels=5).heads[0].out_channels == 5


def _preset_params():
    """Every registered preset; those whose smallest valid input is large (the 7-stage one: 64x64x128,
    ~30-50 s on 2 CPU cores) are marked ``slow`` so a quick run can deselect them with ``-m "not slow"``."""
    params = []
    for name in list_models():
        with torch.device("meta"):
            divisor = create_model(name).size_divisor
        slow = 2 * math.prod(divisor) > 2**17
        params.append(pytest.param(name, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("name", _preset_params())
def test_preset_forward_backward(name):
    # drop_path_rate=0 so no HGCN branch is dropped at random (a dropped branch has exactly zero gradient);
    # everything else is the registered preset.
    model = create_model(name, drop_path_rate=0.0).train()
    big = _count(model) > 5_000_000
    # The smallest valid input: one size_divisor per axis, the last doubled so the bottleneck has two voxels.
    size = (*model.size_divisor[:-1], 2 * model.size_divisor[-1])
    batch = 1 if big else 2
    x = torch.randn(batch, model.in_channels, *size)
    out = model(x)
    assert isinstance(out, list) and len(out) == model.n_stages - 1
    for t, (o, scale) in enumerate(zip(out, model.output_scales, strict=True)):
        assert o.shape == (batch, model.out_channels, *[n // k for n, k in zip(size, scale, strict=True)]), t
        assert torch.isfinite(o).all()
    assert out[0].shape[2:] == x.shape[2:]
    sum(o.float().square().mean() for o in out).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    gammas = [blk.gamma for blk in model.stage_layers if isinstance(blk, HGCNBlock)]
    assert gammas and all(g.grad.abs().min() > 0 for g in gammas)


def test_deep_supervision_off_returns_finest_tensor():
    model = create_model("mambaclinix_tiny", deep_supervision=False).eval()
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        y = model(x)
        assert isinstance(y, torch.Tensor) and y.shape == (1, 2, 16, 16, 8)
        model.deep_supervision = True
        ys = model(x)
    assert [tuple(o.shape[2:]) for o in ys] == [(16, 16, 8), (8, 8, 4), (4, 4, 2)]
    torch.testing.assert_close(ys[0], y)


def test_channels_last_input_gives_same_logits():
    # channels_last_3d makes CPU conv3d (and its backward) several times faster; results must not change.
    model = create_model("mambaclinix_tiny").eval()
    x = torch.randn(2, 1, 16, 8, 16)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        out = model(x.to(memory_format=torch.channels_last_3d))
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- input validation
def test_indivisible_input_raises():
    model = create_model("mambaclinix_tiny")
    assert model.size_divisor == (8, 8, 8)
    with pytest.raises(ValueError, match=r"\(20, 16, 16\).*size_divisor=\(8, 8, 8\)"):
        model(torch.randn(1, 1, 20, 16, 16))
    with pytest.raises(ValueError, match="single voxel"):
        model(torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"expected input \(B, 1, D, H, W\)"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 16, 16, 16))


# ---------------------------------------------------------------- anisotropic data
def test_paper_preset_anisotropic():
    kernels = [(1, 3, 3), (1, 3, 3), 3, 3, 3, 3]
    strides = [1, (1, 2, 2), 2, 2, 2, 2]
    model = create_model("mambaclinix_paper", kernel_sizes=kernels, strides=strides, in_channels=2).eval()
    assert model.size_divisor == (16, 32, 32)
    assert model.stem.conv.kernel_size == (1, 3, 3)
    assert model.stage_layers[1].hgconv.dwconv.kernel_size == (1, 3, 3)
    assert model.encoder_blocks[1].conv1.stride == (1, 2, 2) and model.up_convs[0].scale_factor == (1, 2, 2)
    x = torch.randn(1, 2, 16, 32, 64)
    with torch.no_grad():
        out = model(x)
    expected = [(16, 32, 64), (16, 16, 32), (8, 8, 16), (4, 4, 8), (2, 2, 4)]
    assert [tuple(o.shape) for o in out] == [(1, 14, *s) for s in expected]
    assert all(torch.isfinite(o).all() for o in out)
    with pytest.raises(ValueError, match="size_divisor=\\(16, 32, 32\\)"):
        model(torch.randn(1, 2, 8, 32, 64))


# ---------------------------------------------------------------- options and ablations
def test_figure_variants():
    model = create_model(
        "mambaclinix_tiny", gating="mul", hgcn_final_act=True, hgconv_kernel_size=7, hgconv_scale=1 / 3
    )
    for blk in model.stage_layers[:2]:
        assert blk.hgconv.gating == "mul" and blk.hgconv.scale == pytest.approx(1 / 3)
        assert blk.hgconv.dwconv.kernel_size == (7, 7, 7) and isinstance(blk.final_act, nn.LeakyReLU)
    out = model(torch.randn(2, 1, 16, 16, 16))
    assert all(torch.isfinite(o).all() for o in out)


def test_stage_layer_ablation_removes_mamba():
    types = ("hgcn",) * 3 + ("none",) * 3
    with torch.device("meta"):
        m = create_model("mambaclinix_paper", stage_layer_types=types)
    assert all(isinstance(m.stage_layers[s], nn.Identity) for s in range(3, 6))
    assert _count(m) == 48_883_846 - 504_064 - 2 * 778_560
    tiny = create_model("mambaclinix_tiny", stage_layer_types=("none", "hgcn", "mamba", "none"))
    assert tiny.junction_stage == 1 and not any(isinstance(m, MambaLayer) for m in tiny.stage_layers[3:])
    assert tiny(torch.randn(1, 1, 8, 8, 16))[0].shape == (1, 2, 8, 8, 16)
    no_hgcn = create_model("mambaclinix_tiny", n_hgcn_stages=0)
    assert no_hgcn.junction_norm is None and no_hgcn.stage_layer_types == ("mamba",) * 4


def test_spatial_dims_2():
    model = create_model("mambaclinix_tiny", spatial_dims=2)
    assert model.size_divisor == (8, 8) and isinstance(model.stage_layers[3], MambaLayer)
    out = model(torch.randn(2, 1, 16, 8))
    assert [tuple(o.shape) for o in out] == [(2, 2, 16, 8), (2, 2, 8, 4), (2, 2, 4, 2)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(features_per_stage=(4, 8, 16)), "features_per_stage"),
        (dict(kernel_sizes=[3, 3]), "kernel_sizes"),
        (dict(kernel_sizes=4), r"kernel_sizes\[0\] must be odd"),
        (dict(strides=[1, 2, 2]), "strides"),
        (dict(strides=2), "strides"),
        (dict(strides=[1, 2, (2, 2), 2]), r"strides\[2\]"),
        (dict(gating="max"), "gating"),
        (dict(hgcn_order=4), r"features_per_stage\[0\]=4 .*hgcn_order"),
        (dict(hgcn_order=[2, 3]), "hgcn_order"),
        (dict(features_per_stage=(6, 8, 16, 16)), r"features_per_stage\[0\]=6"),
        (dict(n_stages=1, features_per_stage=None), "n_stages"),
        (dict(n_hgcn_stages=5), "n_hgcn_stages"),
        (dict(stage_layer_types=("hgcn", "conv", "mamba", "mamba")), "stage_layer_types"),
        (dict(stage_layer_types=("hgcn",) * 4, n_hgcn_stages=2), "n_hgcn_stages or stage_layer_types"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(out_channels=0), "out_channels"),
        (dict(spatial_dims=1), "spatial_dims"),
        (dict(hgconv_kernel_size=(7, 7)), "hgconv_kernel_size"),
        (dict(hgconv_kernel_size=(1, 6, 6)), "hgconv_kernel_size must be odd"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("mambaclinix_tiny", **kwargs)


# ---------------------------------------------------------------- init
def test_init_kaiming_convs_and_untouched_mamba(monkeypatch):
    snapshots = []

    class RecordingMambaLayer(MambaLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            snapshots.append({k: v.clone() for k, v in self.state_dict().items()})

    monkeypatch.setattr(mcx, "MambaLayer", RecordingMambaLayer)
    model = MambaClinixUNet(1, 3, n_stages=4, features_per_stage=(16, 32, 64, 64))
    mamba_layers = [m for m in model.stage_layers if isinstance(m, MambaLayer)]
    assert len(mamba_layers) == len(snapshots) == 2
    for layer, snap in zip(mamba_layers, snapshots, strict=True):
        for k, v in layer.state_dict().items():
            assert torch.equal(v, snap[k]), k  # Mamba keeps its own init, conv1d included
    gain = math.sqrt(2 / (1 + 0.01**2))
    n_convs = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv3d):
            n_convs += 1
            if mod.bias is not None:
                assert torch.equal(mod.bias, torch.zeros_like(mod.bias)), name
            fan_in = mod.weight[0].numel()
            if mod.weight.numel() >= 4096:  # enough samples for a 10% check of the std
                assert mod.weight.std().item() == pytest.approx(gain / math.sqrt(fan_in), rel=0.1), name
    assert n_convs > 30
    hgcn = model.stage_layers[0]
    assert torch.equal(hgcn.gamma, torch.full_like(hgcn.gamma, 1e-6))
