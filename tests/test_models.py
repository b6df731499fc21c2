"""Model tests: exact parameter counts, every registered preset end to end, argument validation, the encoder
and decoder parts, norm and activation choices."""

from __future__ import annotations

import copy
import functools
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mambaclinix.models.encoder as encoder_module
from mambaclinix import MambaClinixDecoder, MambaClinixEncoder, MambaClinixUNet, create_model, list_models
from mambaclinix.layers import BasicBlockD, HGCNBlock, LayerNormChannels, MambaLayer
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


# ---------------------------------------------------------------- sizes
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
    # Counts listed coarse -> fine; the model indexes the decoder lists by level t (0 = finest).
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
def test_other_preset_sizes(name, millions):
    with torch.device("meta"):
        m = create_model(name)
    # The sizes are known to two decimals ("about"); allow one unit in the last place.
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

    monkeypatch.setattr(encoder_module, "MambaLayer", RecordingMambaLayer)
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


# ---------------------------------------------------------------- the encoder and decoder parts
def test_unet_is_its_encoder_then_its_decoder():
    model = create_model("mambaclinix_tiny", drop_path_rate=0.0)
    assert isinstance(model.encoder, MambaClinixEncoder) and isinstance(model.decoder, MambaClinixDecoder)
    # The parts share the U-Net's layers; they are not children, so nothing has two names.
    assert model.encoder.stem is model.stem and model.encoder.stage_layers is model.stage_layers
    assert model.decoder.heads is model.heads and model.decoder.bottleneck is model.bottleneck
    assert not {"encoder", "decoder"} & set(model._modules)
    state = model.state_dict()
    parts = {**model.encoder.state_dict(), **model.decoder.state_dict()}
    assert list(parts) == list(state)
    assert all(parts[k].data_ptr() == state[k].data_ptr() for k in state)  # the same storage
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False)))
    x = torch.randn(2, 1, 16, 8, 16)
    with torch.no_grad():
        skips = model.encoder(x)
        torch.testing.assert_close(model.decoder(skips), model(x), rtol=0, atol=0)
    # the configuration the U-Net reports comes from its parts
    assert model.size_divisor == model.encoder.size_divisor == (8, 8, 8)
    assert model.output_scales == model.encoder.skip_scales[:-1]
    model.deep_supervision = False
    assert model.decoder.deep_supervision is False and model(x).shape == (2, 2, 16, 8, 16)


def test_parts_follow_copy_device_dtype_and_mode_changes():
    model = create_model("mambaclinix_tiny")
    model.eval()
    assert not model.encoder.training and not model.decoder.training and not model.stem.training
    model.train()
    assert model.encoder.training and model.decoder.training and model.heads[0].training
    clone = copy.deepcopy(model)
    assert clone.encoder.stem is clone.stem and clone.stem is not model.stem
    assert clone.decoder.up_convs is clone.up_convs
    clone.to(torch.float64)
    assert clone.encoder.stem.conv.weight.dtype == torch.float64 == clone.decoder.heads[0].weight.dtype
    assert model.stem.conv.weight.dtype == torch.float32
    restored = pickle.loads(pickle.dumps(model))
    assert restored.encoder.encoder_blocks is restored.encoder_blocks
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_encoder_alone_returns_skips_of_the_documented_shapes():
    strides = [1, (1, 2, 2), 2, 2]
    encoder = MambaClinixEncoder(2, n_stages=4, features_per_stage=(4, 8, 16, 16), strides=strides)
    assert encoder.skip_scales == ((1, 1, 1), (1, 2, 2), (2, 4, 4), (4, 8, 8)) and encoder.size_divisor == (
        4,
        8,
        8,
    )
    assert encoder.stage_layer_types == ("hgcn", "hgcn", "mamba", "mamba") and encoder.junction_stage == 1
    x = torch.randn(2, 2, 8, 16, 8)
    skips = encoder(x)
    assert [tuple(s.shape) for s in skips] == [
        (2, 4, 8, 16, 8),
        (2, 8, 8, 8, 4),
        (2, 16, 4, 4, 2),
        (2, 16, 2, 2, 1),
    ]
    # a classifier on the deepest feature: global average pool and a linear layer, trained by backprop
    head = nn.Linear(16, 3)
    logits = head(skips[-1].mean(dim=(2, 3, 4)))
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"expected input \(B, 2, D, H, W\)"):
        encoder(torch.randn(1, 1, 8, 16, 8))


