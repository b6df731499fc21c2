"""Low-level operators: the selective scan and the causal depthwise conv1d, each with a pure-PyTorch
reference, a fast CPU/GPU path that needs no CUDA extension, and the ``mamba_ssm`` / ``causal_conv1d``
CUDA kernels where installed. See :mod:`mambaclinix.ops.backend` for how a backend is chosen."""

from mambaclinix.ops.backend import (
    SCAN_BACKENDS,
    get_default_backend,
    resolve_backend,
    set_default_backend,
)
from mambaclinix.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref
from mambaclinix.ops.selective_scan import selective_scan, selective_scan_ref

__all__ = [
    "SCAN_BACKENDS",
    "causal_conv1d",
    "causal_conv1d_ref",
    "get_default_backend",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "set_default_backend",
]
