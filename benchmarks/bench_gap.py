"""Train step of MambaClinix against PlainConvUNet per MAC, with variants that test causes of the gap.

One process, every variant timed in turn in each round (so noise from other processes reaches all alike):

- ``nnunet_plain``: the baseline of every ratio (needs dynamic-network-architectures).
- ``mambaclinix``: the paper preset as it is.
- ``mambaclinix_tokens_layout``: the same, with each Mamba layer's output given the token-major strides
  (channels innermost, as ``(B, L, C)`` transposed back) that it had before it was made contiguous;
  the convolutions after it then run on channels-last tensors.
- ``mambaclinix_numba1``: the scan's numba pool held to one thread (tests thread competition between
  numba's pool and PyTorch's OpenMP threads on a small machine).
- ``conv3d``: one plain 3×3×3 Conv3d, 32 → 32 channels at the full patch size, forward + backward: the
  arithmetic rate (GFLOP/s) a dense convolution reaches on this machine, beside the models' rates.

Train step: ``zero_grad``, forward, cross-entropy on random labels, backward, Adam step (as
``bench_models.py``). GFLOP/s of a step = 3 × 2 × forward MACs / time (backward = 2 × forward).
Besides wall time, the process's CPU time per step is recorded (``time.process_time``, all threads):
on a machine shared with other busy processes it is far less disturbed by them than wall time, though
it also counts the spin-waiting of idle OpenMP threads.

    python benchmarks/bench_gap.py --size 96 --batch 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median  # noqa: E402
from _flops import count_macs  # noqa: E402
from _zoo import NUM_CLASSES, build_model  # noqa: E402

from mambaclinix.layers import mamba as mamba_mod  # noqa: E402
from mambaclinix.ops import _scan_numba  # noqa: E402

VARIANTS = ("nnunet_plain", "mambaclinix", "mambaclinix_tokens_layout", "mambaclinix_numba1", "conv3d")
_state = {"tokens_layout": False, "numba1": False}
_plain_forward = mamba_mod.MambaLayer.forward
_set_threads = _scan_numba.set_threads


def _layer_forward(self, x):
    out = _plain_forward(self, x)
    if _state["tokens_layout"]:
        return out.flatten(2).transpose(1, 2).contiguous().transpose(1, 2).reshape(out.shape)
    return out


mamba_mod.MambaLayer.forward = _layer_forward
_scan_numba.set_threads = lambda n: _set_threads(1 if _state["numba1"] else n)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    patch = (args.size,) * 3
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, *patch)
    labels = torch.randint(0, NUM_CLASSES, (args.batch, *patch))
    nets = {name: build_model(name, patch) for name in ("nnunet_plain", "mambaclinix")}
    macs = {
        name: count_macs(lambda name=name: build_model(name, patch), (1, 1, *patch))["total"] * args.batch
        for name in nets
    }
    conv = torch.nn.Conv3d(32, 32, 3, padding=1)
    cx = torch.randn(args.batch, 32, *patch, requires_grad=True)
    macs["conv3d"] = 27 * 32 * 32 * args.batch * args.size**3
    opts = {
        n: torch.optim.Adam(m.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-5) for n, m in nets.items()
    }

    def step(variant):
        if variant == "conv3d":
            conv(cx).sum().backward()
            conv.zero_grad(set_to_none=True)
            cx.grad = None
            return
        name = "nnunet_plain" if variant == "nnunet_plain" else "mambaclinix"
        _state["tokens_layout"] = variant == "mambaclinix_tokens_layout"
        _state["numba1"] = variant == "mambaclinix_numba1"
        opts[name].zero_grad(set_to_none=True)
        F.cross_entropy(nets[name](x), labels).backward()
        opts[name].step()

    for v in dict.fromkeys("nnunet_plain" if v == "nnunet_plain" else v for v in args.variants):
        step(v)  # warm-up (Adam's state, numba's compilation)
    times = {v: [] for v in args.variants}
    cpu = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for v in args.variants:
            t0, c0 = time.perf_counter(), time.process_time()
            step(v)
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
            print(f"round {r} {v}: {times[v][-1]:.2f} s wall, {cpu[v][-1]:.2f} s CPU", flush=True)
    res = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "times_s": times,
           "cpu_s": cpu}  # fmt: skip
    base = "nnunet_plain" if "nnunet_plain" in times else None
    table = {}
    for v, ts in times.items():
        m = macs["conv3d" if v == "conv3d" else ("nnunet_plain" if v == "nnunet_plain" else "mambaclinix")]
        row = {"median_s": median(ts), "gflops": 6 * m / median(ts) / 1e9, "median_cpu_s": median(cpu[v])}
        if base and v != "conv3d":
            # per-round ratios against the baseline of the same round, then their median and spread
            ratios = [t / b for t, b in zip(ts, times[base], strict=True)]
            row["train_ratio"] = median(ratios)
            row["ratio_range"] = (min(ratios), max(ratios))
            row["per_mac_ratio"] = median(ratios) / (m / macs["nnunet_plain"])
            cpu_ratios = [t / b for t, b in zip(cpu[v], cpu[base], strict=True)]
            row["per_mac_cpu_ratio"] = median(cpu_ratios) / (m / macs["nnunet_plain"])
        table[v] = row
        print(v, {k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()})
    res["table"] = table
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
