"""The selective scan in a form that exports to standard ONNX operators.

The recurrence ``h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t``, ``y_t = C_t·h_t`` (Gu & Dao, 2023) is a
sequential loop; an ONNX graph has no cheap per-step loop. :func:`selective_scan_chunked_closed_form`
evaluates it chunk by chunk, each chunk in closed form with tensor operators only (``CumSum``, ``Exp``,
``MatMul``, ``Where``, elementwise arithmetic), and carries the state from chunk to chunk. Within a chunk
of ``T`` steps starting with state ``h₀``, with ``a_k = Δ_k·A ≤ 0``:

``h_t = Σ_{s≤t} exp(Σ_{k=s+1..t} a_k) · Δ_s B_s u_s + exp(Σ_{k≤t} a_k) · h₀``.

Numerics: every exponent is a sum of non-positive terms, so ``exp`` never overflows, for any ``Δ·|A|``
(large steps only drive the decay factors to 0, as in the sequential loop). The segment sums
``Σ_{k=s+1..t} a_k`` are formed by a cumulative sum of the masked ``(T, T)`` repetition of ``a``, the
segment-wise form of Mamba-2's ``segsum`` (Dao & Gu, 2024), not as the difference ``S_t - S_s`` of two
running sums, which would cancel catastrophically once the sums are large and is unbounded above where it
is masked. No ``-inf`` is ever formed: the decay matrix is masked after ``exp``.

Cost: ``O(B·E·N·L·T)`` operations and ``O(B·E·N·T²)`` memory per chunk; the chunks are unrolled in the
graph (``ceil(L / T)`` of them), so an exported graph is specialised to its sequence length, i.e. to the
spatial size of its input. Used only while exporting (:func:`mambaclinix.deploy.export_onnx`); training
and PyTorch inference keep :func:`mambaclinix.ops.selective_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_chunked_closed_form"]


def _segment_decay(a: torch.Tensor) -> torch.Tensor:
    """``(..., T) -> (..., T, T)``: ``out[..., t, s] = exp(a[s+1] + ... + a[t])`` for ``s <= t``, else 0."""
    T = a.shape[-1]
    idx = torch.arange(T, device=a.device)
    strictly_lower = idx[:, None] > idx[None, :]  # (t, s): k = t contributes to rows >= k, columns < k
    rep = torch.where(strictly_lower, a.unsqueeze(-1), torch.zeros((), dtype=a.dtype, device=a.device))
    seg = torch.cumsum(rep, dim=-2)  # seg[t, s] = sum of a[k] for s < k <= t (0 on and above the diagonal)
    lower = idx[:, None] >= idx[None, :]
    return torch.where(lower, torch.exp(seg), torch.zeros((), dtype=a.dtype, device=a.device))


def selective_scan_chunked_closed_form(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int = 32,
) -> torch.Tensor:
    """Selective scan with the arguments and output of :func:`mambaclinix.ops.selective_scan` (no
    ``return_last_state``), in closed form per chunk of ``chunk`` steps (see the module docstring).

    Args:
        u: ``(B, E, L)`` input.
        delta: ``(B, E, L)`` step sizes before bias/softplus.
        A: ``(E, N)``, normally negative (``-exp(A_log)``).
        B: ``(B, N, L)``.
        C: ``(B, N, L)``.
        D: ``(E,)`` skip, or None.
        z: ``(B, E, L)`` gate, or None.
        delta_bias: ``(E,)``, or None.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk: steps per chunk ``T``; memory per chunk is ``B·E·N·T²`` values.

    Returns:
        ``(B, E, L)`` in ``u``'s dtype (computed in float32, or float64 for float64 inputs).
    """
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(
            f"expected u, delta (batch, channels, length) and A (channels, d_state), got u "
            f"{tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}"
        )
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    dtype_in = u.dtype
    ct = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    L = u.shape[-1]
    du = delta * u  # (b, E, L)
    h = None  # state entering the chunk, (b, E, N); None = zero
    ys = []
    for t0 in range(0, L, chunk):
        t1 = min(L, t0 + chunk)
        d_c = delta[..., t0:t1]  # (b, E, T)
        a = d_c.unsqueeze(2) * A[:, :, None]  # (b, E, N, T), <= 0
        x = du[..., t0:t1].unsqueeze(2) * B[:, None, :, t0:t1]  # (b, E, N, T)
        hs = torch.matmul(_segment_decay(a), x.unsqueeze(-1)).squeeze(-1)  # (b, E, N, T)
        if h is not None:
            hs = hs + torch.exp(torch.cumsum(a, dim=-1)) * h.unsqueeze(-1)
        ys.append((hs * C[:, None, :, t0:t1]).sum(2))  # (b, E, T)
        h = hs[..., -1]
    y = torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype_in)
