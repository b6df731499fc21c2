"""Deployment benchmark: one sliding-window volume on the CPU with PyTorch eager, ``torch.compile`` and
onnxruntime (the network exported by :func:`mambaclinix.deploy.export_onnx`).

The volume is ``--volume``³ voxels of noise (timing does not depend on the content), predicted as
``mambaclinix predict`` does without test-time augmentation: windows of the preset's patch size,
``sw_batch_size`` 1, overlap 0.5, Gaussian weighting (:func:`mambaclinix.inference.sliding_window_inference`).
Each repeat times the three engines one after another, in a rotating order (interleaved, so that a
change in machine load hits all of them alike); figures are medians over repeats and ratios to eager
measured in the same run. ``torch.compile`` runs twice: on the network as it is, and on a copy whose
Mamba layers use the closed-form chunked scan of the ONNX export (pure PyTorch operators, see
:func:`mambaclinix.deploy.onnx_export_mode`); the first call of each (the compilation, on one window) is
reported apart and excluded from the volume times, and a compilation that fails is reported with its
error. onnxruntime gets as many intra-op threads as PyTorch has. Also reported: the export time, the ONNX
file size beside the float32 weights' size, and the norm-wise relative difference of each engine's
logits from eager's on the volume.

    python benchmarks/bench_deploy.py                         # small preset, 48³ windows, 128³ volume
    python benchmarks/bench_deploy.py --repeats 5 --json docs/deploy_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median  # noqa: E402

from mambaclinix import create_model  # noqa: E402
from mambaclinix.deploy import OnnxNetwork, export_onnx, onnx_export_mode  # noqa: E402
from mambaclinix.inference import sliding_window_inference  # noqa: E402


def _versions() -> dict:
    out = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def _add_compiled(engines, result, net, window, stack) -> None:
    """``torch.compile`` of the network as it is, and of a copy whose Mamba layers use the closed-form
    chunked scan of the ONNX export (pure PyTorch operators); a failure is reported, not raised."""
    for name, build in (
        ("torch.compile", lambda: net),
        (
            "torch.compile (closed-form scan)",
            lambda: stack.enter_context(onnx_export_mode(copy.deepcopy(net))),
        ),
    ):
        try:
            torch._dynamo.reset()
            compiled = torch.compile(build(), dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(window)
            result.setdefault("compile_first_call_s", {})[name] = time.perf_counter() - t0
            engines[name] = compiled
        except Exception as err:  # compile support varies with the machine and the scan backend
            msg = f"{type(err).__name__}: {err}".splitlines()
            result.setdefault("compile_errors", {})[name] = " ".join(msg[:3])[:300]
            print(f"{name} failed: {msg[0][:200]}", file=sys.stderr, flush=True)


def _summarise(result, times, outputs) -> None:
    eager = median(times["eager"])
    ref = outputs["eager"].double()
    result["engines"] = {
        name: {
            "median_s": median(ts),
            "times_s": ts,
            "ratio_to_eager": median(ts) / eager,
            "rel_diff_to_eager": ((outputs[name].double() - ref).norm() / ref.norm()).item(),
        }
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mambaclinix_small")
    p.add_argument("--patch", type=int, default=48, help="window edge (the preset's patch size)")
    p.add_argument("--volume", type=int, default=128, help="volume edge")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    torch.manual_seed(0)
    net = create_model(args.preset).eval()
    net.deep_supervision = False
    patch = (args.patch,) * 3
    x = torch.randn(1, net.in_channels, *(args.volume,) * 3)
    sw = dict(roi_size=patch, sw_batch_size=1, overlap=0.5, mode="gaussian")

    result: dict = {
        "machine": {**machine_info(), **_versions()},
        "preset": args.preset,
        "patch": list(patch),
        "volume": [args.volume] * 3,
        "sliding_window": {**sw, "roi_size": list(patch), "tta": False},
        "threads": threads,
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        path = export_onnx(net, Path(tmp) / "model.onnx", patch, net.in_channels)
        result["onnx_export_s"] = time.perf_counter() - t0
        result["onnx_bytes"] = path.stat().st_size
        result["weights_fp32_bytes"] = sum(4 * t.numel() for t in net.state_dict().values())
        engines = {"eager": net, "onnxruntime": OnnxNetwork(path, intra_op_threads=threads)}
        window = torch.randn(1, net.in_channels, *patch)
        if not args.no_compile:
            _add_compiled(engines, result, net, window, stack)
        for fn in engines.values():  # warm-up: one window each (numba JIT, onnxruntime arenas)
            with torch.no_grad():
                fn(window)

        names = list(engines)
        times: dict[str, list[float]] = {n: [] for n in names}
        outputs: dict[str, torch.Tensor] = {}
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = sliding_window_inference(x, predictor=engines[name], **sw)
                times[name].append(time.perf_counter() - t0)
                outputs[name] = out
                print(f"repeat {r} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
            _summarise(result, times, outputs)
            if args.json:  # after every repeat, so that an interrupted run keeps what it measured
                args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