def test_parts_load_the_unet_weights_and_reproduce_it():
    model = create_model("mambaclinix_tiny", drop_path_rate=0.0).eval()
    encoder = MambaClinixEncoder(1, n_stages=4, features_per_stage=(4, 8, 16, 16), drop_path_rate=0.0)
    decoder = MambaClinixDecoder((4, 8, 16, 16), 2)
    encoder.load_state_dict(model.encoder.state_dict(), strict=True)
    decoder.load_state_dict(model.decoder.state_dict(), strict=True)
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        for out, ref in zip(decoder.eval()(encoder.eval()(x)), model(x), strict=True):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_decoder_on_random_skips_matches_its_layers_by_hand():
    strides = [2, (1, 2, 2), 2]  # strides[0] is in front of the finest skip and not undone
    decoder = MambaClinixDecoder((8, 12, 16), out_channels=3, strides=strides, kernel_sizes=[(1, 3, 3), 3, 3])
    decoder.eval()
    skips = [torch.randn(2, 8, 4, 8, 12), torch.randn(2, 12, 4, 4, 6), torch.randn(2, 16, 2, 2, 3)]
    with torch.no_grad():
        out = decoder(skips)
        assert [tuple(o.shape) for o in out] == [(2, 3, 4, 8, 12), (2, 3, 4, 4, 6)]
        # level 1 then level 0, written out from the decoder's own layers
        x = decoder.bottleneck(skips[2])
        x = decoder.decoder_blocks[1](
            torch.cat([decoder.up_convs[1](x), decoder.skip_blocks[1](skips[1])], 1)
        )
        torch.testing.assert_close(out[1], decoder.heads[1](x))
        up = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        up = F.conv3d(up, decoder.up_convs[0].conv.weight, decoder.up_convs[0].conv.bias)
        x = decoder.decoder_blocks[0](torch.cat([up, decoder.skip_blocks[0](skips[0])], 1))
        torch.testing.assert_close(out[0], decoder.heads[0](x))
        decoder.deep_supervision = False
        torch.testing.assert_close(decoder(skips), out[0])
    assert decoder.skip_blocks[0].conv1.kernel_size == (1, 3, 3)


@pytest.mark.parametrize(
    ("skips", "match"),
    [
        ([torch.randn(1, 8, 4, 4, 4), torch.randn(1, 16, 2, 2, 2)], "sequence of 3 skip features"),
        (torch.randn(1, 8, 4, 4, 4), "sequence of 3 skip features"),
        (
            [torch.randn(1, 8, 8, 8, 8), torch.randn(1, 12, 4, 4, 4), torch.randn(1, 12, 2, 2, 2)],
            r"skips\[2\]",
        ),
        ([torch.randn(1, 8, 8, 8, 8), torch.randn(1, 12, 4, 4, 4), torch.randn(1, 16, 2, 2, 3)], "strides"),
        ([torch.randn(1, 8, 8, 8), torch.randn(1, 12, 4, 4), torch.randn(1, 16, 2, 2)], r"skips\[0\]"),
    ],
)
def test_decoder_rejects_skips_of_other_shapes(skips, match):
    decoder = MambaClinixDecoder((8, 12, 16), out_channels=2)
    with pytest.raises(ValueError, match=match):
        decoder(skips)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(features_per_stage=(8,)), "at least two"),
        (dict(features_per_stage=8), "sequence of channels"),
        (dict(out_channels=0), "out_channels"),
        (dict(strides=[2, 2]), "strides"),
        (dict(norm="weight"), "unknown norm 'weight'; valid names: instance, batch, group, layer"),
    ],
)
def test_decoder_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaClinixDecoder(**{"features_per_stage": (8, 16, 32), "out_channels": 2, **kwargs})


