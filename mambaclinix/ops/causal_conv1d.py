"""Causal depthwise conv1d, with the signature of ``causal_conv1d.causal_conv1d_fn``.

``causal_conv1d(x, weight, bias=None, activation=None, backend=None)``: ``x`` ``(B, D, L)``,
``weight`` ``(D, W)``, ``bias`` ``(D,)``; output ``(B, D, L)`` where ``out[..., t]`` sees
``x[..., t-W+1 : t+1]`` only; ``activation`` is ``None`` or ``"silu"``/``"swish"``.

Backends: ``"torch"`` (``F.conv1d`` on a left-padded input: exact and fast on any device) and
``"cuda"`` (the ``causal_conv1d`` package's kernel, needs ``pip install "mambaclinix[cuda]"`` and
CUDA tensors). ``None``/``"auto"`` picks ``"cuda"`` for CUDA tensors when the package imports, else
``"torch"``; an explicit name is used or raises.

The ``"cuda"`` kernel runs as the ``torch.library`` custom op ``mambaclinix::causal_conv1d`` (with a
fake implementation and a backward written in PyTorch, ``mambaclinix::causal_conv1d_bwd``), so that
``torch.compile`` and ``torch.export`` trace through it; the ``"torch"`` path is plain ATen operators,
which both trace (and ONNX exports) natively. The op also takes ``backend="torch"``, the same formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
        return torch.ops.mambaclinix.causal_conv1d(x, weight, bias, activation is not None, "cuda")
    return _conv_torch(x, weight, bias, activation is not None)


def _conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    W = weight.shape[1]
    out = F.conv1d(F.pad(x, (W - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if silu else out


# --------------------------------------------------------------------------------------------------
# The custom ops


@torch.library.custom_op("mambaclinix::causal_conv1d", mutates_args=())
def causal_conv1d_op(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, backend: str) -> Tensor:
    """``causal_conv1d(x, weight, bias, "silu" if silu else None)`` with ``backend`` "torch" or "cuda"."""
    if backend == "cuda":
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn(x.contiguous(), weight.contiguous(), bias, "silu" if silu else None)
    if backend != "torch":
        raise ValueError(f"mambaclinix::causal_conv1d: backend must be 'torch' or 'cuda', got {backend!r}")
    return _conv_torch(x, weight, bias, silu).contiguous()


@causal_conv1d_op.register_fake
def _(x, weight, bias, silu, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("mambaclinix::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; ``dbias`` is computed also when ``bias`` is None (then unused).

    With ``p = conv(x) + bias`` and ``g = dout · SiLU'(p)`` (``dout`` without the activation):
    ``dx`` is the anti-causal conv of ``g`` with the flipped kernel, ``dweight[d, k] = Σ g[·, d, t] ·
    x_pad[·, d, t + k]``, ``dbias = Σ g``.
    """
    W, L = weight.shape[1], x.shape[-1]
    xp = F.pad(x, (W - 1, 0))
    g = dout
    if silu:
        p = F.conv1d(xp, weight.unsqueeze(1), bias, groups=x.shape[1])
        s = torch.sigmoid(p)
        g = dout * s * (1 + p * (1 - s))
    dx = F.conv1d(F.pad(g, (0, W - 1)), weight.flip(-1).unsqueeze(1), None, groups=x.shape[1])
    dw = torch.einsum("bdl,bdlw->dw", g, xp.unfold(-1, W, 1)[..., :L, :])
    return dx.contiguous(), dw.contiguous(), g.sum((0, 2))


@causal_conv1d_bwd.register_fake
def _(x, weight, bias, dout, silu):
    fmt = torch.contiguous_format
    return (torch.empty_like(x, memory_format=fmt), torch.empty_like(weight, memory_format=fmt),
            x.new_empty(weight.shape[0]))  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, _backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu, ctx.has_bias = silu, bias is not None


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.mambaclinix.causal_conv1d_bwd(x, weight, bias, dout, ctx.silu)
    return dx, dw, (db if ctx.has_bias else None), None, None


causal_conv1d_op.register_autograd(_backward, setup_context=_setup_context)
