"""Channel LayerNorm for channels-first tensors of any spatial dimensionality."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LayerNormChannels"]


class LayerNormChannels(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor.

    Every voxel is normalised over its ``C`` channels (biased variance), then a per-channel affine
    ``weight * x + bias`` is applied. This is the "channel LayerNorm" of the HGCN block and of the junction
    before the last HGCN stage (MambaClinix §3.2), i.e. ``F.layer_norm`` on the tensor permuted
    to channels-last. On the CPU it is computed exactly so (permute, fused ``layer_norm``, permute back to a
    contiguous tensor; float32 under autocast, like ``nn.LayerNorm``); on other devices by the mean and
    variance formula in the input's dtype.

    Args:
        num_channels: Number of channels ``C``.
        eps: Added to the variance before the square root.
        affine: Learn the per-channel ``weight`` (init 1) and ``bias`` (init 0).

    Shape:
        Input and output: ``(B, C, *spatial)`` with any number of spatial axes (also ``(B, C)``).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.num_channels = num_channels
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected input (B, {self.num_channels}, *spatial), got shape {tuple(x.shape)}")
        if x.device.type == "cpu":
            # CPU: one fused layer_norm over the channels moved last, then back to a contiguous
            # channels-first tensor; the two copies cost less than the element-wise passes (and their
            # backward) of the formula below (2-3× faster for fwd+bwd at 16-128 channels).
            y = F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
            return y.movedim(-1, 1).contiguous()
        # Other devices: the formula, as element-wise kernels. The fused path is slow on GPUs for rows of
        # so few values: 12 ms fwd+bwd at 2×16×128³ on an H200, more than the 3×3×3 conv beside it.
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            view = (1, -1) + (1,) * (x.dim() - 2)
            x = x * self.weight.view(view) + self.bias.view(view)
        return x

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"
