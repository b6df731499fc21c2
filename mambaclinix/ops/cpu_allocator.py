"""A caching allocator for CPU tensors: large blocks are kept when freed and handed out again.

On Linux, glibc serves every allocation above 32 MiB with a fresh ``mmap`` and gives it back to the kernel
on ``free``. A 3D network allocates its activations and their gradients anew at every training step, and
each fresh page costs a page fault and the kernel's zeroing of it: on a 2-core machine at a 96³ patch,
batch 2, that was about 40 % of the CPU time of a train step, for MambaClinix and for nnU-Net's PlainConvUNet
alike (docs/benchmarks.md, "Where a CPU step's time goes"). The usual cure is to preload tcmalloc or
jemalloc (``LD_PRELOAD``), which a pip install cannot do; this module does the same inside the process.

:func:`enable_cpu_caching_allocator` compiles a small C++ allocator (``csrc/cpu_allocator.cpp``) with the
system C++ compiler against PyTorch's ``libc10`` on first use (a few seconds, cached under
``~/.cache/mambaclinix`` or ``$MAMBACLINIX_CACHE_DIR``) and installs it as PyTorch's CPU allocator:

* requests of 1 MiB and more are rounded up to 2 MiB; a freed block is kept, and a request takes the
  smallest kept block that holds it if that is at most twice its size, else a new block (a training
  step requests the same sizes every time);
* smaller blocks go to PyTorch's own ``alloc_cpu``/``free_cpu``;
* before a new block is allocated, kept blocks are given back (largest first) until the blocks in use,
  the kept ones and the new one fit within 1.1 times the most bytes ever in use at once (``headroom``):
  the large blocks it holds stay within 10 % of what the tensors need (the process's peak resident
  memory was 8-12 % above PyTorch's allocator's in the benchmarks), while a training step, which needs
  the same blocks each time, finds nearly all of them kept;
* kept blocks are also bounded by ``limit_bytes`` (default: half the machine's memory), and all of them
  are given back when an allocation fails;
* :func:`empty_cpu_cache` gives the kept blocks back (like ``torch.cuda.empty_cache``).

Only tensors allocated after :func:`enable_cpu_caching_allocator` use it. The ``mambaclinix`` command
enables it for its own process (``MAMBACLINIX_CPU_ALLOCATOR=system`` opts out); a Python user calls
:func:`enable_cpu_caching_allocator` first thing. Where no C++ compiler is found, or the system is not
Linux, it returns ``False`` and PyTorch's allocator stays in place.

PyTorch's profiler does not see the memory this allocator hands out (its memory columns stay empty).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from mambaclinix.utils.atomic import atomic_path

__all__ = [
    "AllocatorBuildError",
    "cpu_caching_allocator_stats",
    "disable_cpu_caching_allocator",
    "empty_cpu_cache",
    "enable_cpu_caching_allocator",
    "is_cpu_caching_allocator_enabled",
]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_allocator.cpp"

#: Kept blocks are given back before a new one is allocated where blocks in use, kept blocks and the new
#: one together would exceed ``1 + DEFAULT_HEADROOM`` times the most bytes ever in use at once.
DEFAULT_HEADROOM = 0.1

#: Priority given to ``c10::SetCPUAllocator``: above PyTorch's default allocator (0).
_PRIORITY = 1

_lock = threading.Lock()


class AllocatorBuildError(RuntimeError):
    """The caching allocator cannot be built or loaded here (no compiler, not Linux, a compile error)."""


def _cache_dir() -> Path:
    root = os.environ.get("MAMBACLINIX_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mambaclinix"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise AllocatorBuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")


def _build_command(compiler: str, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}", str(SOURCE), f"-L{torch_dir / 'lib'}", "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(output),
    ]  # fmt: skip


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    """Compile (once per source, compiler and PyTorch build) and load the allocator library."""
    if platform.system() != "Linux":
        raise AllocatorBuildError(
            f"the CPU caching allocator is built for Linux only, not {platform.system()}"
        )
    compiler = _compiler()
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), torch.__version__.encode(), torch.__file__.encode()):
        key.update(part)
    path = _cache_dir() / f"cpu_allocator-{key.hexdigest()[:16]}.so"
    if not path.exists():
        with atomic_path(path, suffix=".so") as tmp:
            done = subprocess.run(_build_command(compiler, tmp), capture_output=True, text=True)
            if done.returncode != 0:
                raise AllocatorBuildError(
                    f"compiling {SOURCE.name} with {compiler} failed:\n{done.stderr.strip()[-2000:]}"
                )
    lib = ctypes.CDLL(str(path))
    for name, restype, argtypes in (
        ("mcx_install", ctypes.c_int, [ctypes.c_int]),
        ("mcx_uninstall", ctypes.c_int, [ctypes.c_int]),
        ("mcx_active", ctypes.c_int, []),
        ("mcx_set_limit", None, [ctypes.c_uint64, ctypes.c_double]),
        ("mcx_empty_cache", ctypes.c_uint64, []),
        ("mcx_stats", None, [ctypes.POINTER(ctypes.c_uint64)]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _default_limit() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


def enable_cpu_caching_allocator(
    limit_bytes: int | None = None, headroom: float | None = DEFAULT_HEADROOM, *, strict: bool = False
) -> bool:
    """Install the caching allocator as PyTorch's CPU allocator (see the module docstring).

    Args:
        limit_bytes: Most bytes of freed blocks kept for reuse; default half the machine's memory.
        headroom: Before a new block is allocated, kept blocks (largest first) are given back until the
            blocks in use, the kept ones and the new one fit within ``1 + headroom`` times the most bytes
            in use at once so far; ``None``: keep every freed block (up to ``limit_bytes``).
        strict: Raise :class:`AllocatorBuildError` where it cannot be built or installed, instead of
            logging why and returning ``False``.

    Returns:
        Whether the caching allocator is now PyTorch's CPU allocator.
    """
    if limit_bytes is not None and limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    if headroom is not None and not headroom >= 0:
        raise ValueError(f"headroom must be >= 0 or None, got {headroom}")
    with _lock:
        try:
            lib = _library()
        except (AllocatorBuildError, OSError) as err:
            if strict:
                raise AllocatorBuildError(str(err)) from err
            log.info("CPU caching allocator not enabled: %s", err)
            return False
        limit = _default_limit() if limit_bytes is None else int(limit_bytes)
        lib.mcx_set_limit(limit, -1.0 if headroom is None else float(headroom))
        if lib.mcx_install(_PRIORITY) != 1:
            message = "another CPU allocator with a higher priority is installed; kept it"
            if strict:
                raise AllocatorBuildError(message)
            log.info("CPU caching allocator not enabled: %s", message)
            return False
        return True


def disable_cpu_caching_allocator() -> bool:
    """Give PyTorch's previous CPU allocator its place back and free the kept blocks. Tensors allocated
    meanwhile stay valid (their blocks are freed when they are). Returns whether it had been enabled."""
    with _lock:
        if not is_cpu_caching_allocator_enabled():
            return False
        return bool(_library().mcx_uninstall(_PRIORITY))


def is_cpu_caching_allocator_enabled() -> bool:
    """Whether the caching allocator is PyTorch's CPU allocator now (never builds it)."""
    if _library.cache_info().currsize == 0:
        return False
    return bool(_library().mcx_active())


def empty_cpu_cache() -> int:
    """Give every kept block back to the system and restart the peak of bytes in use (which bounds the
    kept blocks) from the bytes in use now; returns the bytes released (0 when not enabled)."""
    if _library.cache_info().currsize == 0:
        return 0
    return int(_library().mcx_empty_cache())


def cpu_caching_allocator_stats() -> dict[str, int]:
    """``live_bytes`` (blocks of 1 MiB and more in use), ``cached_bytes`` (kept for reuse),
    ``peak_live_bytes`` (the most in use at once), ``hits`` and ``misses`` (requests served by a kept block
    or by a new one), ``evictions`` (kept blocks given back to stay within the headroom),
    ``limit_bytes``. All zero when the allocator was never enabled."""
    names = ("live_bytes", "cached_bytes", "peak_live_bytes", "hits", "misses", "evictions", "limit_bytes")
    if _library.cache_info().currsize == 0:
        return dict.fromkeys(names, 0)
    out = (ctypes.c_uint64 * len(names))()
    _library().mcx_stats(out)
    return dict(zip(names, map(int, out), strict=True))
