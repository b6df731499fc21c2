"""Tile sizes of the Triton selective-scan kernels: time forward and backward over a small grid, against
the memory-bandwidth limit and the other backends.

Run on the GPU the defaults are chosen for (``mambaclinix.ops._scan_triton.TILES``); prints a Markdown
table and writes JSON with the machine description. ``B=2, E=640, N=16, L=4096`` float32 by default
(MambaClinix's deepest stages at a 128³ patch).

*Bandwidth.* The scan is memory-bound: the least a forward pass can move is its inputs ``u, Δ, z``
(``B·E·L`` each), ``B, C`` (``B·N·L`` each) and its output ``y``; the backward reads those and ``dy`` and
writes ``du, dΔ, dz, dB, dC`` (the small ``A, D, bias`` left out). Each row reports that many bytes ÷
its time as a fraction of the device's copy bandwidth, measured in the same run (a 1 GiB
``Tensor.copy_``: bytes read + written ÷ time), which is what the memory system delivers in practice.
``--compare`` times other backends with their defaults at the same shape (default: ``chunked`` and
``reference``).

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

FLOAT32 = 4


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` for ``nbytes`` (read ``nbytes`` + write ``nbytes``)."""
    src = torch.empty(nbytes // FLOAT32, device=device)
    dst = torch.empty_like(src)
    t = median(time_call(lambda: dst.copy_(src), device, repeats))
    return 2 * nbytes / t


def scan_bytes(batch: int, E: int, N: int, L: int) -> dict[str, int]:
    """The least bytes a float32 forward and a backward must move (module docstring)."""
    bel, bnl = batch * E * L, batch * N * L
    fwd = FLOAT32 * (4 * bel + 2 * bnl)  # read u, delta, z, B, C; write y
    bwd = FLOAT32 * (4 * bel + 2 * bnl + 3 * bel + 2 * bnl)  # read those and dy; write du, ddelta, dz, dB, dC
    return {"fwd": fwd, "bwd": bwd}


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
    p.add_argument("--compare", nargs="*", default=["chunked", "reference"], help="other backends to time")
    p.add_argument("--device", default="cuda", help="cpu only with TRITON_INTERPRET=1 (checks the script)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    inputs = make_inputs(args.batch, args.E, args.N, args.L, device)
    u, delta, A, B, C, D, z, bias = inputs
    default = dict(k.TILES)
    bandwidth = copy_bandwidth(device)
    need = scan_bytes(args.batch, args.E, args.N, args.L)

    def fwd(chunk, backend="triton"):
        with torch.no_grad():
            kw = {} if chunk is None else {"chunk": chunk}
            return selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend, **kw)

    def fwdbwd(chunk, backend="triton"):
        kw = {} if chunk is None else {"chunk": chunk}
        y = selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend, **kw)
        y.backward(torch.ones_like(y))
        for t in inputs:
            t.grad = None

    def fractions(t_f: float, t_fb: float) -> dict:
        return {"fwd_bw_fraction": need["fwd"] / t_f / bandwidth,
                "bwd_bw_fraction": need["bwd"] / max(t_fb - t_f, 1e-9) / bandwidth}  # fmt: skip

    rows = []
    for chunk, tile, warps in itertools.product(args.chunks, args.tiles, args.warps):
        k.TILES.update(fwd=(tile, warps), bwd=(tile, warps))
        try:
            fwdbwd(chunk)  # compile
            t_f = median(time_call(lambda: fwd(chunk), device, args.repeats))  # noqa: B023
            t_fb = median(time_call(lambda: fwdbwd(chunk), device, args.repeats))  # noqa: B023
            row = {"chunk": chunk, "tile": tile, "warps": warps, "fwd_ms": t_f * 1e3,
                   "bwd_ms": (t_fb - t_f) * 1e3, "fwdbwd_ms": t_fb * 1e3, **fractions(t_f, t_fb)}  # fmt: skip
        except Exception as e:  # a tile that does not compile (registers, shared memory) is reported
            row = {"chunk": chunk, "tile": tile, "warps": warps, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    k.TILES.update(default)
    others = []
    for backend in args.compare:
        try:
            t_f = median(time_call(lambda: fwd(None, backend), device, args.repeats))  # noqa: B023
            t_fb = median(time_call(lambda: fwdbwd(None, backend), device, args.repeats))  # noqa: B023
            row = {"backend": backend, "fwd_ms": t_f * 1e3, "bwd_ms": (t_fb - t_f) * 1e3,
                   "fwdbwd_ms": t_fb * 1e3, **fractions(t_f, t_fb)}  # fmt: skip
        except Exception as e:  # a backend not available here is reported
            row = {"backend": backend, "error": f"{type(e).__name__}: {e}"[:200]}
        others.append(row)
        print(row, file=sys.stderr, flush=True)
    lines = [
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; least bytes: forward {need['fwd'] / 1e6:.1f} MB, "
        f"backward {need['bwd'] / 1e6:.1f} MB",
        "",
        "| backend | chunk | tile | warps | fwd (ms) | bwd (ms) | fwd+bwd (ms) | fwd / copy | bwd / copy |",
        "|---" + "|---:" * 8 + "|",
    ]
    for r in rows + others:
        name = r.get("backend", "triton")
        cfg = " | ".join(str(r.get(key, "default")) for key in ("chunk", "tile", "warps"))
        if "error" in r:
            lines.append(f"| {name} | {cfg} | {r['error']} | | | | |")
        else:
            times = f"{r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {r['fwdbwd_ms']:.2f}"
            lines.append(
                f"| {name} | {cfg} | {times} | {r['fwd_bw_fraction']:.2f} | {r['bwd_bw_fraction']:.2f} |"
            )
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shape = {"batch": args.batch, "E": args.E, "N": args.N, "L": args.L, "dtype": "float32"}
        args.json.write_text(json.dumps({"machine": machine_info(device), "shape": shape, "default": default,
                                         "copy_bandwidth_Bps": bandwidth, "least_bytes": need, "rows": rows,
                                         "other_backends": others}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
