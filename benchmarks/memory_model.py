"""Peak memory of MambaClinix training steps, measured, and the planner's memory model fitted to it.

Measure (one JSON file with every point, rewritten after each one, so a run stopped by ``--max-seconds``
or a crash keeps what it measured)::

    python benchmarks/memory_model.py --device cpu  --json results/memory_cpu.json
    python benchmarks/memory_model.py --device cuda --json results/memory_cuda.json   # ~90 s on an H200

Fit (non-negative least squares on the relative error; every ``--holdout-every``-th point of each
device/precision is held out and reported; the coefficients fitted on the other points are written into
the package)::

    python benchmarks/memory_model.py --fit results/memory_cpu.json results/memory_cuda.json \
        --write mambaclinix/planning/memory_coefficients.json

A point is one training step configuration: a MambaClinix U-Net whose stages, strides and kernels come
from :func:`mambaclinix.planning.plan_topology` for a spacing and patch, channels ``min(base·2**s, max)``,
the adaptive HGCN/Mamba rule, the training loss of ``SegmentationModule`` (deep-supervised
CE + Dice + region Tversky), Adam and gradient clipping at 12, two steps on random data.

* ``cuda``: ``torch.cuda.max_memory_reserved`` (what the caching allocator took from the GPU; the fitted
  quantity) and ``max_memory_allocated`` over the two steps, starting from an empty allocator, in one
  process; precisions ``32-true`` and ``bf16-mixed`` (autocast, the Mamba layers stay float32).
* ``cpu``: every point in a fresh process: after importing torch and mambaclinix and compiling the scan
  kernel on a small input, the peak resident set size is reset (``/proc/self/clear_refs``), and the peak
  is ``VmHWM − VmRSS`` (``/proc/self/status``) over the two steps. The process runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (see ``MMAP_THRESHOLD``).

Needs only torch, numpy, scipy (for ``--fit``) and this repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_info, peak_since_reset, reset_peak  # noqa: E402

from mambaclinix.planning.memory import (  # noqa: E402
    TERMS,
    count_parameters,
    fit_coefficients,
    memory_terms,
    predict_peak,
)
from mambaclinix.planning.topology import (  # noqa: E402
    adaptive_layer_types,
    features_per_stage,
    plan_topology,
)

# glibc's malloc raises its mmap threshold dynamically (up to 32 MiB) after large frees, after which freed
# tensors stay in per-thread arenas and the peak RSS of small runs varies by hundreds of MB from run to
# run. A fixed threshold returns every freed tensor above 64 KiB to the OS: the measured peak is then the
# memory the tensors need, reproducibly.
MMAP_THRESHOLD = 65536
ISO = (1.0, 1.0, 1.0)
ANISO = (3.0, 0.8, 0.8)


def _point(patch, batch, classes, base, maximum, spacing=ISO, max_stages=None):
    return {"patch": list(patch), "batch": batch, "classes": classes, "base": base, "max_features": maximum,
            "spacing": list(spacing), "max_stages": max_stages}  # fmt: skip


# Cheapest first: a run stopped by --max-seconds keeps a spread of sizes.
GRIDS = {
    "tiny": [
        _point((16, 16, 16), 1, 2, 4, 16),
        _point((16, 32, 32), 1, 3, 4, 16, ANISO),
    ],
    "cpu": [
        _point((32, 32, 32), 1, 2, 8, 64),
        _point((32, 32, 32), 2, 4, 8, 64),
        _point((16, 48, 48), 2, 2, 8, 64, ANISO),
        _point((48, 48, 48), 1, 2, 8, 64),
        _point((32, 32, 32), 4, 2, 16, 128),
        _point((48, 48, 48), 2, 6, 8, 64),
        _point((64, 64, 64), 1, 2, 8, 64, ISO, 4),
        _point((32, 64, 64), 2, 3, 8, 64),
        _point((24, 80, 80), 1, 2, 8, 64, ANISO),
        _point((64, 64, 64), 1, 4, 16, 128),
        _point((48, 48, 48), 4, 2, 8, 64),
        _point((64, 64, 64), 2, 2, 8, 64),
        _point((48, 48, 48), 2, 2, 16, 128, ISO, 3),
        _point((80, 80, 80), 1, 3, 8, 64),
        _point((64, 64, 64), 2, 8, 8, 64),
        _point((64, 64, 64), 2, 2, 16, 128),
        _point((96, 96, 96), 1, 2, 8, 64),
        _point((32, 96, 96), 2, 2, 8, 64, ANISO),
    ],
    "cuda": [
        _point((64, 64, 64), 1, 2, 32, 320),
        _point((64, 64, 64), 2, 4, 32, 320),
        _point((64, 64, 64), 2, 2, 16, 160),
        _point((32, 96, 96), 2, 3, 32, 320, ANISO),
        _point((64, 64, 64), 4, 2, 32, 320),
        _point((96, 96, 96), 1, 2, 32, 320),
        _point((96, 96, 96), 2, 2, 48, 320),
        _point((64, 128, 128), 1, 8, 32, 320),
        _point((128, 128, 128), 1, 4, 32, 320, ISO, 4),
        _point((96, 96, 96), 2, 6, 32, 320),
        _point((128, 128, 128), 1, 2, 32, 320),
        _point((128, 128, 128), 2, 4, 16, 160),
        _point((128, 128, 128), 2, 2, 32, 320, ISO, 5),
        _point((40, 192, 192), 2, 4, 32, 320, ANISO),
        _point((128, 128, 128), 2, 14, 32, 320),
        _point((96, 160, 160), 2, 3, 32, 320),
        _point((160, 160, 160), 2, 2, 32, 320),
        _point((128, 128, 128), 4, 3, 32, 320),
        _point((192, 192, 192), 1, 2, 32, 320),
    ],
}


def plan_check_points() -> list[dict]:
    """What the planner chooses (current coefficients, default safety and reserve, 14 classes) for 24 and
    80 GiB GPUs, both precisions, isotropic 1 mm data of median shape 256³ and (3, 0.8, 0.8) mm data of
    100×512×512: measuring them checks that the chosen patches stay within their budgets."""
    from mambaclinix.planning.memory import load_coefficients
    from mambaclinix.planning.planner import DEFAULT_RESERVE_GB, choose_patch_and_batch

    points = []
    for precision in ("bf16-mixed", "32-true"):
        coef = load_coefficients("cuda", precision)
        worst = max(coef["fit_max_abs_rel_error"], coef["heldout_max_abs_rel_error"])
        safety = math.floor(100 / (1 + worst)) / 100
        for spacing, median in ((ISO, (256, 256, 256)), (ANISO, (100, 512, 512))):
            for budget in (24, 80):
                usable = safety * (budget - DEFAULT_RESERVE_GB["gpu"]) * 2**30
                topo, batch, peak = choose_patch_and_batch(spacing, median, usable, coef, num_classes=14)
                point = _point(topo.patch_size, batch, 14, 32, 320, spacing, 7)
                points.append({**point, "precision": precision, "budget_gib": budget,
                               "predicted_gib": round(peak / 2**30, 3)})  # fmt: skip
    return points


def net_kwargs(point: dict) -> dict:
    """``MambaClinixUNet`` arguments of a point (one input channel)."""
    topo = plan_topology(point["spacing"], point["patch"], max_stages=point["max_stages"])
    if list(topo.patch_size) != list(point["patch"]):
        raise ValueError(f"grid patch {point['patch']} is not a multiple of {topo.size_divisor}")
    n = topo.n_stages
    return {
        "in_channels": 1,
        "out_channels": point["classes"],
        "n_stages": n,
        "features_per_stage": list(features_per_stage(n, point["base"], point["max_features"])),
        "kernel_sizes": [list(k) for k in topo.kernel_sizes],
        "strides": [list(s) for s in topo.strides],
    }


def terms_of(point: dict) -> dict:
    kw = net_kwargs(point)
    layers = adaptive_layer_types(kw["n_stages"])
    return memory_terms(point["patch"], point["batch"], kw["features_per_stage"], kw["strides"], layers,
                        point["classes"], count_parameters(kw))  # fmt: skip


def train_steps(net, patch, batch, classes, device, precision="32-true", steps=2, channels_last=False):
    """``steps`` training steps as ``SegmentationModule`` takes them (loss, Adam, clipping at 12)."""
    from mambaclinix.losses import DeepSupervisionLoss, DiceCETverskyLoss

    loss_fn = DeepSupervisionLoss(DiceCETverskyLoss())
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-5, eps=1e-5)
    g = torch.Generator().manual_seed(0)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    for _ in range(steps):
        x = torch.randn(batch, net.in_channels, *patch, generator=g).to(device)
        y = torch.randint(0, classes, (batch, 1, *patch), generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(x)
            loss = loss_fn(out if isinstance(out, (list, tuple)) else [out], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        del x, y, out, loss
    return opt


# ---------------------------------------------------------------------------------------------------- cpu


def cpu_warmup() -> None:
    """Compile/load the scan kernel and the conv paths on a tiny model, so that the baseline has them."""
    from mambaclinix.models import MambaClinixUNet

    net = MambaClinixUNet(1, 2, n_stages=2, features_per_stage=(4, 8), stage_layer_types=("hgcn", "mamba"))
    train_steps(net, (8, 8, 8), 1, 2, torch.device("cpu"), steps=1, channels_last=True)


def reset_peak_rss() -> int:
    """Reset the process's peak RSS (VmHWM) and return the current RSS in bytes."""
    return reset_peak(torch.device("cpu"))


