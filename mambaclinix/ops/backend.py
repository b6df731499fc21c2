"""Choosing the implementation of the selective scan and of the causal conv1d.

Backends are chosen **once**, never guessed per call:

- ``selective_scan(..., backend="numba")`` (or any other name) uses that backend or raises.
- ``backend=None`` (the default everywhere, modules included) uses the process-wide setting, which is
  ``set_default_backend(name)`` if called, else the ``MAMBACLINIX_SCAN_BACKEND`` environment variable,
  else ``"auto"``.
- ``"auto"`` is a fixed, documented rule on the device of the inputs (see :func:`resolve_backend`):

  ========================  =============================================================
  device                    backend
  ========================  =============================================================
  CUDA, mamba-ssm present   ``"cuda"`` (``mamba_ssm``'s fused kernel)
  CUDA, no mamba-ssm        ``"triton"`` (chunked parallel scan; ``"chunked"`` without Triton)
  CPU, numba present        ``"numba"`` (fused JIT kernel, recomputed per chunk)
  CPU, no numba             ``"chunked"``
  ========================  =============================================================

  The result is logged once per device type at INFO level (logger ``mambaclinix.ops``).

Backends: ``"reference"`` (the sequential loop the tests trust; stores every step for autograd),
``"chunked"`` (the same loop with the state checkpointed every ``chunk`` steps, memory-bounded, any
device), ``"numba"`` (CPU only), ``"triton"`` (CUDA tensors and the ``triton`` package, which comes with
PyTorch's CUDA wheels; with ``TRITON_INTERPRET=1`` it also runs, slowly, on CPU tensors), ``"cuda"``
(needs ``pip install "mambaclinix[cuda]"`` and CUDA tensors).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("mambaclinix.ops")

SCAN_BACKENDS = ("auto", "reference", "chunked", "numba", "triton", "cuda")
ENV_VAR = "MAMBACLINIX_SCAN_BACKEND"

_default_backend: str | None = None


def _check_name(name: str, what: str) -> str:
    if name not in SCAN_BACKENDS:
        raise ValueError(f"{what}={name!r} is not a scan backend; expected one of {SCAN_BACKENDS}")
    return name


def set_default_backend(name: str | None) -> None:
    """Set the process-wide backend used where ``backend=None``; ``None`` restores the env/auto rule."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name, "backend")


def get_default_backend() -> str:
    """The process-wide backend name (may be ``"auto"``)."""
    if _default_backend is not None:
        return _default_backend
    return _check_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


@functools.cache
def has_numba() -> bool:
    """True if numba imports (checked once; a broken install, e.g. one built for another NumPy, is False)."""
    try:
        import numba  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def has_triton() -> bool:
    """True if triton imports (checked once)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def has_mamba_ssm() -> bool:
    """True if ``mamba_ssm``'s compiled selective-scan kernel imports (checked once)."""
    try:
        import selective_scan_cuda  # noqa: F401  (the extension module mamba_ssm builds)
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build raising OSError/RuntimeError
        return False
    return True


@functools.cache
def has_causal_conv1d() -> bool:
    """True if the ``causal_conv1d`` CUDA kernel imports (checked once)."""
    try:
        from causal_conv1d import causal_conv1d_fn  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _auto(device_type: str) -> str:
    if device_type == "cuda":
        name = "cuda" if has_mamba_ssm() else ("triton" if has_triton() else "chunked")
    elif device_type == "cpu":
        name = "numba" if has_numba() else "chunked"
    else:
        name = "chunked"
    logger.info("selective scan backend for %s tensors: %s (rule 'auto')", device_type, name)
    return name


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Turn a requested backend (or ``None`` for the process default) into a concrete one for ``device``.

    Under ``torch.compile`` and ``torch.export`` this runs once, while tracing, and its result is a
    constant of the compiled graph: a later ``set_default_backend`` or environment change does not
    reach a model compiled before it.

    Raises:
        ValueError: unknown name, or a backend that cannot run on ``device``.
        ImportError: the backend's package is not installed (the message names the extra).
    """
    name = get_default_backend() if backend is None else _check_name(backend, "backend")
    if name == "auto":
        return _auto(device.type)
    if name == "numba":
        if device.type != "cpu":
            raise ValueError(f"scan backend 'numba' runs on CPU tensors only, got device {device}")
        if not has_numba():
            raise ImportError("scan backend 'numba' needs numba: pip install numba")
    if name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpreted()):
            raise ValueError(
                "scan backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                f"got device {device}"
            )
        if not has_triton():
            raise ImportError("scan backend 'triton' needs triton: pip install triton")
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"scan backend 'cuda' needs CUDA tensors, got device {device}")
        if not has_mamba_ssm():
            raise ImportError(
                "scan backend 'cuda' needs mamba-ssm's compiled kernel: pip install 'mambaclinix[cuda]'"
            )
    return name
