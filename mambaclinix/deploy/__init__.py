"""Deployment: exporting a trained network to ONNX and running the exported graph.

``export_onnx(network, path, roi_size, in_channels)`` writes the whole network, Mamba layers included, as
standard ONNX operators; ``OnnxNetwork(path)`` runs it with onnxruntime and is a drop-in predictor for
:func:`mambaclinix.inference.sliding_window_inference`. Both import onnx / onnxruntime lazily, on first use
(``pip install "mambaclinix[onnx]"``); importing this package needs PyTorch only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["OnnxNetwork", "export_onnx", "onnx_export_mode", "selective_scan_chunked_closed_form"]

if TYPE_CHECKING:  # pragma: no cover
    from mambaclinix.deploy.onnx import OnnxNetwork, export_onnx, onnx_export_mode
    from mambaclinix.deploy.scan import selective_scan_chunked_closed_form

_LAZY = {
    "OnnxNetwork": "mambaclinix.deploy.onnx",
    "export_onnx": "mambaclinix.deploy.onnx",
    "onnx_export_mode": "mambaclinix.deploy.onnx",
    "selective_scan_chunked_closed_form": "mambaclinix.deploy.scan",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mambaclinix.deploy' has no attribute {name!r}")
