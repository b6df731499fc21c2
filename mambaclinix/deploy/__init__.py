"""Share and deploy a trained model: model packages, prediction from a package, ONNX export.

* :func:`~mambaclinix.deploy.package.export_package` (``mambaclinix export``) writes a model package from
  training checkpoints: safetensors weights and ``model.json`` (:mod:`mambaclinix.deploy.metadata`).
* :func:`~mambaclinix.deploy.package.read_package` opens one safely (nothing is unpickled);
  :func:`~mambaclinix.deploy.predictor.load_model` returns its network and
  :class:`~mambaclinix.deploy.predictor.Predictor` segments images with it (``mambaclinix predict -i -o -m``).

The names are loaded on first access, so that the training module can import
:mod:`mambaclinix.deploy.checkpoint` without the rest.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ModelPackage": "mambaclinix.deploy.package",
    "PackageError": "mambaclinix.deploy.metadata",
    "Predictor": "mambaclinix.deploy.predictor",
    "build_network": "mambaclinix.deploy.package",
    "export_package": "mambaclinix.deploy.package",
    "load_model": "mambaclinix.deploy.predictor",
    "read_package": "mambaclinix.deploy.package",
}

__all__ = [*_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mambaclinix.deploy' has no attribute {name!r}")
