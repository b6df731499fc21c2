"""Deployment: exporting a trained network to ONNX and running the exported graph.

:func:`export_onnx` writes the whole network, Mamba layers included, as standard ONNX operators (the
selective scan in the closed form of :func:`selective_scan_chunked_closed_form`); :class:`OnnxNetwork`
runs the file with onnxruntime and is a drop-in predictor for
:func:`mambaclinix.inference.sliding_window_inference`; :func:`onnx_export_mode` is the export-time
substitution itself. onnx, onnxruntime and onnxscript are imported on first use
(``pip install "mambaclinix[onnx]"``); importing this package needs PyTorch only, and its names are
loaded on first access.
"""

import importlib

_LAZY = {
    # name: defining module
    "OnnxNetwork": "mambaclinix.deploy.onnx",
    "export_onnx": "mambaclinix.deploy.onnx",
    "onnx_export_mode": "mambaclinix.deploy.onnx",
    "selective_scan_chunked_closed_form": "mambaclinix.deploy.scan",
}

__all__ = [*_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mambaclinix.deploy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
