"""Mamba block and residual Mamba layer: parameter layout, an independent forward, autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from mambaclinix.layers.mamba import Mamba, MambaLayer
from mambaclinix.ops import selective_scan_ref


def _mamba_ssm_layout(d_model, d_state=16, d_conv=4, expand=2):
    """Parameter names and shapes of ``mamba_ssm.Mamba`` (v1, default arguments)."""
    E, R = expand * d_model, math.ceil(d_model / 16)
    return {
        "A_log": (E, d_state),
        "D": (E,),
        "in_proj.weight": (2 * E, d_model),
        "conv1d.weight": (E, 1, d_conv),
        "conv1d.bias": (E,),
        "x_proj.weight": (R + 2 * d_state, E),
        "dt_proj.weight": (E, R),
        "dt_proj.bias": (E,),
        "out_proj.weight": (d_model, E),
    }


@pytest.mark.parametrize("d_model", [16, 40, 256])
def test_state_dict_layout_matches_mamba_ssm(d_model):
    sd = Mamba(d_model).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _mamba_ssm_layout(d_model)


def test_initialisation_follows_mamba():
    m = Mamba(32, d_state=8)
    A = -torch.exp(m.A_log)
    torch.testing.assert_close(A[5], -torch.arange(1, 9, dtype=torch.float32))
    torch.testing.assert_close(m.D, torch.ones(64))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6
    assert m.dt_proj.weight.abs().max() <= m.dt_rank**-0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay


def _independent_mamba_forward(m: Mamba, hidden):
    """The v1 block written out from the equations, using nn.Conv1d's own padded convolution."""
    L = hidden.shape[1]
    xz = hidden @ m.in_proj.weight.t()
    x, z = xz.chunk(2, dim=-1)
    x = F.silu(m.conv1d(x.transpose(1, 2))[..., :L])  # symmetric padding, truncated: causal
    x_dbl = x.transpose(1, 2) @ m.x_proj.weight.t()
    dt, B, C = x_dbl.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(dt @ m.dt_proj.weight.t() + m.dt_proj.bias).transpose(1, 2)
    y = selective_scan_ref(
        x, delta, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D, z.transpose(1, 2)
    )
    return y.transpose(1, 2) @ m.out_proj.weight.t()


@pytest.mark.parametrize("backend", ["reference", "chunked", "numba"])
def test_mamba_forward_matches_independent_implementation(backend):
    m = Mamba(24, d_state=8, scan_backend=backend).double()
    hidden = torch.randn(2, 30, 24, dtype=torch.float64)
    torch.testing.assert_close(m(hidden), _independent_mamba_forward(m, hidden), rtol=1e-10, atol=1e-12)


def test_layer_is_residual_over_row_major_tokens():
    layer = MambaLayer(8, d_state=4).double()
    x = torch.randn(2, 8, 3, 4, 5, dtype=torch.float64)
    tokens = x.flatten(2).transpose(1, 2)
    assert tokens[0, 1, 0] == x[0, 0, 0, 0, 1]  # W is the fastest axis
    y = layer.proj(layer.norm(layer.mamba(layer.norm(tokens))))
    expected = x + y.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("backend", ["chunked", "numba"])
def test_layer_gradients_reach_every_parameter(backend):
    layer = MambaLayer(16, scan_backend=backend)
    x = torch.randn(2, 16, 4, 4, 4, requires_grad=True)
    layer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_layer_runs_in_float32_under_bf16_autocast():
    layer = MambaLayer(16)
    conv = torch.nn.Conv3d(4, 16, 3, padding=1)
    x = torch.randn(2, 4, 4, 6, 6)
    with torch.no_grad():
        feat = conv(x)
        ref = layer(feat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(feat)  # float32 input: the layer must ignore autocast entirely
            half = conv(x)  # a bf16 feature map, as a network under autocast produces
            out_half = layer(half)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert half.dtype == torch.bfloat16 and out_half.dtype == torch.bfloat16
    torch.testing.assert_close(out_half.float(), layer(half.float()).bfloat16().float(), rtol=0, atol=0)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="channels=8"):
        MambaLayer(8)(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="d_model=8"):
        Mamba(8)(torch.zeros(1, 5, 4))
    with pytest.raises(ValueError, match="d_state"):
        Mamba(8, d_state=0)
