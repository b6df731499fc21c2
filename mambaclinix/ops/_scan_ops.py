"""The fused selective-scan kernels (numba on the CPU, Triton on GPUs) as ``torch.library`` custom ops.

Two ops, each with a fake (meta) implementation that gives the output shapes without computing, so that
``torch.compile`` traces a network through them without a graph break and ``torch.export`` records
them as single nodes:

- ``mambaclinix::selective_scan_fwd(u, delta, A, B, C, chunk, backend) -> (y, last, hs)``: the core
  recurrence (``delta`` after bias and softplus; no ``D``, no gate), its last state ``(b, E, N)`` and the
  state checkpoints ``hs`` that the backward recomputes each chunk from (a backend-specific layout).
- ``mambaclinix::selective_scan_bwd(u, delta, A, B, C, hs, dy, dlast, chunk, backend)
  -> (du, ddelta, dA, dB, dC)``: the hand-written backward, registered as the forward op's autograd
  formula (``torch.library.register_autograd``).

``backend`` is ``"numba"`` or ``"triton"``. The kernels' packages are imported lazily, inside the
implementations, so this module imports without them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OP_BACKENDS", "scan_core"]

OP_BACKENDS = ("numba", "triton")
NUMBA_LANES = 16  # mambaclinix.ops._scan_numba.LANES: channels are padded to a multiple of it


def _numba_padded_channels(E: int) -> int:
    return -(-E // NUMBA_LANES) * NUMBA_LANES


def _triton_chunk(chunk: int) -> int:
    """The chunk the Triton kernels use: ``chunk`` rounded up to a power of two, at most 128."""
    return 1 << (max(1, min(chunk, 128)) - 1).bit_length()


def _padded_t(x: Tensor, width: int, value: float = 0.0) -> Tensor:
    """``(..., E, M)`` -> contiguous ``(..., M, width)``, channels padded with ``value`` (small tensors)."""
    x = x.transpose(-1, -2)
    return F.pad(x, (0, width - x.shape[-1]), value=value).contiguous()


def _check_backend(backend: str) -> None:
    if backend not in OP_BACKENDS:
        raise ValueError(f"selective_scan_fwd: backend must be one of {OP_BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------------------------------
# Forward


@torch.library.custom_op("mambaclinix::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Core scan: ``(y (b, E, L), last (b, E, N), hs)`` (see the module docstring)."""
    _check_backend(backend)
    u, delta, A, B, C = (t.detach().contiguous() for t in (u, delta, A, B, C))
    if backend == "triton":
        from mambaclinix.ops import _scan_triton as k

        y, hs, last = k.scan_fwd(u, delta, A, B, C, chunk)
        return y, last, hs
    from mambaclinix.ops import _scan_numba as k

    assert k.LANES == NUMBA_LANES
    k.set_threads(torch.get_num_threads())
    nb, E, L = u.shape
    N = A.shape[1]
    Ep = _numba_padded_channels(E)
    AT = _padded_t(A, Ep, value=-1.0)  # (N, Ep)
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
    y = u.new_empty(nb, E, L)
    hs = u.new_empty(nb, -(-L // chunk), N, Ep)
    last = u.new_empty(nb, N, Ep)
    k.scan_fwd(u.numpy(), delta.numpy(), AT.numpy(), Bt.numpy(), Ct.numpy(), chunk,
               y.numpy(), hs.numpy(), last.numpy())  # fmt: skip
    return y, last[..., :E].transpose(1, 2).contiguous(), hs


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, chunk, backend):
    _check_backend(backend)
    nb, E, L = u.shape
    N = A.shape[1]
    if backend == "triton":
        hs = u.new_empty(nb, -(-L // _triton_chunk(chunk)), E, N)
    else:
        hs = u.new_empty(nb, -(-L // chunk), N, _numba_padded_channels(E))
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(nb, E, N), hs


# --------------------------------------------------------------------------------------------------
# Backward


@torch.library.custom_op("mambaclinix::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    hs: Tensor,
    dy: Tensor,
    dlast: Tensor,
    chunk: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(du, ddelta, dA, dB, dC)`` of :func:`selective_scan_fwd`."""
    _check_backend(backend)
    u, delta, A, B, C, hs = (t.detach().contiguous() for t in (u, delta, A, B, C, hs))
    dy, dlast = (t.detach().to(u.dtype).contiguous() for t in (dy, dlast))
    if backend == "triton":
        from mambaclinix.ops import _scan_triton as k

        return tuple(k.scan_bwd(u, delta, A, B, C, hs, dy, dlast, chunk))
    from mambaclinix.ops import _scan_numba as k

    nb, E, L = u.shape
    N = A.shape[1]
    Ep = _numba_padded_channels(E)
    AT = _padded_t(A, Ep, value=-1.0)
    Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
    threads = torch.get_num_threads()
    k.set_threads(threads)
    groups = max(1, min(Ep // NUMBA_LANES, -(-2 * threads // nb)))
    dlastT = _padded_t(dlast, Ep)
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA = torch.empty(nb, N, Ep, dtype=torch.float64)
    dB = u.new_empty(groups, nb, L, N)
    dC = u.new_empty(groups, nb, L, N)
    k.scan_bwd(u.numpy(), delta.numpy(), AT.numpy(), Bt.numpy(), Ct.numpy(), chunk, hs.numpy(),
               dy.numpy(), dlastT.numpy(), groups, du.numpy(), ddelta.numpy(), dA.numpy(),
               dB.numpy(), dC.numpy())  # fmt: skip
    dt = u.dtype
    dB = dB.sum(0, dtype=torch.float64).to(dt).transpose(1, 2).contiguous()
    dC = dC.sum(0, dtype=torch.float64).to(dt).transpose(1, 2).contiguous()
    dA = dA.sum(0)[:, :E].t().to(dt).contiguous()
    return du, ddelta, dA, dB, dC


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, hs, dy, dlast, chunk, backend):
    _check_backend(backend)
    like = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, delta, A, B, C))
    return tuple(like)


# --------------------------------------------------------------------------------------------------
# Autograd


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, chunk, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, output[2])
    ctx.chunk, ctx.backend = chunk, backend


def _backward(ctx, dy, dlast, _dhs):
    u, delta, A, B, C, hs = ctx.saved_tensors
    grads = torch.ops.mambaclinix.selective_scan_bwd(u, delta, A, B, C, hs, dy, dlast, ctx.chunk, ctx.backend)
    return (*grads, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def scan_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int, backend: str):
    """``(y, last)`` of the core scan through the custom op (``backend``: ``"numba"`` or ``"triton"``)."""
    y, last, _ = torch.ops.mambaclinix.selective_scan_fwd(u, delta, A, B, C, chunk, backend)
    return y, last
