"""The ``"triton"`` scan backend, run by Triton's interpreter on the CPU, against the float64 reference.

The same kernels run compiled on a GPU in ``tests/test_cuda.py``. The interpreter is slow, so the
sizes are small but cover several chunks, a ragged last chunk, channel counts that do not fill a
block and a state size that is not a power of two.
"""

import os

import pytest
import torch
from _scan_cases import fresh, make_inputs, rel_err, run

from mambaclinix.ops import backend as be
from mambaclinix.ops import selective_scan, selective_scan_ref

pytest.importorskip("triton")

TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


@pytest.fixture
def interpreted():
    """The kernels run in Triton's interpreter, which ``conftest.py`` switches on before Triton is
    imported when there is no GPU; with a GPU they run compiled in ``tests/test_cuda.py`` instead."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("Triton's interpreter is off (a GPU is present: tests/test_cuda.py runs the kernels)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "L, option, regime, chunk, E, N",
    [
        (1, "plain", "init", 64, 6, 4),
        (7, "D_z", "strong", 4, 5, 3),  # two chunks, the last ragged; N not a power of two
        (45, "all", "strong", 16, 6, 8),
        (45, "all", "init", 64, 9, 16),  # one ragged chunk; E not a multiple of the block
    ],
)
def test_triton_matches_reference(interpreted, L, option, regime, chunk, E, N, dtype):
    tensors, softplus = make_inputs(L, option, regime, E=E, N=N)
    g = torch.randn(tensors["u"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_out, ref_grads = run(selective_scan_ref, tensors, softplus, g)
    out, grads = run(selective_scan, fresh(tensors, dtype), softplus, g, backend="triton", chunk=chunk)
    assert out.dtype == dtype
    assert rel_err(out, ref_out) <= TOL[dtype]
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        assert rel_err(grad, ref_grads[name]) <= TOL[dtype], name


def test_triton_last_state_and_its_gradient(interpreted):
    tensors, softplus = make_inputs(20, "all", "strong", E=4, N=5)
    dlast = torch.randn(2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for fn, kw in ((selective_scan_ref, {}), (selective_scan, {"backend": "triton", "chunk": 8})):
        ts = fresh(tensors, torch.float64)
        out, last = fn(**ts, delta_softplus=softplus, return_last_state=True, **kw)
        grads = torch.autograd.grad((last * dlast).sum() + out.sum(), list(ts.values()))
        results.append((out, last, grads))
    (out_r, last_r, grads_r), (out_t, last_t, grads_t) = results
    assert last_t.shape == (2, 4, 5)
    assert rel_err(last_t, last_r) <= 1e-12
    for a, b in zip(grads_t, grads_r, strict=True):
        assert rel_err(a, b) <= 1e-12


def test_triton_is_finite_under_extreme_decay(interpreted):
    # exp(Δ·A) underflows to 0 in float32: the state before a step must not be recovered by division.
    tensors, _ = make_inputs(30, "plain", "strong", E=4, N=4)
    ts = fresh(tensors, torch.float32)
    with torch.no_grad():
        ts["delta"].mul_(0).add_(200.0)
    out, grads = run(selective_scan, ts, False, torch.ones(2, 4, 30), backend="triton", chunk=8)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(v).all() for v in grads.values())


def test_triton_needs_cuda_tensors_unless_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        be.resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert be.resolve_backend("triton", torch.device("cpu")) == "triton"


def test_auto_on_cuda_prefers_mamba_ssm_then_triton(monkeypatch):
    try:
        cases = ((True, True, "cuda"), (False, True, "triton"), (False, False, "chunked"))
        for mamba, triton, expected in cases:
            monkeypatch.setattr(be, "has_mamba_ssm", lambda m=mamba: m)
            monkeypatch.setattr(be, "has_triton", lambda t=triton: t)
            be._auto.cache_clear()
            assert be._auto("cuda") == expected
    finally:
        be._auto.cache_clear()
