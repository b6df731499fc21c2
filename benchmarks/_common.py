"""Helpers shared by the benchmark scripts: machine description, the timer, the peak-memory measure."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def machine_info(device: torch.device | None = None) -> dict:
    """Platform, CPU, threads, and the versions of Python, torch, numba and MONAI (None if absent)."""
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import numba

        info["numba"] = numba.__version__
    except Exception:
        info["numba"] = None
    try:
        import monai

        info["monai"] = monai.__version__
    except Exception:
        info["monai"] = None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` calls, the device synchronised around each.

    The one timer of every benchmark script (``time.perf_counter``).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --------------------------------------------------------------------------------------------------
# Peak memory: the one measure of every benchmark script.
#
# CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's reserve).
# CPU: the process's peak resident set, ``VmHWM`` of ``/proc/self/status``, which the kernel tracks
# exactly and which writing "5" to ``/proc/self/clear_refs`` resets to the current RSS (Linux >= 4.0;
# the CPU measure needs Linux).
# Run each CPU measurement in a fresh process: freed memory is not always returned to the OS.


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def current_memory(device: torch.device) -> int:
    """Bytes in use now: allocated tensors on CUDA, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS")


def reset_peak(device: torch.device) -> int:
    """Reset the peak (CUDA allocator statistics, or the CPU's ``VmHWM``); returns :func:`current_memory`.

    Raises:
        OSError: on the CPU, where ``/proc/self/clear_refs`` cannot be written (not Linux).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return current_memory(device)


def peak_since_reset(device: torch.device) -> int:
    """Peak bytes since the last :func:`reset_peak` (absolute: subtract that call's return value)."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory (bytes) that one call of ``fn`` adds on top of what was in use before it."""
    before = reset_peak(device)
    fn()
    return peak_since_reset(device) - before
