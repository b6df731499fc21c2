"""Lazy access to the ONNX export and runtime (``mambaclinix.deploy.onnx``)."""

from __future__ import annotations

from mambaclinix.deploy.metadata import PackageError

__all__ = ["import_onnx_module"]


def import_onnx_module():
    """:mod:`mambaclinix.deploy.onnx` (``export_onnx``, ``OnnxNetwork``), imported on first use.

    Raises:
        PackageError: the module or ``onnx`` / ``onnxruntime`` is not installed.
    """
    import importlib

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        module = importlib.import_module("mambaclinix.deploy.onnx")
    except ImportError as err:
        raise PackageError(
            "ONNX export and the onnx engine need onnx and onnxruntime: "
            f"pip install 'mambaclinix[onnx]' ({err})"
        ) from err
    return module
