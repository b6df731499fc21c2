"""MambaClinix: hierarchical gated convolution and Mamba U-Net for 3D medical image segmentation.

Importing the package (or ``from mambaclinix import MambaClinixUNet``) needs only PyTorch: Lightning,
TorchIO, numba and the optional CUDA kernels (``mamba_ssm``, ``causal_conv1d``) are imported lazily by
the parts that use them.

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

__all__ = [
    "MambaClinixDecoder",
    "MambaClinixEncoder",
    "MambaClinixUNet",
    "create_model",
    "list_models",
    "__version__",
]
