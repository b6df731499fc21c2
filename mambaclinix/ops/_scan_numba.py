"""Fused CPU selective-scan kernels, JIT-compiled with numba.

The forward pass runs the recurrence for blocks of ``LANES`` channels at once (one SIMD vector of state
per ``n``) and stores the state only every ``chunk`` steps (``(B, ceil(L / chunk), N, E)``), never the
full ``(B, E, N, L)`` history. The backward pass walks the chunks in reverse, recomputes the states of
one chunk from its checkpoint into a small per-thread buffer, and back-propagates through it. Memory is
therefore ``O(B·E·N·L / chunk)`` plus ``O(B·E·L)`` for the inputs and gradients.

The recurrence is evaluated directly (``h = exp(Δ·A)·h + Δ·B·u``); ``exp`` of a non-positive argument
never overflows, so the kernel stays finite for any ``Δ·|A|`` (unlike log-space cumulative-sum
formulations). Reductions that run along the sequence (``dA``) accumulate in float64.

This module imports numba at import time; import it only through :mod:`mambaclinix.ops.selective_scan`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# Everything but "nnan"/"ninf": NaN and Inf inputs propagate as they would in PyTorch.
_FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

# --------------------------------------------------------------------------------------------------
# A vectorisable float32 exp. LLVM cannot vectorise calls to libm's expf (numba's SVML path is absent
# from the PyPI llvmlite), so the recurrence's 16-wide inner loop would run one scalar call per lane.
# This is Cephes' expf: Cody-Waite range reduction, a degree-7 polynomial and an exponent built from
# bits; relative error <= 1 ulp-ish (6e-8 measured) on [-87.3, 88.3], clamped outside (exp(-87.3)
# ~ 1e-38 stands in for 0). float64 keeps math.exp.

_f = np.float32
_LOG2E, _LN2_HI, _LN2_LO = _f(1.4426950408889634), _f(0.693359375), _f(-2.12194440e-4)
_P = tuple(_f(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                           1.6666665459e-1, 5.0000001201e-1))  # fmt: skip
_LO, _HI, _HALF, _ONE = _f(-87.3), _f(88.3), _f(0.5), _f(1.0)


@intrinsic
def _bits_to_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def fexp(x):
    """``exp(x)``; compiled to a vectorisable polynomial for float32 (see above)."""
    return math.exp(x)


@overload(fexp)
def _fexp_impl(x):
    if x == types.float32:
        p0, p1, p2, p3, p4, p5 = _P

        def impl(x):
            x = min(max(x, _LO), _HI)
            n = np.floor(x * _LOG2E + _HALF)  # stays float32 (math.floor would give int64)
            r = x - n * _LN2_HI - n * _LN2_LO
            p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
            p = p * r * r + r + _ONE
            return p * _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))

        return impl
    return lambda x: math.exp(x)


LANES = 16  # channels processed together (one vector of state per n)


@njit(fastmath=_FASTMATH, cache=True, nogil=True, inline="always")
def _load_lanes(src, b, e0, width, t, out):  # pragma: no cover - compiled
    """``out[l] = src[b, e0 + l, t]`` for the block's channels, 0 in the padding lanes."""
    for lane in range(LANES):
        out[lane] = src[b, e0 + lane, t] if lane < width else 0.0


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def scan_fwd(u, delta, AT, Bt, Ct, chunk, y, hs, last):  # pragma: no cover - compiled
    """Forward recurrence, vectorised over blocks of ``LANES`` channels.

    Args:
        u, delta: ``(b, E, L)`` (Δ after bias/softplus). AT: ``(N, Ep)``, ``A`` transposed and padded to
            ``Ep = LANES·ceil(E / LANES)`` channels. Bt, Ct: ``(b, L, N)`` (time-major).
        chunk: checkpoint interval. y: out ``(b, E, L)``. hs: out ``(b, K, N, Ep)``, the state *before*
            step ``k·chunk``. last: out ``(b, N, Ep)``, the final state.
    """
    nb, E, L = u.shape
    N = AT.shape[0]
    nblk = (E + LANES - 1) // LANES
    for task in prange(nb * nblk):
        b = task // nblk
        e0 = (task % nblk) * LANES
        width = min(LANES, E - e0)
        a = AT[:, e0 : e0 + LANES].copy()
        h = np.zeros((N, LANES), dtype=AT.dtype)
        acc = np.empty(LANES, dtype=AT.dtype)
        d = np.empty(LANES, dtype=AT.dtype)
        ut = np.empty(LANES, dtype=AT.dtype)
        dux = np.empty(LANES, dtype=AT.dtype)
        for t in range(L):
            if t % chunk == 0:
                hs[b, t // chunk, :, e0 : e0 + LANES] = h
            _load_lanes(delta, b, e0, width, t, d)
            _load_lanes(u, b, e0, width, t, ut)
            brow, crow = Bt[b, t], Ct[b, t]
            for lane in range(LANES):
                acc[lane] = 0.0
                dux[lane] = d[lane] * ut[lane]
            for n in range(N):
                bn, cn = brow[n], crow[n]
                hn, an = h[n], a[n]
                for lane in range(LANES):
                    hv = fexp(d[lane] * an[lane]) * hn[lane] + dux[lane] * bn
                    hn[lane] = hv
                    acc[lane] += cn * hv
            for lane in range(width):
                y[b, e0 + lane, t] = acc[lane]
        last[b, :, e0 : e0 + LANES] = h


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def scan_bwd(
    u, delta, AT, Bt, Ct, chunk, hs, dy, dlast, groups, du, ddelta, dA, dB_part, dC_part
):  # pragma: no cover
    """Backward pass with per-chunk recomputation, vectorised over blocks of ``LANES`` channels.

    Args:
        u, delta, AT, Bt, Ct, chunk, hs: as given to / written by :func:`scan_fwd`.
        dy: ``(b, E, L)`` gradient of the output. dlast: ``(b, N, Ep)`` gradient of the final state.
        groups: number of channel groups ``P``; each parallel task owns one ``(batch, group)`` pair.
        du, ddelta: out ``(b, E, L)``. dA: out ``(b, N, Ep)`` float64 (the caller sums over b).
        dB_part, dC_part: out ``(P, b, L, N)`` (the caller sums over P).
    """
    nb, E, L = u.shape
    N = AT.shape[0]
    nblk = (E + LANES - 1) // LANES
    per = (nblk + groups - 1) // groups
    nchunks = (L + chunk - 1) // chunk
    for task in prange(nb * groups):
        b = task // groups
        p = task % groups
        blk0, blk1 = p * per, min(nblk, (p + 1) * per)
        nown = max(0, blk1 - blk0)
        Bb, Cb, dBp, dCp = Bt[b], Ct[b], dB_part[p, b], dC_part[p, b]
        hbuf = np.empty((chunk + 1, N, LANES), dtype=AT.dtype)
        abuf = np.empty((chunk, N, LANES), dtype=AT.dtype)
        # dB/dC contributions of this task's channel blocks, summed over blocks lane-wise and reduced
        # across lanes once per chunk (not once per block).
        vB = np.empty((chunk, N, LANES), dtype=AT.dtype)
        vC = np.empty((chunk, N, LANES), dtype=AT.dtype)
        dh = np.empty((nown, N, LANES), dtype=AT.dtype)  # state gradients carried across chunks
        dAacc = np.zeros((nown, N, LANES), dtype=np.float64)
        dAc = np.empty((N, LANES), dtype=AT.dtype)  # per-chunk partial sums of dA
        a = np.empty((N, LANES), dtype=AT.dtype)
        d = np.empty(LANES, dtype=AT.dtype)
        ut = np.empty(LANES, dtype=AT.dtype)
        g = np.empty(LANES, dtype=AT.dtype)
        dux = np.empty(LANES, dtype=AT.dtype)
        sd = np.empty(LANES, dtype=AT.dtype)
        su = np.empty(LANES, dtype=AT.dtype)
        gh = np.empty(LANES, dtype=AT.dtype)
        for i in range(nown):
            e0 = (blk0 + i) * LANES
            dh[i] = dlast[b, :, e0 : e0 + LANES]
        for k in range(nchunks - 1, -1, -1):
            t0 = k * chunk
            t1 = min(L, t0 + chunk)
            vB[:, :, :] = 0.0
            vC[:, :, :] = 0.0
            for i in range(nown):
                e0 = (blk0 + i) * LANES
                width = min(LANES, E - e0)
                a[:, :] = AT[:, e0 : e0 + LANES]
                # Recompute the states of this chunk from its checkpoint.
                hbuf[0] = hs[b, k, :, e0 : e0 + LANES]
                for t in range(t0, t1):
                    j = t - t0
                    _load_lanes(delta, b, e0, width, t, d)
                    _load_lanes(u, b, e0, width, t, ut)
                    brow = Bb[t]
                    for lane in range(LANES):
                        dux[lane] = d[lane] * ut[lane]
                    for n in range(N):
                        bn = brow[n]
                        an, hp, hx, ar = a[n], hbuf[j, n], hbuf[j + 1, n], abuf[j, n]
                        for lane in range(LANES):
                            da = fexp(d[lane] * an[lane])
                            ar[lane] = da
                            hx[lane] = da * hp[lane] + dux[lane] * bn
                # Back-propagate through it.
                dAc[:, :] = 0.0
                dhi = dh[i]
                for t in range(t1 - 1, t0 - 1, -1):
                    j = t - t0
                    _load_lanes(dy, b, e0, width, t, g)
                    _load_lanes(delta, b, e0, width, t, d)
                    _load_lanes(u, b, e0, width, t, ut)
                    brow, crow = Bb[t], Cb[t]
                    for lane in range(LANES):
                        sd[lane] = 0.0
                        su[lane] = 0.0
                        dux[lane] = d[lane] * ut[lane]
                    for n in range(N):
                        bn, cn = brow[n], crow[n]
                        an, hp, hc, ar = a[n], hbuf[j, n], hbuf[j + 1, n], abuf[j, n]
                        dhn, dAn, vbn, vcn = dhi[n], dAc[n], vB[j, n], vC[j, n]
                        # Short loops writing one or two arrays each: LLVM vectorises these (one
                        # loop writing six arrays needs too many run-time alias checks and stays scalar).
                        for lane in range(LANES):
                            gh[lane] = dhn[lane] + g[lane] * cn
                            vcn[lane] += g[lane] * hc[lane]
                        for lane in range(LANES):
                            hpa = hp[lane] * ar[lane] * gh[lane]
                            sd[lane] += hpa * an[lane]
                            dAn[lane] += hpa * d[lane]
                        for lane in range(LANES):
                            su[lane] += gh[lane] * bn
                            vbn[lane] += gh[lane] * dux[lane]
                        for lane in range(LANES):
                            dhn[lane] = gh[lane] * ar[lane]
                    for lane in range(width):
                        ddelta[b, e0 + lane, t] = sd[lane] + su[lane] * ut[lane]
                        du[b, e0 + lane, t] = su[lane] * d[lane]
                dAacc[i] += dAc
            for t in range(t0, t1):
                j = t - t0
                for n in range(N):
                    dBp[t, n] = vB[j, n].sum()
                    dCp[t, n] = vC[j, n].sum()
        for i in range(nown):
            e0 = (blk0 + i) * LANES
            dA[b, :, e0 : e0 + LANES] = dAacc[i]


def set_threads(n: int) -> None:
    """Use ``n`` numba worker threads (clamped to numba's pool size)."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
