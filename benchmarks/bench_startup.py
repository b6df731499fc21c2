"""Start-up time of the ``mambaclinix`` command against ``python -c "import torch"``.

Each variant is a fresh ``python`` process (``python -m mambaclinix.cli ARGS``, the same code as the
``mambaclinix`` script); the variants are interleaved round by round so that a machine that slows down
(other work, CPU frequency) affects them alike, and each is reported as the median wall time over the
rounds and as a ratio to the median of ``import torch`` measured in the same run. Also reported: whether
the command imported Lightning or TorchIO (``-X importtime``), the machine and the versions.

    python benchmarks/bench_startup.py --rounds 7 --json docs/startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, list[str]] = {
    'python -c "import torch"': ["-c", "import torch"],
    "mambaclinix --help": ["-m", "mambaclinix.cli", "--help"],
    "mambaclinix plan --help": ["-m", "mambaclinix.cli", "plan", "--help"],
    "mambaclinix fit --help": ["-m", "mambaclinix.cli", "fit", "--help"],
}
BASELINE = 'python -c "import torch"'
HEAVY = ("lightning", "torchio")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], env=_env(), check=True, capture_output=True)
    return time.perf_counter() - t0


def _heavy_imports(args: list[str]) -> list[str]:
    """Top-level packages of ``HEAVY`` that the command imports (from ``-X importtime``)."""
    cmd = [sys.executable, "-X", "importtime", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    found = set()
    for line in proc.stderr.splitlines():
        name = line.rsplit("|", 1)[-1].strip()
        if name.split(".")[0] in HEAVY:
            found.add(name.split(".")[0])
    return sorted(found)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "lightning", "torchio", "jsonargparse"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()

    for args in VARIANTS.values():  # warm the file cache once
        _run(args)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(a.rounds):
        for name, args in VARIANTS.items():
            times[name].append(_run(args))
    base = statistics.median(times[BASELINE])
    rows = []
    for name, args in VARIANTS.items():
        med = statistics.median(times[name])
        heavy = _heavy_imports(args) if name != BASELINE else []
        ratio = round(med / base, 2)
        rows.append({"command": name, "median_s": round(med, 3), "ratio_to_import_torch": ratio,
                     "min_s": round(min(times[name]), 3), "imports": heavy})  # fmt: skip
    result = {
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count()},
        "versions": _versions(),
        "rounds": a.rounds,
        "results": rows,
    }
    print(f"{'command':28s} {'median s':>9s} {'x import torch':>15s}  imports Lightning/TorchIO")
    for r in rows:
        print(f"{r['command']:28s} {r['median_s']:9.3f} {r['ratio_to_import_torch']:15.2f}  "
              f"{', '.join(r['imports']) or 'neither'}")  # fmt: skip
    print(json.dumps({k: result[k] for k in ("machine", "versions", "rounds")}))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
