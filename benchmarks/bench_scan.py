"""Selective-scan benchmark: the sequential reference loop against the fast backends.

For ``B=2, E=640, N=16`` (the widths of MambaClinix's deepest stages) and ``L`` in 64, 512, 4096,
32768, it reports forward and forward+backward wall time (median of repeats) and the peak memory one
forward+backward adds, for each backend, as ratios against the reference loop measured in the same run.

The reference is :func:`mambaclinix.ops.selective_scan_ref`: time steps pre-split with ``unbind``, one
line of recurrence per step, autograd for the backward. On CPU the fast path is ``numba``; ``chunked``
is the portable PyTorch fallback; on a GPU ``triton`` (our Triton kernels) joins when Triton is installed
and ``cuda`` (mamba-ssm's kernel) when mamba-ssm is.

On the CPU each (backend, L) measurement runs in a fresh process (RSS does not shrink reliably); on CUDA
all run in one process, with the peak allocation reset per measurement.

    python benchmarks/bench_scan.py                      # CPU, all lengths
    python benchmarks/bench_scan.py --device cuda --json results/scan_cuda.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, peak_memory, time_call  # noqa: E402

from mambaclinix.ops import selective_scan  # noqa: E402
from mambaclinix.ops.backend import has_mamba_ssm, has_triton  # noqa: E402


def make_inputs(batch, E, N, L, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, E, L, generator=g)
    delta = torch.randn(batch, E, L, generator=g) * 0.5 - 4.0  # softplus(-4 + bias) ~ Mamba's init range
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
    B = torch.randn(batch, N, L, generator=g)
    C = torch.randn(batch, N, L, generator=g)
    D = torch.ones(E)
    z = torch.randn(batch, E, L, generator=g)
    bias = torch.full((E,), 0.5)
    ts = [t.to(device=device, dtype=dtype) for t in (u, delta, A, B, C, D, z, bias)]
    return [t.requires_grad_() for t in ts]


def step(inputs, backend, backward: bool):
    u, delta, A, B, C, D, z, bias = inputs
    if not backward:
        with torch.no_grad():
            return selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
    y = selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
    y.backward(torch.ones_like(y))
    for t in inputs:
        t.grad = None


def measure_one(args) -> dict:
    """Time and memory of one backend at one length (run in its own process for CPU memory)."""
    device = torch.device(args.device)
    inputs = make_inputs(args.batch, args.E, args.N, args.L, device)
    warm = make_inputs(1, 16, args.N, 8, device)
    step(warm, args.backend, True)  # compile/initialise outside the measurement
    out = {}
    if args.memory:
        out["peak_bytes"] = peak_memory(lambda: step(inputs, args.backend, True), device)
    else:
        reps = args.repeats
        out["fwd_s"] = median(time_call(lambda: step(inputs, args.backend, False), device, reps))
        out["fwdbwd_s"] = median(time_call(lambda: step(inputs, args.backend, True), device, reps))
    return out


def run_child(args, backend, L, memory: bool) -> dict:
    """One measurement: in a fresh process on the CPU (its RSS is the measurement's own); in this process
    on CUDA (``max_memory_allocated`` is reset per measurement, and a CUDA context costs seconds)."""
    if args.device.startswith("cuda"):
        one = argparse.Namespace(**{**vars(args), "backend": backend, "L": L, "memory": memory})
        try:
            return measure_one(one)
        except Exception as e:  # one backend failing must not lose the others' results
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        finally:
            torch.cuda.empty_cache()
    cmd = [sys.executable, __file__, "--child", "--device", args.device, "--backend", backend, "--L", str(L)]
    cmd += [
        "--batch",
        str(args.batch),
        "--E",
        str(args.E),
        "--N",
        str(args.N),
        "--repeats",
        str(args.repeats),
    ]
    if memory:
        cmd.append("--memory")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return {
            "error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        }
    return json.loads(res.stdout.strip().splitlines()[-1])


def reference_fits(args, L) -> bool:
    """The reference keeps ~5 (B, E, N) tensors per step for autograd; skip it where that cannot fit."""
    need = 5 * args.batch * args.E * args.N * L * 4
    if args.device == "cuda":
        return need < 0.8 * torch.cuda.get_device_properties(0).total_memory
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return need < 0.6 * avail


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 4096, 32768])
    p.add_argument("--backends", nargs="+", default=None, help="default: reference + the fast ones here")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--E", type=int, default=640)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    # internal: one measurement in a child process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--L", type=int, help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_one(args)))
        return

    device = torch.device(args.device)
    backends = args.backends
    if backends is None:
        backends = ["reference", "numba", "chunked"] if device.type == "cpu" else ["reference", "chunked"]
        if device.type == "cuda" and has_triton():
            backends.append("triton")
        if device.type == "cuda" and has_mamba_ssm():
            backends.append("cuda")
    info = machine_info(device)
    shape = {"batch": args.batch, "E": args.E, "N": args.N, "dtype": "float32", "device": args.device}
    print(f"# selective scan, {shape}")
    print(f"# {info}")
    rows = []
    for L in args.lengths:
        for backend in backends:
            if backend == "reference" and not reference_fits(args, L):
                rows.append({"L": L, "backend": backend, "skipped": "does not fit in memory"})
                continue
            row = {"L": L, "backend": backend, **run_child(args, backend, L, memory=False)}
            if not args.no_memory and "error" not in row:
                row.update(run_child(args, backend, L, memory=True))
            rows.append(row)
            print(f"  L={L:6d} {backend:10s} {row}", file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "shape": shape, "rows": rows}, indent=2))


def format_table(rows) -> str:
    ref = {r["L"]: r for r in rows if r["backend"] == "reference" and "fwd_s" in r}
    lines = [
        "| L | backend | fwd (ms) | fwd+bwd (ms) | fwd+bwd speed-up vs reference | peak MiB (fwd+bwd) "
        "| memory vs reference |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "fwd_s" not in r:
            lines.append(f"| {r['L']} | {r['backend']} | {r.get('skipped', r.get('error'))} | | | | |")
            continue
        base = ref.get(r["L"])
        speed = f"{base['fwdbwd_s'] / r['fwdbwd_s']:.1f}×" if base else "n/a"
        mem = r.get("peak_bytes")
        mem_s = f"{mem / 2**20:.0f}" if mem is not None else "n/a"
        memr = f"{mem / base['peak_bytes']:.3f}" if base and mem and base.get("peak_bytes") else "n/a"
        lines.append(f"| {r['L']} | {r['backend']} | {r['fwd_s'] * 1e3:.1f} | {r['fwdbwd_s'] * 1e3:.1f} | "
                     f"{speed} | {mem_s} | {memr} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
