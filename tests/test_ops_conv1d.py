"""Causal depthwise conv1d against a hand computation and against the explicit-sum reference."""

import pytest
import torch

from mambaclinix.ops import causal_conv1d, causal_conv1d_ref


def test_hand_computation():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    w = torch.tensor([[0.5, -1.0, 2.0]])  # taps on x[t-2], x[t-1], x[t]
    b = torch.tensor([0.25])
    expected = torch.tensor([2.0, 4 - 1, 6 - 2 + 0.5, 8 - 3 + 1]) + 0.25
    for fn in (causal_conv1d, causal_conv1d_ref):
        torch.testing.assert_close(fn(x, w, b)[0, 0], expected)


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_matches_reference_values_and_gradients(activation, width):
    x = torch.randn(2, 6, 17, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, width, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 6, 17, dtype=torch.float64)
    out = causal_conv1d(x, w, b, activation, backend="torch")
    ref = causal_conv1d_ref(x, w, b, activation)
    torch.testing.assert_close(out, ref)
    for a, r in zip(
        torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g), strict=True
    ):
        torch.testing.assert_close(a, r)


def test_is_causal():
    x = torch.randn(1, 3, 10)
    w = torch.randn(3, 4)
    y = causal_conv1d(x, w)
    x2 = x.clone()
    x2[..., 6:] = 100.0
    torch.testing.assert_close(causal_conv1d(x2, w)[..., :6], y[..., :6])


def test_bad_arguments():
    with pytest.raises(ValueError, match="same channels"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(3, 2), activation="relu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(3, 2), backend="cuda")
    with pytest.raises(ValueError, match="not a conv1d backend"):
        causal_conv1d(torch.zeros(1, 3, 5), torch.zeros(3, 2), backend="triton")