# ---------------------------------------------------------------- norm and activation choices
@pytest.mark.parametrize(
    ("norm", "act", "norm_type", "act_type"),
    [
        (("group", {"num_groups": 2}), "gelu", nn.GroupNorm, nn.GELU),
        ("batch", nn.ReLU, nn.BatchNorm3d, nn.ReLU),
        (
            functools.partial(LayerNormChannels, eps=1e-5),
            ("leakyrelu", {"negative_slope": 0.2}),
            LayerNormChannels,
            nn.LeakyReLU,
        ),
    ],
)
def test_other_norm_and_act_train_one_step(norm, act, norm_type, act_type):
    model = create_model("mambaclinix_tiny", norm=norm, act=act, drop_path_rate=0.0)
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in model.modules())
    assert isinstance(model.stem.norm, norm_type) and isinstance(model.decoder_blocks[0].norm2, norm_type)
    assert isinstance(model.encoder_blocks[2].shortcut[-1], norm_type)
    assert isinstance(model.stem.act, act_type) and isinstance(model.stage_layers[0].act, act_type)
    assert isinstance(model.heads[0], nn.Conv3d)
    # one deep-supervised SGD step on a fixed batch lowers the loss
    x, y = torch.randn(2, 1, 16, 16, 8), torch.randint(0, 2, (2, 16, 16, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_fn() -> torch.Tensor:
        out = model(x)
        return sum(
            F.cross_entropy(o, F.interpolate(y[:, None].float(), o.shape[2:]).long()[:, 0]) for o in out
        )

    before = loss_fn()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss_fn() < before


@pytest.mark.parametrize(
    ("act", "a"),
    [
        ("leakyrelu", 0.01),
        (("leakyrelu", {"negative_slope": 0.3}), 0.3),
        ("relu", 0.0),
        ("gelu", 0.0),
        ("prelu", 0.25),
    ],
)
def test_kaiming_a_is_the_activation_slope(act, a):
    model = MambaClinixUNet(
        1, 3, n_stages=3, features_per_stage=(16, 32, 64), stage_layer_types=["none"] * 3, act=act
    )
    conv = model.decoder_blocks[1].conv1  # 64 -> 32 channels, 3x3x3: 55,296 weights
    gain = math.sqrt(2 / (1 + a**2))
    assert conv.weight.std().item() == pytest.approx(gain / math.sqrt(conv.weight[0].numel()), rel=0.03)


def test_default_norm_and_act_are_the_papers():
    model = create_model("mambaclinix_tiny")
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) > 20 and all(n.eps == 1e-5 and n.affine and not n.track_running_stats for n in norms)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) > 20 and all(a.negative_slope == 0.01 for a in acts)


def test_former_norm_eps_and_negative_slope_arguments_still_work():
    with pytest.warns(DeprecationWarning) as record:
        model = create_model("mambaclinix_tiny", norm_eps=1e-3, negative_slope=0.2)
    messages = sorted(str(w.message) for w in record)
    assert messages[0].startswith("negative_slope is deprecated") and messages[1].startswith("norm_eps")
    assert model.stem.norm.eps == 1e-3 and model.stem.norm.affine
    assert model.stem.act.negative_slope == 0.2 and model.stage_layers[1].act.negative_slope == 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            dict(norm="instancenrom"),
            "unknown norm 'instancenrom'; valid names: instance, batch, group, layer",
        ),
        (dict(norm="group"), "num_groups"),
        (dict(act="swiglu"), "unknown act 'swiglu'; valid names: leakyrelu, relu, prelu"),
        (dict(act=nn.ReLU()), "not the module instance"),
        (dict(norm=nn.BatchNorm2d), "BatchNorm2d is for 2 spatial axes"),
    ],
)
def test_invalid_norm_and_act(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("mambaclinix_tiny", **kwargs)


def test_layers_replaced_through_the_unet_are_replaced_in_its_parts():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = create_model("mambaclinix_tiny", drop_path_rate=0.0)
    x = torch.randn(1, 1, 16, 16, 8)
    ref = model(x)
    # wraps every BasicBlockD in place of the original, the bottleneck (a direct child) included
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, BasicBlockD))
    assert model.decoder.bottleneck is model.bottleneck and type(model.bottleneck) is not BasicBlockD
    calls = []
    model.bottleneck.register_forward_hook(lambda *_: calls.append(1))
    out = model(x)
    assert calls == [1]
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b)
    sum(o.square().mean() for o in out).backward()
    assert model.stem.conv.weight.grad is not None
    model.stem = nn.Identity()  # a replacement by hand too
    assert model.encoder.stem is model.stem
