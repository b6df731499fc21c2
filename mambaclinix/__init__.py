"""MambaClinix: hierarchical gated convolution and Mamba U-Net for 3D medical image segmentation.

``from mambaclinix import MambaClinixUNet`` needs only PyTorch: Lightning, TorchIO, numba and the optional
CUDA kernels (``mamba_ssm``, ``causal_conv1d``) are imported lazily by the parts that use them.
``import mambaclinix`` alone imports nothing else, not even PyTorch: the names below are loaded on first
access, so that ``mambaclinix --help`` starts at once. ``load_model`` and ``Predictor``
(:mod:`mambaclinix.deploy`) predict with a model package written by ``mambaclinix export``.

Reference: Bian et al., "MambaClinix: Hierarchical Gated Convolution and Mamba-Based U-Net for
Enhanced 3D Medical Image Segmentation", arXiv:2409.12533.
"""

from mambaclinix.utils.lazy import lazy_attributes

__version__ = "0.1.0"

# public name -> defining module, imported on first access
_LAZY = {
    "MambaClinixDecoder": "mambaclinix.models.decoder",
    "MambaClinixEncoder": "mambaclinix.models.encoder",
    "MambaClinixUNet": "mambaclinix.models.mambaclinix",
    "create_model": "mambaclinix.models.registry",
    "list_models": "mambaclinix.models.registry",
    "load_model": "mambaclinix.deploy.predictor",
    "Predictor": "mambaclinix.deploy.predictor",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
