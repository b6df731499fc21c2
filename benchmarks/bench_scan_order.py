"""Cost of the scan order: ``MambaLayer(scan_order="F")`` (first array axis fastest, the authors' x-fastest
order on TorchIO arrays) against the default ``"C"`` (a plain row-major flatten), forward + backward.

``"F"`` permutes the spatial axes before the flatten and back after the reshape, which costs one copy of
the feature map each way; the Mamba block itself is the same. The two orders are timed alternately in one
process (same warm caches, same thread count) and reported as the ratio F / C of the median times.

    python benchmarks/bench_scan_order.py                  # CPU, the shapes of MambaClinix's Mamba stages
    python benchmarks/bench_scan_order.py --device cuda --json results/scan_order_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, time_call  # noqa: E402

from mambaclinix.layers import MambaLayer  # noqa: E402

# (channels, edge): a 128³ patch reaches 16³ at stage 3 (256 channels) of the paper network; smaller and
# cheaper shapes keep the CPU run short
SHAPES = [(64, 16), (256, 8), (320, 4)]


def run(device: torch.device, repeats: int, rounds: int, backend: str | None) -> list[dict]:
    rows = []
    for channels, edge in SHAPES:
        torch.manual_seed(0)
        layers = {
            order: MambaLayer(channels, scan_order=order, scan_backend=backend).to(device) for order in "CF"
        }
        layers["F"].load_state_dict(layers["C"].state_dict())
        x = torch.randn(2, channels, edge, edge, edge, device=device, requires_grad=True)
        times: dict[str, list[float]] = {"C": [], "F": []}
        for _ in range(rounds):  # interleaved: C, F, C, F, ...
            for order, layer in layers.items():
                times[order] += time_call(lambda layer=layer, x=x: layer(x).sum().backward(), device, repeats)
        c, f = median(times["C"]), median(times["F"])
        rows.append({"channels": channels, "shape": [2, channels, edge, edge, edge], "c_ms": c * 1e3,
                     "f_ms": f * 1e3, "ratio_f_over_c": f / c})  # fmt: skip
        print(f"B2 C{channels} {edge}^3: C {c * 1e3:.2f} ms, F {f * 1e3:.2f} ms, F/C = {f / c:.3f}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round and order")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two orders")
    parser.add_argument("--backend", default=None, help="selective-scan backend (default: the process's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = machine_info(device)
    print(json.dumps(info))
    rows = run(device, args.repeats, args.rounds, args.backend)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
