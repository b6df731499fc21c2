"""GPU checks (marked ``cuda``; skipped without a CUDA device): the scan backends on CUDA against the
float64 CPU reference, and our Mamba against ``mamba_ssm.Mamba`` with the same state dict."""

import pytest
import torch
from _scan_cases import OPTIONS, fresh, make_inputs, rel_err, run

from mambaclinix.layers import Mamba, MambaLayer
from mambaclinix.ops import causal_conv1d, selective_scan, selective_scan_ref
from mambaclinix.ops.backend import has_causal_conv1d, has_mamba_ssm, has_triton

pytestmark = pytest.mark.cuda
GPU_BACKENDS = ["chunked"] + (["triton"] if has_triton() else []) + (["cuda"] if has_mamba_ssm() else [])
# float32 against the float64 reference; the Triton and mamba_ssm kernels use the GPU's fast exp
TOL = {"chunked": 1e-5, "triton": 1e-4, "cuda": 5e-4}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("regime", ["init", "strong"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("L", [1, 7, 64, 2048])
def test_gpu_scan_matches_cpu_reference(L, option, regime, backend):
    tensors, softplus = make_inputs(L, option, regime)
    g = torch.randn(tensors["u"].shape, dtype=torch.float64)
    ref_out, ref_grads = run(selective_scan_ref, tensors, softplus, g)
    gpu = {k: v.detach().cuda().float().requires_grad_() for k, v in tensors.items()}
    out, grads = run(selective_scan, gpu, softplus, g.cuda(), backend=backend)
    errors = {"out": rel_err(out, ref_out), **{k: rel_err(v, ref_grads[k]) for k, v in grads.items()}}
    assert max(errors.values()) <= TOL[backend], errors


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "cuda"])
def test_gpu_float64_is_exact(backend):
    tensors, softplus = make_inputs(300, "all", "init")
    g = torch.randn(tensors["u"].shape, dtype=torch.float64)
    ref_out, ref_grads = run(selective_scan_ref, tensors, softplus, g)
    gpu = {k: v.detach().cuda().requires_grad_() for k, v in fresh(tensors, torch.float64).items()}
    out, grads = run(selective_scan, gpu, softplus, g.cuda(), backend=backend)
    assert rel_err(out, ref_out) < 1e-10
    assert all(rel_err(grads[k], ref_grads[k]) < 1e-10 for k in grads)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mamba_layer_on_gpu_under_bf16_autocast(backend):
    layer = MambaLayer(32, scan_backend=backend).cuda()
    x = torch.randn(2, 32, 8, 8, 8, device="cuda")
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not has_causal_conv1d(), reason="causal-conv1d is not installed")
def test_causal_conv1d_kernel_matches_torch():
    x = torch.randn(2, 64, 100, device="cuda")
    w, b = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
    ours, theirs = (
        causal_conv1d(x, w, b, "silu", backend="torch"),
        causal_conv1d(x, w, b, "silu", backend="cuda"),
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_our_mamba_matches_mamba_ssm_with_the_same_state_dict():
    mamba_ssm = pytest.importorskip("mamba_ssm")
    theirs = mamba_ssm.Mamba(d_model=64, d_state=16, d_conv=4, expand=2).cuda()
    ours = Mamba(64, scan_backend="reference").cuda()
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 128, 64, device="cuda")
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-3)
