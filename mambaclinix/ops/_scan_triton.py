"""Triton kernels of the selective scan (GPU without mamba-ssm).

One program owns one batch element and ``BLOCK_E`` channels, with all ``N`` states in registers, and
walks the sequence in chunks of ``T`` steps. Inside a chunk the recurrence ``h_t = a_t·h_{t-1} + b_t``
(``a_t = exp(Δ_t·A)``, ``b_t = Δ_t·B_t·u_t``) is a parallel associative scan along the chunk
(``tl.associative_scan`` with the combine ``(a1, b1)∘(a2, b2) = (a1·a2, a2·b1 + b2)``); the state is
carried from chunk to chunk. The forward stores the state at the start of every chunk
(``B·E·N·L/T`` values); the backward walks the chunks in reverse, recomputes each chunk's states from
that checkpoint and runs the adjoint recurrence ``dh_t = C_t·dy_t + a_{t+1}·dh_{t+1}`` as a reverse
associative scan.

Numerics as in the other backends: the recurrence is evaluated directly (no log-space), so it is finite
for any ``Δ·|A|``; the state before each step is obtained by a scan over the inputs shifted by one step
rather than by dividing by ``a_t``, which would be unstable where ``a_t`` underflows.

The number of chunks is a compile-time constant, so each sequence length compiles its own kernel
once (a network has one length per Mamba stage). Imported only when the ``"triton"`` backend is used.
``TRITON_INTERPRET=1`` runs the same kernels on the CPU (slowly), which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["scan_fwd", "scan_bwd"]


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, hs_ptr, last_ptr,
    E, N, L, n_chunks: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    e0 = tl.program_id(1) * BLOCK_E
    e = e0 + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, T)
    e_ok = e < E
    n_ok = n < N
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=e_ok[:, None] & n_ok[None, :], other=0.0)
    h = tl.zeros([BLOCK_E, BLOCK_N], dtype=A.dtype)
    row = b * E * L + e[:, None] * L  # (BLOCK_E, 1) offsets into (batch, E, L)
    bc_row = b * N * L + n[:, None] * L  # (BLOCK_N, 1) offsets into (batch, N, L)
    for c in range(n_chunks):
        tt = c * T + t
        t_ok = tt < L
        m_et = e_ok[:, None] & t_ok[None, :]
        m_nt = n_ok[:, None] & t_ok[None, :]
        dt = tl.load(dt_ptr + row + tt[None, :], mask=m_et, other=0.0)
        u = tl.load(u_ptr + row + tt[None, :], mask=m_et, other=0.0)
        Bm = tl.load(B_ptr + bc_row + tt[None, :], mask=m_nt, other=0.0)
        Cm = tl.load(C_ptr + bc_row + tt[None, :], mask=m_nt, other=0.0)
        # checkpoint: the state entering this chunk
        hs_off = ((b * n_chunks + c) * E + e[:, None]) * N + n[None, :]
        tl.store(hs_ptr + hs_off, h, mask=e_ok[:, None] & n_ok[None, :])
        a = tl.exp(dt[:, None, :] * A[:, :, None])  # (BLOCK_E, BLOCK_N, T); 1 on padded steps
        x = (dt * u)[:, None, :] * Bm[None, :, :]  # 0 on padded steps
        a_cum, h_loc = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
        h_all = h_loc + a_cum * h[:, :, None]
        y = tl.sum(h_all * Cm[None, :, :], axis=1)  # (BLOCK_E, T)
        tl.store(y_ptr + row + tt[None, :], y, mask=m_et)
        # padded steps are identities, so the last column is the state after the chunk
        h = tl.sum(tl.where((t == T - 1)[None, None, :], h_all, 0.0), axis=2)
    tl.store(last_ptr + (b * E + e[:, None]) * N + n[None, :], h, mask=e_ok[:, None] & n_ok[None, :])


@triton.jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, hs_ptr, dy_ptr, dlast_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
    E, N, L, n_chunks: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    e0 = tl.program_id(1) * BLOCK_E
    e = e0 + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    t = tl.arange(0, T)
    e_ok = e < E
    n_ok = n < N
    m_en = e_ok[:, None] & n_ok[None, :]
    A = tl.load(A_ptr + e[:, None] * N + n[None, :], mask=m_en, other=0.0)
    en_off = (b * E + e[:, None]) * N + n[None, :]
    dh_next = tl.load(dlast_ptr + en_off, mask=m_en, other=0.0)  # dL/dh at the step after the chunk
    dA_acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=A.dtype)
    row = b * E * L + e[:, None] * L
    bc_row = b * N * L + n[:, None] * L
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        tt = c * T + t
        t_ok = tt < L
        m_et = e_ok[:, None] & t_ok[None, :]
        m_nt = n_ok[:, None] & t_ok[None, :]
        dt = tl.load(dt_ptr + row + tt[None, :], mask=m_et, other=0.0)
        u = tl.load(u_ptr + row + tt[None, :], mask=m_et, other=0.0)
        Bm = tl.load(B_ptr + bc_row + tt[None, :], mask=m_nt, other=0.0)
        Cm = tl.load(C_ptr + bc_row + tt[None, :], mask=m_nt, other=0.0)
        dy = tl.load(dy_ptr + row + tt[None, :], mask=m_et, other=0.0)
        h0 = tl.load(hs_ptr + ((b * n_chunks + c) * E + e[:, None]) * N + n[None, :], mask=m_en, other=0.0)
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        # state before each step: scan over the inputs shifted by one (identity at the chunk start)
        tp = tt - 1
        p_ok = (t >= 1) & (tp < L)
        dt_p = tl.load(dt_ptr + row + tp[None, :], mask=e_ok[:, None] & p_ok[None, :], other=0.0)
        u_p = tl.load(u_ptr + row + tp[None, :], mask=e_ok[:, None] & p_ok[None, :], other=0.0)
        B_p = tl.load(B_ptr + bc_row + tp[None, :], mask=n_ok[:, None] & p_ok[None, :], other=0.0)
        a_p = tl.exp(dt_p[:, None, :] * A[:, :, None])
        x_p = (dt_p * u_p)[:, None, :] * B_p[None, :, :]
        a_cum, h_loc = tl.associative_scan((a_p, x_p), axis=2, combine_fn=_combine)
        h_prev = h_loc + a_cum * h0[:, :, None]  # (BLOCK_E, BLOCK_N, T)
        h = a * h_prev + (dt * u)[:, None, :] * Bm[None, :, :]
        # adjoint: dh_t = C_t·dy_t + a_{t+1}·dh_{t+1}, a_{t+1} = 1 past the end
        tn = tt + 1
        n_ok_t = tn < L
        dt_n = tl.load(dt_ptr + row + tn[None, :], mask=e_ok[:, None] & n_ok_t[None, :], other=0.0)
        a_n = tl.exp(dt_n[:, None, :] * A[:, :, None])
        g = dy[:, None, :] * Cm[None, :, :]
        r_cum, dh_loc = tl.associative_scan((a_n, g), axis=2, combine_fn=_combine, reverse=True)
        dh = dh_loc + r_cum * dh_next[:, :, None]
        dh_next = tl.sum(tl.where((t == 0)[None, None, :], dh, 0.0), axis=2)
        # gradients of this chunk
        w = dh * a * h_prev  # dh_t · ∂h_t/∂(Δ_t·A)
        dA_acc += tl.sum(w * dt[:, None, :], axis=2)
        dhB = tl.sum(dh * Bm[None, :, :], axis=1)  # (BLOCK_E, T)
        ddt = tl.sum(w * A[:, :, None], axis=1) + dhB * u
        du = dhB * dt
        tl.store(ddt_ptr + row + tt[None, :], ddt, mask=m_et)
        tl.store(du_ptr + row + tt[None, :], du, mask=m_et)
        dB = tl.sum(dh * (dt * u)[:, None, :], axis=0)  # (BLOCK_N, T), summed over this block's channels
        dC = tl.sum(h * dy[:, None, :], axis=0)
        tl.atomic_add(dB_ptr + bc_row + tt[None, :], dB, mask=m_nt)
        tl.atomic_add(dC_ptr + bc_row + tt[None, :], dC, mask=m_nt)
    tl.store(dA_ptr + en_off, dA_acc, mask=m_en)


#: Per kernel: (elements of a program's ``BLOCK_E × BLOCK_N × T`` tile, warps per program). The
#: backward holds about three times as many live tiles as the forward, hence its smaller tile.
TILES = {"fwd": (4096, 4), "bwd": (2048, 4)}


def _config(E: int, N: int, chunk: int, kind: str) -> tuple[int, int, int, int]:
    elements, warps = TILES[kind]
    block_n = triton.next_power_of_2(N)
    t = triton.next_power_of_2(max(1, min(chunk, 128)))
    block_e = max(1, min(triton.next_power_of_2(E), elements // (block_n * t)))
    return block_e, block_n, t, warps


def scan_fwd(u, delta, A, B, C, chunk: int):
    """``u``, ``delta`` ``(b, E, L)``; ``A`` ``(E, N)``; ``B``, ``C`` ``(b, N, L)``, contiguous, same dtype.

    Returns ``y`` ``(b, E, L)``, the chunk-start states ``(b, chunks, E, N)`` and the last state
    ``(b, E, N)``.
    """
    nb, E, L = u.shape
    N = A.shape[1]
    block_e, block_n, T, warps = _config(E, N, chunk, "fwd")
    n_chunks = triton.cdiv(L, T)
    y = torch.empty_like(u)
    hs = u.new_empty(nb, n_chunks, E, N)
    last = u.new_empty(nb, E, N)
    grid = (nb, triton.cdiv(E, block_e))
    _fwd_kernel[grid](u, delta, A, B, C, y, hs, last, E, N, L, n_chunks,
                      BLOCK_E=block_e, BLOCK_N=block_n, T=T, num_warps=warps)  # fmt: skip
    return y, hs, last


def scan_bwd(u, delta, A, B, C, hs, dy, dlast, chunk: int):
    """Gradients ``(du, ddelta, dA, dB, dC)`` of the core scan; ``hs`` from :func:`scan_fwd`."""
    nb, E, L = u.shape
    N = A.shape[1]
    block_e, block_n, T, warps = _config(E, N, chunk, "bwd")
    n_chunks = hs.shape[1]
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA = u.new_empty(nb, E, N)
    dB = torch.zeros_like(B)
    dC = torch.zeros_like(C)
    grid = (nb, triton.cdiv(E, block_e))
    _bwd_kernel[grid](u, delta, A, B, C, hs, dy, dlast, du, ddelta, dA, dB, dC, E, N, L, n_chunks,
                      BLOCK_E=block_e, BLOCK_N=block_n, T=T, num_warps=warps)  # fmt: skip
    return du, ddelta, dA.sum(0), dB, dC