def peak_rss_since_reset() -> int:
    return peak_since_reset(torch.device("cpu"))


def cpu_single(point: dict, threads: int) -> dict:
    """Measure one point in this (fresh) process."""
    from mambaclinix.models import MambaClinixUNet

    torch.set_num_threads(threads)
    cpu_warmup()
    base = reset_peak_rss()
    t0 = time.perf_counter()
    net = MambaClinixUNet(**net_kwargs(point))
    train_steps(
        net, point["patch"], point["batch"], point["classes"], torch.device("cpu"), channels_last=True
    )
    return {"peak_bytes": peak_rss_since_reset() - base, "baseline_rss_bytes": base,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def measure_cpu(point: dict, threads: int, timeout: float) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--single",
        json.dumps(point),
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- cuda


def measure_cuda(point: dict, precision: str, device: torch.device) -> dict:
    from mambaclinix.models import MambaClinixUNet

    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    net = opt = None
    try:
        net = MambaClinixUNet(**net_kwargs(point)).to(device)
        opt = train_steps(net, point["patch"], point["batch"], point["classes"], device, precision)
        torch.cuda.synchronize(device)
        out = {"peak_bytes": torch.cuda.max_memory_reserved(device),
               "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) - start,
               "seconds": time.perf_counter() - t0}  # fmt: skip
    except torch.cuda.OutOfMemoryError as err:
        out = {"error": f"out of memory: {str(err).splitlines()[0]}"}
    finally:
        del net, opt
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------- fit


def fit(paths: list[Path], holdout_every: int, write: Path | None) -> dict:
    groups: dict[str, list[dict]] = {}
    sources: dict[str, list[str]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        m = data["machine"]
        where = m.get("gpu") or m.get("processor")
        for r in data["results"]:
            if "peak_bytes" not in r:
                continue
            key = f"{data['device']}/{r['precision']}"
            groups.setdefault(key, []).append(r)
            sources.setdefault(key, [])
            desc = (f"{path.name}: measured {data['date'][:16]} on {where}, torch {m['torch']}, "
                    f"scan backend {data.get('scan_backend')}")  # fmt: skip
            if desc not in sources[key]:
                sources[key].append(desc)
    report: dict = {}
    for key, rows in sorted(groups.items()):
        terms = [terms_of(r["point"]) for r in rows]
        peaks = [float(r["peak_bytes"]) for r in rows]
        held = [i for i in range(len(rows)) if holdout_every and i % holdout_every == holdout_every - 1]
        train = [i for i in range(len(rows)) if i not in held]
        if len(train) < len(TERMS):
            print(f"{key}: only {len(train)} training points, need {len(TERMS)}; skipped")
            continue
        coef, rel_train = fit_coefficients([terms[i] for i in train], [peaks[i] for i in train])
        rel_held = [(predict_peak(terms[i], coef) - peaks[i]) / peaks[i] for i in held]
        report[key] = {
            "coefficients": coef,
            "source": f"{len(rows)} points; " + "; ".join(sources[key]),
            "train_points": len(train),
            "train_max_abs_rel_error": float(max(abs(e) for e in rel_train)),
            "heldout": [
                {
                    "patch": rows[i]["point"]["patch"],
                    "batch": rows[i]["point"]["batch"],
                    "classes": rows[i]["point"]["classes"],
                    "measured_gib": peaks[i] / 2**30,
                    "predicted_gib": predict_peak(terms[i], coef) / 2**30,
                    "rel_error": rel_held[j],
                }
                for j, i in enumerate(held)
            ],  # fmt: skip
        }
        print(f"\n{key}  ({len(train)} fitted, {len(held)} held out)   {sources[key]}")
        print("  coefficients (bytes per unit): " + ", ".join(f"{k}={v:.4g}" for k, v in coef.items()))
        print(f"  max |relative error| on fitted points: {report[key]['train_max_abs_rel_error']:.1%}")
        print("  held out: patch, batch, classes -> measured / predicted GiB (error)")
        for h in report[key]["heldout"]:
            print(f"    {h['patch']} b{h['batch']} K{h['classes']}: {h['measured_gib']:.3f} / "
                  f"{h['predicted_gib']:.3f} ({h['rel_error']:+.1%})")  # fmt: skip
    if write is not None:
        write_coefficients(write, report)
    return report


def write_coefficients(path: Path, report: dict) -> None:
    """Merge the fits of ``report`` into the coefficients file ``path`` (JSON, the package data the planner
    reads: ``mambaclinix/planning/memory_coefficients.json``), keeping the devices not refitted now."""
    from mambaclinix.utils.atomic import write_text_atomic

    existing: dict = json.loads(path.read_text())["coefficients"] if path.is_file() else {}
    merged = dict(existing)
    for key, r in report.items():
        heldout = max((abs(h["rel_error"]) for h in r["heldout"]), default=float("nan"))
        merged[key] = {**{k: float(f"{v:.6g}") for k, v in r["coefficients"].items()},
                       "source": r["source"], "heldout_max_abs_rel_error": round(heldout, 4),
                       "fit_max_abs_rel_error": round(r["train_max_abs_rel_error"], 4)}  # fmt: skip
    data = {
        "about": "Fitted coefficients of the planner's memory model (mambaclinix.planning.memory), written "
        "by `python benchmarks/memory_model.py --fit MEASUREMENTS.json ... --write "
        "mambaclinix/planning/memory_coefficients.json` from peak memories measured by the same script; "
        "each entry says where its measurements came from. Units: bytes per unit of each term. To refit "
        "for your machine, see docs/planning.md.",
        "coefficients": {key: merged[key] for key in sorted(merged)},
    }
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {path}")


# --------------------------------------------------------------------------------------------------- main


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", type=Path, help="output file (measure mode)")
    p.add_argument("--grid", choices=[*sorted(GRIDS), "plan"], default=None,
                   help="default: the device's grid; 'plan': the planner's choices for 24/80 GiB GPUs, "
                   "then the cuda grid again")  # fmt: skip
    p.add_argument("--points", type=Path, default=None,
                   help="JSON list of points instead of a grid (optional key 'precision')")  # fmt: skip
    p.add_argument("--precision", nargs="+", default=None,
                   help="cuda: 32-true and/or bf16-mixed (default both); cpu: 32-true")  # fmt: skip
    p.add_argument("--max-seconds", type=float, default=85.0, help="stop starting new points after this")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per measurement")
    p.add_argument("--fit", type=Path, nargs="+", help="fit the model to these measurement files")
    p.add_argument("--holdout-every", type=int, default=4)
    p.add_argument("--write", type=Path, default=None, help="write fitted coefficients to this .json file")
    p.add_argument("--single", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.single:
        print(json.dumps(cpu_single(json.loads(a.single), a.threads)))
        return
    if a.fit:
        fit(a.fit, a.holdout_every, a.write)
        return
    if a.json is None:
        p.error("--json OUT is required to measure")
    t_start = time.perf_counter()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if a.points:
        grid = json.loads(a.points.read_text())
    elif a.grid == "plan":
        grid = plan_check_points() + GRIDS["cuda"]
    else:
        grid = GRIDS[a.grid or a.device]
    precisions = a.precision or (["32-true", "bf16-mixed"] if device.type == "cuda" else ["32-true"])
    try:
        from mambaclinix.ops.backend import resolve_backend

        backend = resolve_backend(None, device)
    except Exception as err:  # the name of the rule's result is informative only
        backend = f"unknown ({type(err).__name__})"
    out = {"device": device.type, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": machine_info(device), "scan_backend": str(backend), "grid": a.grid or a.device,
           "results": []}  # fmt: skip
    _write_json(a.json, out)
    for point in grid:
        for precision in [point["precision"]] if "precision" in point else precisions:
            if time.perf_counter() - t_start > a.max_seconds:
                out["stopped_early"] = True
                _write_json(a.json, out)
                print(f"stopped after {time.perf_counter() - t_start:.0f} s (--max-seconds)")
                return
            if device.type == "cuda":
                r = measure_cuda(point, precision, device)
            else:
                remaining = max(10.0, a.max_seconds - (time.perf_counter() - t_start) + 60)
                try:
                    r = measure_cpu(point, a.threads, timeout=remaining)
                except subprocess.TimeoutExpired:
                    r = {"error": "timeout"}
            kw = net_kwargs(point)
            extra = {k: point[k] for k in ("budget_gib", "predicted_gib") if k in point}
            point = {k: point[k] for k in _point((1, 1, 1), 1, 2, 1, 1)}
            row = {"point": point, "precision": precision, **extra, "n_stages": kw["n_stages"],
                   "strides": kw["strides"], "terms": terms_of(point), **r}  # fmt: skip
            out["results"].append(row)
            _write_json(a.json, out)
            peak = r.get("peak_bytes")
            shown = f"{peak / 2**30:.3f} GiB" if peak is not None else r.get("error")
            seconds = r.get("seconds", math.nan)
            print(f"{point['patch']} b{point['batch']} K{point['classes']} c{point['base']} "
                  f"n{kw['n_stages']} {precision}: {shown} ({seconds:.1f} s)", flush=True)  # fmt: skip
    out["seconds"] = time.perf_counter() - t_start
    _write_json(a.json, out)


if __name__ == "__main__":
    main()
