"""Train step of MambaClinix against PlainConvUNet per MAC on the CPU, with each CPU memory allocator.

Every (variant, allocator) pair runs in a fresh process, and the rounds interleave them (round 1: every
pair, round 2: every pair, ...), so that noise from other processes reaches all alike and no variant
inherits another's heap. Variants:

- ``nnunet_plain``: the baseline of every ratio (needs dynamic-network-architectures).
- ``mambaclinix``: the paper preset.
- ``mambaclinix_numba1``: the same with the scan's numba pool held to one thread (thread competition
  between numba's pool and PyTorch's OpenMP threads on a small machine).
- ``mambaclinix_tokens_layout``: the same with each Mamba layer's output given the token-major strides
  (channels innermost) it had before it was made contiguous: the convolutions after it then run on
  channels-last tensors.
- ``conv3d``: one plain 3×3×3 Conv3d, 32 → 32 channels at the full patch size, forward + backward: the
  arithmetic rate (GFLOP/s) a dense convolution reaches on this machine, beside the networks' rates.

Allocators: ``system`` (PyTorch's default, i.e. glibc's malloc) and ``caching``
(:func:`mambaclinix.ops.cpu_allocator.enable_cpu_caching_allocator`, what the ``mambaclinix`` command
uses). A network's ratio is taken against PlainConvUNet under the same allocator, in the same round.

Train step: ``zero_grad``, forward, cross-entropy on random labels, backward, Adam step. GFLOP/s of a step
= 3 × 2 × forward MACs / time (backward = 2 × forward). After ``--warmup`` untimed steps, the child
records per timed step its wall time, user and system CPU time, minor page faults and peak resident
memory (``getrusage``).

    python benchmarks/bench_gap.py --size 96 --batch 2 --rounds 2 --json docs/gap_cpu_96.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("nnunet_plain", "mambaclinix", "mambaclinix_numba1", "mambaclinix_tokens_layout", "conv3d")
ALLOCATORS = ("system", "caching")


def _child(variant: str, allocator: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    """Build ``variant``, run ``warmup`` steps and ``steps`` timed steps; per-step measurements."""
    import torch
    import torch.nn.functional as F

    if allocator == "caching":
        from mambaclinix.ops.cpu_allocator import enable_cpu_caching_allocator

        enable_cpu_caching_allocator(strict=True)
    if variant == "mambaclinix_numba1":
        from mambaclinix.ops import _scan_numba

        set_threads = _scan_numba.set_threads
        _scan_numba.set_threads = lambda n: set_threads(1)
    if variant == "mambaclinix_tokens_layout":
        from mambaclinix.layers.mamba import MambaLayer

        forward = MambaLayer.forward

        def tokens_layout(self, x):
            out = forward(self, x)
            return out.flatten(2).transpose(1, 2).contiguous().transpose(1, 2).reshape(out.shape)

        MambaLayer.forward = tokens_layout
    from _flops import count_macs
    from _zoo import NUM_CLASSES, build_model

    patch = (size,) * 3
    torch.manual_seed(0)
    if variant == "conv3d":
        conv = torch.nn.Conv3d(32, 32, 3, padding=1)
        cx = torch.randn(batch, 32, *patch, requires_grad=True)
        macs = 27 * 32 * 32 * batch * size**3

        def step():
            conv(cx).sum().backward()
            conv.zero_grad(set_to_none=True)
            cx.grad = None

    else:
        name = "nnunet_plain" if variant == "nnunet_plain" else "mambaclinix"
        net = build_model(name, patch)
        macs = count_macs(lambda: build_model(name, patch), (1, 1, *patch))["total"] * batch
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-5)
        x = torch.randn(batch, 1, *patch)
        labels = torch.randint(0, NUM_CLASSES, (batch, *patch))

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), labels).backward()
            opt.step()

    for _ in range(warmup):  # Adam's state, numba's compilation, the caching allocator's blocks
        step()
    rows = []
    for _ in range(steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append({
            "wall_s": t1 - t0,
            "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "peak_rss_mib": r1.ru_maxrss / 1024,
        })  # fmt: skip
    return {"macs": macs, "steps": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps first (the first creates Adam's state, so its "
        "allocations differ from the later steps': the caching allocator needs the second one too)",
    )
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=["nnunet_plain", "mambaclinix", "conv3d"]
    )
    p.add_argument("--allocators", nargs="+", choices=ALLOCATORS, default=list(ALLOCATORS))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.size, args.batch, args.steps, args.warmup)))
        return {}

    from _common import machine_info, median

    pairs = [(v, a) for a in args.allocators for v in args.variants]
    runs: dict[str, list[dict]] = {f"{v}/{a}": [] for v, a in pairs}
    macs: dict[str, int] = {}
    for r in range(args.rounds):
        for v, a in pairs:
            cmd = [sys.executable, __file__, "--child", v, a, "--size", str(args.size), "--batch",
                   str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            macs[v] = res["macs"]
            runs[f"{v}/{a}"].append(res["steps"])
            walls = ", ".join(f"{s['wall_s']:.2f}" for s in res["steps"])
            print(f"round {r} {v}/{a}: wall {walls} s", flush=True)

    table = {}
    for key, rounds in runs.items():
        v, a = key.split("/")
        steps = [s for rnd in rounds for s in rnd]
        row = {k: median([s[k] for s in steps]) for k in steps[0]}
        row["peak_rss_mib"] = max(s["peak_rss_mib"] for s in steps)
        row["gflops"] = 6 * macs[v] / row["wall_s"] / 1e9
        base = f"nnunet_plain/{a}"
        if v != "conv3d" and base in runs:
            # each round's median step against the baseline's in the same round, then their median
            ratios = [median([s["wall_s"] for s in mine]) / median([s["wall_s"] for s in theirs])
                      for mine, theirs in zip(rounds, runs[base], strict=True)]  # fmt: skip
            mac_ratio = macs[v] / macs["nnunet_plain"]
            row["train_ratio"] = median(ratios)
            row["ratio_range"] = (min(ratios), max(ratios))
            row["per_mac_ratio"] = row["train_ratio"] / mac_ratio
            cpu = [s["user_s"] + s["sys_s"] for s in steps]
            cpu_base = [s["user_s"] + s["sys_s"] for rnd in runs[base] for s in rnd]
            row["per_mac_cpu_ratio"] = median(cpu) / median(cpu_base) / mac_ratio
        if f"{v}/system" in runs and a != "system":
            row["speedup_vs_system"] = table[f"{v}/system"]["wall_s"] / row["wall_s"]
        table[key] = row
        print(key, {k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()})
    res = {"args": {k: str(v) for k, v in vars(args).items() if k != "child"}, "machine": machine_info(),
           "macs": macs, "runs": runs, "table": table}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
