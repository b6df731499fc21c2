"""The selective scan of Mamba (S6), with one signature and several implementations.

``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False, backend=None, chunk=64)`` follows ``mamba_ssm.ops.selective_scan_interface.
selective_scan_fn``:

- ``u``, ``delta``: ``(B, E, L)``; ``A``: ``(E, N)`` (real, normally negative); ``B``, ``C``: ``(B, N, L)``
  (input-dependent); ``D``: ``(E,)``; ``z``: ``(B, E, L)``; ``delta_bias``: ``(E,)``.
- ``Δ = softplus(delta + delta_bias)`` if ``delta_softplus`` else ``delta + delta_bias``;
  ``h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t`` (``h_{-1} = 0``, ``h`` is ``(B, E, N)``);
  ``y_t = C_t·h_t + D ⊙ u_t``; ``out = y ⊙ SiLU(z)`` if ``z`` is given.
- Returns ``out`` ``(B, E, L)`` in ``u``'s dtype, and with ``return_last_state`` also ``h_{L-1}``
  ``(B, E, N)`` in float32 (float64 for float64 inputs). Half-precision inputs are computed in float32.

:func:`selective_scan_ref` is the sequential reference the tests trust. See :mod:`mambaclinix.ops.backend`
for how the fast implementation is chosen. The ``"numba"`` and ``"triton"`` kernels run as the
``torch.library`` custom ops of :mod:`mambaclinix.ops._scan_ops` (fake implementations, registered
backward), so ``torch.compile`` traces a model through them without a graph break and ``torch.export``
records each call as one ``mambaclinix.selective_scan_fwd`` node; ``"reference"`` and ``"chunked"``
are plain PyTorch and trace as such.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mambaclinix.ops._scan_ops import OP_BACKENDS, scan_core
from mambaclinix.ops.backend import resolve_backend

__all__ = ["selective_scan", "selective_scan_ref"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, length), got shape {tuple(u.shape)}")
    nb, E, L = u.shape
    if L < 1:
        raise ValueError(f"u must have a sequence length >= 1, got shape {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"A must be (channels={E}, d_state), got shape {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (nb, N, L):
            raise ValueError(
                f"{name} must be (batch, d_state, length) = {(nb, N, L)}, got shape {tuple(t.shape)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (E,):
            raise ValueError(f"{name} must be (channels,) = ({E},), got shape {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Sequential reference: one line of recurrence per time step, autograd for the backward.

    Short and obviously correct; memory grows as ``B·E·N·L`` when gradients are needed. Same arguments
    and returns as :func:`selective_scan`. It deliberately repeats the bias/softplus/``D``/``z`` handling
    of :func:`selective_scan` instead of sharing it, so that the tests compare against code that owes
    nothing to the fast paths.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_in, ct = u.dtype, _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for d_t, u_t, b_t, c_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        h = torch.exp(d_t[..., None] * A) * h + (d_t * u_t)[..., None] * b_t[:, None, :]
        ys.append((h * c_t[:, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


# --------------------------------------------------------------------------------------------------
# "chunked": the loop in PyTorch, with the state checkpointed every `chunk` steps (any device).


def _chunk_segment(h, u, delta, A, B, C):
    """``chunk`` steps of the recurrence; decay and input terms computed for the whole segment at once."""
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :])  # (b, E, T, N)
    dBu = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # (b, E, T, N)
    hs = []
    for a_t, x_t in zip(dA.unbind(2), dBu.unbind(2), strict=True):
        h = a_t * h + x_t
        hs.append(h)
    y = torch.einsum("betn,bnt->bet", torch.stack(hs, dim=2), C)
    return y, h


def _core_chunked(u, delta, A, B, C, chunk):
    nb, E, L = u.shape
    h = u.new_zeros(nb, E, A.shape[1])
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    ys = []
    for t0 in range(0, L, chunk):
        sl = slice(t0, t0 + chunk)
        args = (h, u[..., sl], delta[..., sl], A, B[..., sl], C[..., sl])
        y, h = checkpoint(_chunk_segment, *args, use_reentrant=False) if track else _chunk_segment(*args)
        ys.append(y)
    return torch.cat(ys, dim=-1), h


# --------------------------------------------------------------------------------------------------


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    backend: str | None = None,
    chunk: int = 64,
):
    """Selective scan ``y = S6(u; Δ, A, B, C) + D·u``, optionally gated by ``SiLU(z)``.

    Args:
        u: ``(B, E, L)`` input.
        delta: ``(B, E, L)`` step sizes before bias/softplus.
        A: ``(E, N)`` state matrix (diagonal per channel).
        B: ``(B, N, L)`` input projection.
        C: ``(B, N, L)`` output projection.
        D: ``(E,)`` skip, or None.
        z: ``(B, E, L)`` gate, or None.
        delta_bias: ``(E,)``, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the final state ``(B, E, N)``.
        backend: ``None`` (process default), ``"auto"``, ``"reference"``, ``"chunked"``, ``"numba"``,
            ``"triton"`` or ``"cuda"``; see :mod:`mambaclinix.ops.backend`.
        chunk: state checkpoint interval of the ``"chunked"``, ``"numba"`` and ``"triton"`` backends
            (``"triton"`` rounds it to a power of two, at most 128); memory is
            ``O(B·E·N·L / chunk + B·E·N·chunk)``.

    Returns:
        ``out`` ``(B, E, L)``, or ``(out, last_state)`` with ``return_last_state``.
    """
    name = resolve_backend(backend, u.device)
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype_in, ct = u.dtype, _compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if name in OP_BACKENDS:
        y, last = scan_core(u, delta, A, B, C, chunk, name)
    else:
        y, last = _core_chunked(u, delta, A, B, C, chunk)
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
