"""MambaClinix: hierarchical gated convolution and Mamba U-Net for 3D medical image segmentation.

Importing the package (or ``from mambaclinix import MambaClinixUNet``) needs only PyTorch: Lightning,
TorchIO, numba and the optional CUDA kernels (``mamba_ssm``, ``causal_conv1d``) are imported lazily by
the parts that use them. ``load_model`` and ``Predictor`` (:mod:`mambaclinix.deploy`: predict with a
model package written by ``mambaclinix export``) are loaded on first access.

Reference: Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for
Enhanced 3D Medical Image Segmentation", arXiv:2409.12533.
"""

from mambaclinix.models import (
    MambaClinixDecoder,
    MambaClinixEncoder,
    MambaClinixUNet,
    create_model,
    list_models,
)

__version__ = "0.1.0"

_LAZY = {"load_model": "mambaclinix.deploy.predictor", "Predictor": "mambaclinix.deploy.predictor"}

__all__ = [
    "MambaClinixDecoder",
    "MambaClinixEncoder",
    "MambaClinixUNet",
    "create_model",
    "list_models",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mambaclinix' has no attribute {name!r}")
