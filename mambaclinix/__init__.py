"""MambaClinix: hierarchical gated convolution and Mamba U-Net for 3D medical image segmentation.

``from mambaclinix import MambaClinixUNet`` needs only PyTorch: Lightning, TorchIO, numba and the optional
CUDA kernels (``mamba_ssm``, ``causal_conv1d``) are imported lazily by the parts that use them.
``import mambaclinix`` alone imports nothing else, not even PyTorch: the names below are loaded from
:mod:`mambaclinix.models` on first access, so that ``mambaclinix --help`` starts at once.

Reference: Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for
Enhanced 3D Medical Image Segmentation", arXiv:2409.12533.
"""

import importlib

__version__ = "0.1.0"

# public name -> defining module, imported on first access
_LAZY = {
    "MambaClinixDecoder": "mambaclinix.models.decoder",
    "MambaClinixEncoder": "mambaclinix.models.encoder",
    "MambaClinixUNet": "mambaclinix.models.mambaclinix",
    "create_model": "mambaclinix.models.registry",
    "list_models": "mambaclinix.models.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mambaclinix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
