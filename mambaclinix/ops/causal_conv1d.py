"""Causal depthwise conv1d, with the signature of ``causal_conv1d.causal_conv1d_fn``.

``causal_conv1d(x, weight, bias=None, activation=None, backend=None)``: ``x`` ``(B, D, L)``,
``weight`` ``(D, W)``, ``bias`` ``(D,)``; output ``(B, D, L)`` where ``out[..., t]`` sees
``x[..., t-W+1 : t+1]`` only; ``activation`` is ``None`` or ``"silu"``/``"swish"``.

Backends: ``"torch"`` (``F.conv1d`` on a left-padded input: exact and fast on any device) and
``"cuda"`` (the ``causal_conv1d`` package's kernel, needs ``pip install "mambaclinix[cuda]"`` and
CUDA tensors). ``None``/``"auto"`` picks ``"cuda"`` for CUDA tensors when the package imports, else
``"torch"``; an explicit name is used or raises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambaclinix.ops.backend import has_causal_conv1d

CONV_BACKENDS = ("auto", "torch", "cuda")
_ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None) -> torch.Tensor:  # fmt: skip
    """Reference: an explicit sum over the kernel taps (the tests trust this one)."""
    W, L = weight.shape[1], x.shape[-1]
    xp = F.pad(x, (W - 1, 0))
    out = sum(weight[:, k, None] * xp[..., k : k + L] for k in range(W))
    if bias is not None:
        out = out + bias[:, None]
    return F.silu(out) if activation in ("silu", "swish") else out


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal depthwise 1D convolution (see the module docstring for shapes and backends)."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"expected x (batch, channels, length) and weight (channels, width) with the same channels, "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    name = backend or "auto"
    if name not in CONV_BACKENDS:
        raise ValueError(f"backend={name!r} is not a conv1d backend; expected one of {CONV_BACKENDS}")
    if name == "auto":
        name = "cuda" if x.is_cuda and has_causal_conv1d() else "torch"
    if name == "cuda":
        if not x.is_cuda:
            raise ValueError(f"conv1d backend 'cuda' needs CUDA tensors, got device {x.device}")
        if not has_causal_conv1d():
            raise ImportError("conv1d backend 'cuda' needs causal-conv1d: pip install 'mambaclinix[cuda]'")
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x, weight, bias, activation)
    W = weight.shape[1]
    out = F.conv1d(F.pad(x, (W - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation in ("silu", "swish") else out
