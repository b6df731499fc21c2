"""Selective scan: every fast backend against the sequential float64 reference (outputs and gradients)."""

import functools
import importlib.abc
import math
import sys

import pytest
import torch
from _scan_cases import OPTIONS, fresh, make_inputs, rel_err, run

from mambaclinix.ops import backend as be
from mambaclinix.ops import selective_scan, selective_scan_ref

FAST = ["numba", "chunked"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@functools.cache
def _reference(L, option, regime):
    tensors, softplus = make_inputs(L, option, regime)
    grad_out = torch.randn(
        tensors["u"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    out, grads = run(selective_scan_ref, tensors, softplus, grad_out)
    return tensors, softplus, grad_out, out, grads


# Every combination, except the slow Python loop of "chunked" at L=4096 in float64 (it runs in float32
# there, and in float64 at the shorter lengths).
CASES = [
    pytest.param(L, option, regime, dtype, backend, id=f"{L}-{option}-{regime}-{str(dtype)[6:]}-{backend}")
    for L in (1, 7, 64, 4096)
    for option in OPTIONS
    for regime in ("init", "strong")
    for dtype in (torch.float32, torch.float64)
    for backend in FAST
    if not (backend == "chunked" and L == 4096 and dtype == torch.float64)
]


@pytest.mark.parametrize("L, option, regime, dtype, backend", CASES)
def test_fast_matches_reference(L, option, regime, dtype, backend):
    tensors, softplus, grad_out, ref_out, ref_grads = _reference(L, option, regime)
    chunk = 16 if L < 4096 else 64
    out, grads = run(selective_scan, fresh(tensors, dtype), softplus, grad_out, backend=backend, chunk=chunk)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= TOL[dtype]
    for name, g in grads.items():
        assert g.dtype == dtype
        assert torch.isfinite(g).all(), name
        assert rel_err(g, ref_grads[name]) <= TOL[dtype], name


def test_reference_matches_hand_computation():
    # One channel, one state, three steps: h = exp(dA) h + d B u, y = C h + D u.
    u = torch.tensor([[[1.0, 2.0, -1.0]]], dtype=torch.float64)
    d = torch.tensor([[[0.5, 1.0, 2.0]]], dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0, 0.5, 2.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, 1.0, 1.0]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    h0 = 0.5 * 1.0 * 1.0
    h1 = math.exp(-1.0) * h0 + 1.0 * 0.5 * 2.0
    h2 = math.exp(-2.0) * h1 + 2.0 * 2.0 * -1.0
    expected = torch.tensor([2 * h0 + 0.5, 1 * h1 + 1.0, 1 * h2 - 0.5], dtype=torch.float64)
    for fn in (selective_scan_ref, functools.partial(selective_scan, backend="numba"),
               functools.partial(selective_scan, backend="chunked")):  # fmt: skip
        y, last = fn(u, d, A, B, C, D, return_last_state=True)
        torch.testing.assert_close(y[0, 0], expected, rtol=1e-12, atol=1e-12)
        assert last[0, 0, 0].item() == pytest.approx(h2, rel=1e-12)


@pytest.mark.parametrize("backend", FAST)
def test_last_state_value_and_gradient(backend):
    tensors, softplus = make_inputs(50, "all", "init")
    gy = torch.randn(tensors["u"].shape, dtype=torch.float64)
    gh = torch.randn(2, 20, 8, dtype=torch.float64)

    def both(fn, **kw):
        t = fresh(tensors, torch.float64)
        y, h = fn(**t, delta_softplus=softplus, return_last_state=True, **kw)
        grads = torch.autograd.grad([y, h], list(t.values()), [gy, gh])
        return y, h, grads

    y0, h0, g0 = both(selective_scan_ref)
    y1, h1, g1 = both(selective_scan, backend=backend, chunk=8)
    assert h1.shape == (2, 20, 8)
    assert rel_err(h1, h0) < 1e-12 and rel_err(y1, y0) < 1e-12
    for a, b in zip(g1, g0, strict=True):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("backend", FAST)
def test_half_precision_inputs_compute_in_float32(backend):
    tensors, softplus = make_inputs(33, "all", "init")
    ref = selective_scan_ref(**fresh(tensors, torch.float32), delta_softplus=softplus)
    out = selective_scan(**fresh(tensors, torch.bfloat16), delta_softplus=softplus, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2  # bf16 rounding of the inputs and the output


def test_strong_decay_stays_finite_in_float32():
    # Δ·|A| up to ~1e3: log-space (cumulative-sum) formulations overflow here.
    tensors, _ = make_inputs(300, "plain", "strong", dtype=torch.float32)
    with torch.no_grad():
        tensors["delta"].mul_(40.0)
        tensors["A"].mul_(5.0)
    out, grads = run(selective_scan, tensors, False, torch.ones(2, 20, 300), backend="numba")
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_long_sequence_numba_matches_chunked_float64():
    # L = 32768 with a small width: the numba kernel keeps only every chunk-th state.
    tensors, softplus = make_inputs(32768, "all", "init", batch=1, E=16, N=4)
    g = torch.randn(tensors["u"].shape, dtype=torch.float64)
    out0, grads0 = run(
        selective_scan, fresh(tensors, torch.float64), softplus, g, backend="chunked", chunk=512
    )
    out1, grads1 = run(selective_scan, fresh(tensors, torch.float32), softplus, g, backend="numba")
    assert rel_err(out1, out0) < 1e-5
    for name in grads0:
        assert rel_err(grads1[name], grads0[name]) < 1e-5, name


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"u": torch.zeros(2, 4)}, "u must be"),
        ({"delta": torch.zeros(2, 4, 6)}, "delta must have"),
        ({"A": torch.zeros(5, 3)}, "A must be"),
        ({"B": torch.zeros(2, 3, 4)}, "B must be"),
        ({"C": torch.zeros(2, 3, 5, 1)}, "C must be"),
        ({"D": torch.zeros(3)}, "D must be"),
        ({"z": torch.zeros(1, 4, 5)}, "z must have"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_bad_shapes_raise_value_error(bad, message, backend):
    args = {"u": torch.zeros(2, 4, 5), "delta": torch.zeros(2, 4, 5), "A": torch.zeros(4, 3),
            "B": torch.zeros(2, 3, 5), "C": torch.zeros(2, 3, 5)}  # fmt: skip
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        selective_scan(**args, backend=backend)


class TestBackendChoice:
    def test_auto_on_cpu_is_numba(self):
        assert be.resolve_backend("auto", torch.device("cpu")) == "numba"

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="not a scan backend"):
            be.resolve_backend("fast", torch.device("cpu"))

    def test_cuda_backend_needs_cuda_tensors(self):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            selective_scan(*[torch.zeros(1, 1, 1)] * 2, torch.zeros(1, 1), *[torch.zeros(1, 1, 1)] * 2,
                           backend="cuda")  # fmt: skip

    def test_default_setting_and_environment(self, monkeypatch):
        monkeypatch.setenv(be.ENV_VAR, "chunked")
        assert be.resolve_backend(None, torch.device("cpu")) == "chunked"
        be.set_default_backend("reference")
        try:
            assert be.resolve_backend(None, torch.device("cpu")) == "reference"
        finally:
            be.set_default_backend(None)
        monkeypatch.setenv(be.ENV_VAR, "bogus")
        with pytest.raises(ValueError, match=be.ENV_VAR):
            be.resolve_backend(None, torch.device("cpu"))

    def test_without_numba_auto_falls_back_and_explicit_numba_raises(self, monkeypatch):
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "numba" or name.startswith("numba."):
                    raise ImportError("numba hidden by the test")

        monkeypatch.setattr(sys, "meta_path", [Block(), *sys.meta_path])
        for mod in [m for m in sys.modules if m == "numba" or m.startswith("numba.")]:
            monkeypatch.delitem(sys.modules, mod)
        be.has_numba.cache_clear()
        be._auto.cache_clear()
        try:
            assert be.resolve_backend("auto", torch.device("cpu")) == "chunked"
            with pytest.raises(ImportError, match="pip install numba"):
                be.resolve_backend("numba", torch.device("cpu"))
        finally:
            be.has_numba.cache_clear()
            be._auto.cache_clear()
