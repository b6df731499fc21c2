"""Tile sizes of the Triton selective-scan kernels: time forward and backward over a small grid.

Run on the GPU the defaults are chosen for (``mambaclinix.ops._scan_triton.TILES``); prints a Markdown
table and writes JSON with the machine description. ``B=2, E=640, N=16, L=4096`` float32 by default
(MambaClinix's deepest stages at a 128³ patch).

    python benchmarks/tune_triton_scan.py --json results/triton_tiles.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median, time_call  # noqa: E402
from bench_scan import make_inputs  # noqa: E402

from mambaclinix.ops import _scan_triton as k  # noqa: E402
from mambaclinix.ops import selective_scan  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--L", type=int, default=4096)
    p.add_argument("--E", type=int, default=640)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--tiles", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--device", default="cuda", help="cpu only with TRITON_INTERPRET=1 (checks the script)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    u, delta, A, B, C, D, z, bias = make_inputs(args.batch, args.E, args.N, args.L, device)
    default = dict(k.TILES)

    def fwd(chunk):
        with torch.no_grad():
            return selective_scan(u, delta, A, B, C, D, z, bias, True, backend="triton", chunk=chunk)

    def fwdbwd(chunk):
        y = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="triton", chunk=chunk)
        y.backward(torch.ones_like(y))

    rows = []
    for chunk, tile, warps in itertools.product(args.chunks, args.tiles, args.warps):
        k.TILES.update(fwd=(tile, warps), bwd=(tile, warps))
        try:
            fwdbwd(chunk)  # compile
            t_f = median(time_call(lambda: fwd(chunk), device, args.repeats))  # noqa: B023
            t_fb = median(time_call(lambda: fwdbwd(chunk), device, args.repeats))  # noqa: B023
            row = {"chunk": chunk, "tile": tile, "warps": warps, "fwd_ms": t_f * 1e3,
                   "bwd_ms": (t_fb - t_f) * 1e3, "fwdbwd_ms": t_fb * 1e3}  # fmt: skip
        except Exception as e:  # a tile that does not compile (registers, shared memory) is reported
            row = {"chunk": chunk, "tile": tile, "warps": warps, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    k.TILES.update(default)
    lines = ["| chunk | tile | warps | fwd (ms) | bwd (ms) | fwd+bwd (ms) |", "|---:" * 6 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['chunk']} | {r['tile']} | {r['warps']} | {r['error']} | | |")
        else:
            times = f"{r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {r['fwdbwd_ms']:.2f}"
            lines.append(f"| {r['chunk']} | {r['tile']} | {r['warps']} | {times} |")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shape = {"batch": args.batch, "E": args.E, "N": args.N, "L": args.L, "dtype": "float32"}
        args.json.write_text(json.dumps({"machine": machine_info(device), "shape": shape, "default": default,
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
