"""Helpers shared by the benchmark scripts: machine description, timing, peak-memory sampling."""

from __future__ import annotations

import os
import platform
import statistics
import threading
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
    """Wall times (s) of ``repeats`` calls after ``warmup`` calls, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory (bytes) that one call adds on top of what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call. CPU: the peak of
    the process's resident set size, sampled every millisecond by a thread, minus the RSS before the
    call (run each measurement in a fresh process: freed memory is not always returned to the OS).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_bytes()
    peak = before
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return max(peak, _rss_bytes()) - before
