"""ONNX export of the whole network (mambaclinix.deploy): onnxruntime against PyTorch, the exportable
scan against the sequential reference scan, the export-time substitution leaving the network as it was,
and the predictor in sliding-window inference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from mambaclinix import create_model
from mambaclinix.deploy import OnnxNetwork, export_onnx, onnx_export_mode
from mambaclinix.deploy.scan import selective_scan_chunked_closed_form
from mambaclinix.inference import sliding_window_inference
from mambaclinix.layers.mamba import Mamba, MambaLayer
from mambaclinix.ops import selective_scan_ref

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ``||a - b|| / ||b||``."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _torch_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    net.deep_supervision = False
    with torch.no_grad():
        return net(x)


def _scan_inputs(b=2, E=6, N=4, L=45, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    A = -torch.rand(E, N, generator=g, dtype=dtype) * 4 - 0.1
    return dict(u=r(b, E, L), delta=r(b, E, L), A=A, B=r(b, N, L), C=r(b, N, L), D=r(E), z=r(b, E, L),
                delta_bias=r(E))  # fmt: skip


def test_import_needs_no_onnx():
    """onnx, onnxruntime and onnxscript load on first use, not when the module is imported."""
    code = (
        "import sys, mambaclinix.deploy.onnx; "
        "print([m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# The exportable scan


@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 64])
def test_closed_form_scan_matches_reference_float64(chunk):
    kw = _scan_inputs(dtype=torch.float64)
    ref = selective_scan_ref(**kw, delta_softplus=True)
    out = selective_scan_chunked_closed_form(**kw, delta_softplus=True, chunk=chunk)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_closed_form_scan_without_optional_terms():
    kw = _scan_inputs(dtype=torch.float64)
    args = {k: kw[k] for k in ("u", "delta", "A", "B", "C")}
    ref = selective_scan_ref(**args)
    torch.testing.assert_close(
        selective_scan_chunked_closed_form(**args, chunk=8), ref, rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e8, 1e30])
def test_closed_form_scan_finite_for_large_steps(scale):
    """Δ·|A| up to 1e30: exp of a positive sum would overflow; the segment sums never are positive."""
    kw = _scan_inputs(L=70)
    kw["delta"] = kw["delta"].abs() * scale
    ref = selective_scan_ref(**kw)
    out = selective_scan_chunked_closed_form(**kw, chunk=16)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-5


class _ScanModule(nn.Module):
    def forward(self, u, delta, A, B, C):
        return selective_scan_chunked_closed_form(u, delta, A, B, C, chunk=16)


def test_closed_form_scan_in_onnxruntime_finite_for_large_steps(tmp_path):
    """The scan alone, exported and run by onnxruntime, with steps up to 1e6·|A|: finite and equal."""
    kw = _scan_inputs(L=40)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C")]
    program = torch.onnx.export(_ScanModule().eval(), tuple(args), None, dynamo=True, opset_version=18)
    path = tmp_path / "scan.onnx"
    path.write_bytes(program.model_proto.SerializeToString())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for scale in (1.0, 1e3, 1e6):
        args[1] = kw["delta"].abs() * scale
        (out,) = sess.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
        out = torch.from_numpy(out)
        ref = selective_scan_ref(*args)
        assert torch.isfinite(out).all()
        assert rel(out, ref) < 1e-5, scale


def test_closed_form_scan_rejects_bad_arguments():
    kw = _scan_inputs()
    with pytest.raises(ValueError, match="chunk"):
        selective_scan_chunked_closed_form(**kw, chunk=0)
    with pytest.raises(ValueError, match="A"):
        selective_scan_chunked_closed_form(**{**kw, "A": kw["A"][:3]})


# --------------------------------------------------------------------------------------------------
# The export-time substitution


def test_export_mode_substitutes_and_restores():
    net = create_model("mambaclinix_tiny")
    net.train()
    x = torch.randn(1, 1, 16, 16, 16)
    mambas = [m for m in net.modules() if isinstance(m, (Mamba, MambaLayer))]
    assert mambas
    with onnx_export_mode(net, scan_chunk=8) as same:
        assert same is net and not net.training and net.deep_supervision is False
        assert all("forward" in vars(m) for m in mambas)
        with torch.no_grad():
            inside = net(x)
    assert net.training and net.deep_supervision is True
    assert net.encoder.training and net.decoder.training  # the parts, which the U-Net does not register
    assert all("forward" not in vars(m) for m in mambas)
    assert all(type(m).forward is m.forward.__func__ for m in mambas)
    # inside: the same function of the input as the network's own scan
    assert rel(inside, _torch_logits(net, x)) < 1e-5


def test_export_mode_restores_after_an_error():
    net = create_model("mambaclinix_tiny")
    with pytest.raises(RuntimeError, match="boom"), onnx_export_mode(net):
        raise RuntimeError("boom")
    assert net.training and net.deep_supervision is True
    assert all("forward" not in vars(m) for m in net.modules())


# --------------------------------------------------------------------------------------------------
# Whole networks through onnxruntime


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("mambaclinix_tiny", in_channels=2, out_channels=3)
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "tiny.onnx", (16, 16, 32), in_channels=2)
    return net, path


def test_tiny_dynamic_batch_and_network_unchanged(tiny_onnx):
    net, path = tiny_onnx
    assert net.training and net.deep_supervision is True  # export restored both
    onnx_net = OnnxNetwork(path)
    assert onnx_net.roi_size == (16, 16, 32) and onnx_net.in_channels == 2
    for batch in (1, 3):
        x = torch.randn(batch, 2, 16, 16, 32)
        ref = _torch_logits(net, x)
        out = onnx_net(x)
        assert out.shape == (batch, 3, 16, 16, 32) and out.dtype == torch.float32
        assert rel(out, ref) < 1e-4
    net.train()
    net.deep_supervision = True


def test_onnx_network_as_sliding_window_predictor(tiny_onnx):
    net, path = tiny_onnx
    onnx_net = OnnxNetwork(path)
    x = torch.randn(1, 2, 24, 20, 48)
    net.eval()
    net.deep_supervision = False
    kw = dict(roi_size=(16, 16, 32), sw_batch_size=2, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        ref = sliding_window_inference(x, predictor=net, **kw)
    out = sliding_window_inference(x, predictor=onnx_net, **kw)
    assert out.shape == (1, 3, 24, 20, 48)
    assert rel(out, ref) < 1e-4


def test_onnx_network_rejects_bad_input(tiny_onnx, tmp_path):
    _, path = tiny_onnx
    onnx_net = OnnxNetwork(path)
    with pytest.raises(ValueError, match=r"takes \(batch, 2, 16, 16, 32\)"):
        onnx_net(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxNetwork(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx"):
        OnnxNetwork(junk)


def test_export_rejects_bad_arguments(tmp_path):
    net = create_model("mambaclinix_tiny")
    with pytest.raises(ValueError, match="roi_size"):
        export_onnx(net, tmp_path / "a.onnx", (16, 16), 1)
    with pytest.raises(ValueError, match="in_channels=2"):
        export_onnx(net, tmp_path / "a.onnx", 16, 2)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(net, tmp_path / "a.onnx", 16, 1, opset=13)
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(net, tmp_path / "no" / "a.onnx", 16, 1)
    assert not list(tmp_path.iterdir())


def _parity(name: str, size: int, tmp_path) -> float:
    torch.manual_seed(0)
    net = create_model(name)
    path = export_onnx(net, tmp_path / f"{name}.onnx", size, in_channels=1)
    x = torch.randn(1, 1, size, size, size)
    return rel(OnnxNetwork(path)(x), _torch_logits(net, x))


def test_small_preset_parity_48(tmp_path):
    assert _parity("mambaclinix_small", 48, tmp_path) < 1e-4


@pytest.mark.slow  # about 30 s on two cores
def test_paper_preset_parity_64(tmp_path):
    assert _parity("mambaclinix_paper", 64, tmp_path) < 1e-4


def test_bench_deploy_script_runs(tmp_path):
    """benchmarks/bench_deploy.py end to end at toy size (eager and onnxruntime), so that it does not rot."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_deploy.py"
    spec = importlib.util.spec_from_file_location("bench_deploy", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "deploy.json"
    argv = [
        "--preset",
        "mambaclinix_tiny",
        "--patch",
        "16",
        "--volume",
        "24",
        "--repeats",
        "2",
        "--no-compile",
    ]
    bench.main([*argv, "--json", str(out)])
    result = json.loads(out.read_text())
    engines = result["engines"]
    assert set(engines) == {"eager", "onnxruntime"}
    assert engines["eager"]["ratio_to_eager"] == 1.0 and len(engines["onnxruntime"]["times_s"]) == 2
    assert engines["onnxruntime"]["rel_diff_to_eager"] < 1e-4
    assert result["onnx_bytes"] > 0 and result["machine"]["onnxruntime"]
