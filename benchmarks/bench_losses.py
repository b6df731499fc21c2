"""Time loss forward + backward on a segmentation patch, against MONAI in the same run.

Example (the paper-sized case; 2×14×128³ fp32 is 235 MB per tensor, expect a few GB of peak memory)::

    python benchmarks/bench_losses.py --size 128 --classes 14 --batch 2 --repeats 5 --json out.json

Each case: ``--warmup`` untimed calls, then ``--repeats`` timed calls of ``loss(logits, labels).backward()``
(device synchronised), reported as the median in ms with min/max. Ratios compare ours with MONAI's
equivalent measured in the same process. Machine, versions, threads, device, dtype and input size are
printed beside the figures and written to ``--json``. Peak memory: ``torch.cuda.max_memory_allocated``
per case on CUDA; on the CPU the peak resident set above the start of the timed calls (``VmHWM``,
reset per case).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, peak_since_reset, reset_peak, time_call  # noqa: E402

from mambaclinix.losses import DiceCELoss, DiceCETverskyLoss, RegionSpecificTverskyLoss, TverskyLoss

try:  # MONAI is optional (dev extra); without it only our losses are timed
    import monai
    import monai.losses as monai_losses
except ImportError:  # pragma: no cover
    monai = None
    monai_losses = None


def build_cases(num_classes: int) -> dict[str, Callable]:
    """Name → loss callable. Our losses and MONAI's, configured alike (softmax, labels, no background)."""
    cases: dict[str, Callable] = {
        "ours SoftDice+CE (nnU-Net, -Dice)": DiceCETverskyLoss(lambda_trs=0.0),
        "ours DiceCELoss (MONAI-compatible)": DiceCELoss(
            softmax=True, to_onehot_y=True, include_background=False
        ),
        "ours TverskyLoss (MONAI-compatible)": TverskyLoss(
            softmax=True, to_onehot_y=True, include_background=False, alpha=0.3, beta=0.7
        ),
        "ours L_TRS (8x8x14 grid)": RegionSpecificTverskyLoss(),
        "ours compound CE+Dice+0.8*L_TRS": DiceCETverskyLoss(),
    }
    if monai_losses is not None:
        cases["MONAI DiceCELoss"] = monai_losses.DiceCELoss(
            softmax=True, to_onehot_y=True, include_background=False
        )
        cases["MONAI TverskyLoss"] = monai_losses.TverskyLoss(
            softmax=True, to_onehot_y=True, include_background=False, alpha=0.3, beta=0.7
        )
    return cases


RATIOS = [  # (ours, MONAI reference)
    ("ours SoftDice+CE (nnU-Net, -Dice)", "MONAI DiceCELoss"),
    ("ours DiceCELoss (MONAI-compatible)", "MONAI DiceCELoss"),
    ("ours compound CE+Dice+0.8*L_TRS", "MONAI DiceCELoss"),
    ("ours TverskyLoss (MONAI-compatible)", "MONAI TverskyLoss"),
    ("ours L_TRS (8x8x14 grid)", "MONAI TverskyLoss"),
]


def time_case(loss: Callable, x: torch.Tensor, y: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Median / min / max wall time (ms) of forward + backward, and peak memory (MB)."""
    device = x.device
    last = {}

    def step():
        x.grad = None
        out = loss(x, y)
        out.backward()
        last["value"] = out.detach()

    for _ in range(warmup):
        step()
    base = reset_peak(device)
    times = [t * 1e3 for t in time_call(step, device, repeats, warmup=0)]
    peak = (peak_since_reset(device) - base) / 2**20
    value = float(last["value"]) if last else float("nan")
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "peak_mb": peak,
        "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS above the start",
        "loss_value": value,
    }


def run_info(args: argparse.Namespace, device: torch.device) -> dict:
    return {
        **machine_info(device),
        "device": str(device),
        "dtype": args.dtype,
        "input_shape": [args.batch, args.classes, args.size, args.size, args.size],
        "target": "int64 labels (B, 1, *spatial)",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "timed": "forward + backward",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128, help="cubic patch edge (voxels)")
    parser.add_argument("--classes", type=int, default=14, help="K, background included")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of case names to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    shape = (args.batch, args.classes, args.size, args.size, args.size)
    x = torch.randn(shape, device=device, dtype=getattr(torch, args.dtype)).requires_grad_(True)
    y = torch.randint(0, args.classes, (args.batch, 1, *shape[2:]), device=device)

    info = run_info(args, device)
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)

    results = {}
    for name, loss in build_cases(args.classes).items():
        if args.only and not any(s in name for s in args.only):
            continue
        if hasattr(loss, "to"):
            loss = loss.to(device)
        r = time_case(loss, x, y, args.warmup, args.repeats)
        results[name] = r
        print(
            f"{name:40s} median {r['median_ms']:9.1f} ms  (min {r['min_ms']:.1f}, max {r['max_ms']:.1f})  "
            f"peak {r['peak_mb']:.0f} MB [{r['peak_kind']}]  loss {r['loss_value']:.5f}",
            flush=True,
        )

    ratios = {}
    for ours, ref in RATIOS:
        if ours in results and ref in results:
            ratios[f"{ours} / {ref}"] = results[ours]["median_ms"] / results[ref]["median_ms"]
    for k, v in ratios.items():
        print(f"ratio  {k}: {v:.2f}x")

    report = {"machine": info, "results": results, "ratios_median_time": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


if __name__ == "__main__":
    main()
