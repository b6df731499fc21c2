"""Low-level operators: the selective scan and the causal depthwise conv1d, each with a pure-PyTorch
reference, a fast CPU/GPU path that needs no CUDA extension, and the ``mamba_ssm`` / ``causal_conv1d``
CUDA kernels where installed. See :mod:`mambaclinix.ops.backend` for how a backend is chosen.

:mod:`mambaclinix.ops.cpu_allocator` is a caching allocator for PyTorch's CPU tensors, which the
``mambaclinix`` command installs for training and prediction on CPUs."""

from mambaclinix.ops.backend import (
    SCAN_BACKENDS,
    get_default_backend,
    resolve_backend,
    set_default_backend,
)
from mambaclinix.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from mambaclinix.ops.cpu_allocator import (
    AllocatorBuildError,
    cpu_caching_allocator_stats,
    disable_cpu_caching_allocator,
    empty_cpu_cache,
    enable_cpu_caching_allocator,
    is_cpu_caching_allocator_enabled,
)
from mambaclinix.ops.selective_scan import selective_scan, selective_scan_ref

__all__ = [
    "SCAN_BACKENDS",
    "AllocatorBuildError",
    "causal_conv1d",
    "causal_conv1d_ref",
    "cpu_caching_allocator_stats",
    "disable_cpu_caching_allocator",
    "empty_cpu_cache",
    "enable_cpu_caching_allocator",
    "is_cpu_caching_allocator_enabled",
    "get_default_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "set_default_backend",
]
