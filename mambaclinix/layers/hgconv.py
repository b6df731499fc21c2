"""Hierarchical gated convolution (hgConv) and the HGCN block of the shallow encoder stages.

hgConv descends from HorNet's recursive gated convolution gnConv (Rao et al., NeurIPS 2022); MambaClinix
(§3.2, Fig. 2) lifts it to 3D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mambaclinix.layers.blocks import ActFactory, get_act_layer, make_conv, pointwise_conv, to_tuple
from mambaclinix.layers.drop import DropPath
from mambaclinix.layers.norm import LayerNormChannels

__all__ = ["GATINGS", "HgConv", "HGCNBlock", "hgconv_widths"]

GATINGS = ("add", "mul")


def hgconv_widths(channels: int, order: int) -> tuple[int, ...]:
    """Widths ``c_k = channels / 2**(order - 1 - k)``, k = 0..order-1 (smallest first).

    Raises:
        ValueError: ``order < 1`` or ``channels`` not divisible by ``2**(order - 1)``.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    if channels < 1 or channels % 2 ** (order - 1):
        raise ValueError(
            f"hgConv of order {order} needs channels divisible by 2**(order-1) = {2 ** (order - 1)}, "
            f"got channels={channels}"
        )
    return tuple(channels // 2 ** (order - 1 - k) for k in range(order))


class _DepthwiseConv3dChannelsLast(torch.autograd.Function):
    """Stride-1 "same" depthwise Conv3d computed in channels-last layout, with a hand-written backward.

    oneDNN's depthwise 3D convolution on channels-first CPU tensors is pathologically slow, its weight
    gradient above all (about 40× slower than this at 24 channels × 64³). Here the forward and the input
    gradient (a depthwise conv with the flipped kernel) run on channels-last copies, and the weight
    gradient is oneDNN's channels-last ``convolution_backward``; the result is returned channels-first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        ctx.save_for_backward(x_cl, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv3d(x_cl, weight, bias, padding=padding, groups=weight.shape[0]).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x_cl, weight = ctx.saved_tensors
        groups, pad = weight.shape[0], list(ctx.padding)
        g_cl = grad.contiguous(memory_format=torch.channels_last_3d)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(g_cl, weight.flip(2, 3, 4), None, padding=ctx.padding, groups=groups)
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                g_cl, x_cl, weight, None, [1, 1, 1], pad, [1, 1, 1], False, [0, 0, 0], groups,
                [False, True, False],
            )[1]  # fmt: skip
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None


def depthwise_conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv(x)`` for a stride-1, "same"-padded depthwise ``conv``; on the CPU, 3D and in float32/64
    outside autocast it runs through the channels-last path above (same numbers up to float rounding)."""
    fast = (
        x.device.type == "cpu"
        and isinstance(conv, nn.Conv3d)
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and conv.stride == (1, 1, 1)
        and conv.dilation == (1, 1, 1)
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.padding_mode == "zeros"
        and tuple(conv.padding) == tuple(k // 2 for k in conv.kernel_size)
    )
    if not fast:
        return conv(x)
    return _DepthwiseConv3dChannelsLast.apply(x, conv.weight, conv.bias, tuple(conv.padding))


class HgConv(nn.Module):
    """hgConv of order ``n``: recursive gating of depthwise-conv features (MambaClinix §3.2).

    1. ``[P0, Q] = proj_in(x)`` (1×1 conv C → 2C), ``P0`` has ``c_0`` channels, ``Q`` the other ``Σ c_k``.
    2. ``Q = scale · dwconv(Q)`` (one depthwise conv, "same" padding, bias), split into ``Q_0..Q_{n-1}``.
    3. ``U_0 = P0 ∘ Q_0``; ``U_{k+1} = pws[k](U_k) ∘ Q_{k+1}`` with 1×1 convs ``c_k → c_{k+1}``.
    4. ``proj_out(U_{n-1})`` (1×1 conv C → C).

    ``∘`` is addition for ``gating="add"`` (the authors' code and figure, the paper default) or
    multiplication for ``gating="mul"`` (HorNet's gnConv, which also used ``kernel_size=7`` and
    ``scale=1/3``; only multiplication yields true high-order interactions).

    Args:
        channels: Channels ``C`` (``C'`` of the HGCN block); divisible by ``2**(order - 1)``.
        order: Interaction order ``n >= 1``.
        spatial_dims: 3 or 2.
        kernel_size: Odd depthwise kernel, an int or one per axis (e.g. ``(1, 3, 3)``).
        scale: Factor applied to the depthwise-conv output.
        gating: ``"add"`` or ``"mul"``.

    Shape:
        ``(B, C, *S)`` → ``(B, C, *S)``.
    """

    def __init__(
        self,
        channels: int,
        order: int = 2,
        spatial_dims: int = 3,
        kernel_size: int | Sequence[int] = 3,
        scale: float = 1.0,
        gating: str = "add",
    ) -> None:
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        self.widths = hgconv_widths(channels, order)
        self.order = order
        self.gating = gating
        self.scale = float(scale)
        kernel = to_tuple(kernel_size, spatial_dims, "kernel_size")
        q = sum(self.widths)
        self.proj_in = make_conv(spatial_dims, channels, 2 * channels, 1)
        self.dwconv = make_conv(spatial_dims, q, q, kernel, groups=q)
        self.pws = nn.ModuleList(
            make_conv(spatial_dims, self.widths[k], self.widths[k + 1], 1) for k in range(order - 1)
        )
        self.proj_out = make_conv(spatial_dims, channels, channels, 1)

    def _gate(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.gating == "add" else a * b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(pointwise_conv(x, self.proj_in), (self.widths[0], sum(self.widths)), dim=1)
        qs = torch.split(depthwise_conv(q, self.dwconv) * self.scale, self.widths, dim=1)
        u = self._gate(p, qs[0])
        for k, pw in enumerate(self.pws):
            u = self._gate(pointwise_conv(u, pw), qs[k + 1])
        return pointwise_conv(u, self.proj_out)

    def extra_repr(self) -> str:
        return f"order={self.order}, widths={self.widths}, gating={self.gating!r}, scale={self.scale:g}"


class HGCNBlock(nn.Module):
    """HGCN block of the shallow encoder stages (MambaClinix §3.2, Fig. 2).

    With input ``X0`` (``C0`` channels) and ``C' = C0 / 2``::

        Z  = reduce(X0)                                   # 1×1 conv C0 → C', no norm/act
        Z' = Z + DropPath(gamma ⊙ hgconv(norm1(Z)))       # gamma: layer scale, init 1e-6
        O  = conv_b(act(conv_a(norm2(Z'))))               # k×k×k convs C' → C0 → C0, no norms
        Y  = X0 + DropPath(O)                             # then act(Y) if final_act (the figure)

    Args:
        channels: Channels ``C0`` (even; ``C0 / 2`` divisible by ``2**(order - 1)``).
        spatial_dims: 3 or 2.
        order: hgConv interaction order (the U-Net uses ``stage + 2``).
        kernel_size: Odd kernel of ``conv_a`` / ``conv_b`` (the stage kernel).
        drop_path: Stochastic-depth rate of both residual branches.
        layer_scale_init: Initial value of ``gamma``; ``None`` disables the layer scale.
        gating: hgConv combination, ``"add"`` (paper default) or ``"mul"`` (HorNet).
        hgconv_kernel_size: Depthwise kernel of the hgConv; default ``kernel_size``.
        hgconv_scale: Scale of the hgConv depthwise output (HorNet: 1/3 with a 7-wide kernel).
        final_act: Apply ``act`` to the block output, as Fig. 2 draws (the code does not; default off).
        norm_eps: Epsilon of the two channel LayerNorms.
        act_layer: ``() -> module``; default LeakyReLU(0.01).

    Shape:
        ``(B, C0, *S)`` → ``(B, C0, *S)``.
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int = 3,
        order: int = 2,
        kernel_size: int | Sequence[int] = 3,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
        gating: str = "add",
        hgconv_kernel_size: int | Sequence[int] | None = None,
        hgconv_scale: float = 1.0,
        final_act: bool = False,
        norm_eps: float = 1e-6,
        act_layer: ActFactory | None = None,
    ) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(f"HGCNBlock needs an even number of channels, got channels={channels}")
        act_layer = act_layer or get_act_layer()
        inner = channels // 2
        self.reduce = make_conv(spatial_dims, channels, inner, 1)
        self.norm1 = LayerNormChannels(inner, eps=norm_eps)
        self.hgconv = HgConv(
            inner,
            order=order,
            spatial_dims=spatial_dims,
            kernel_size=kernel_size if hgconv_kernel_size is None else hgconv_kernel_size,
            scale=hgconv_scale,
            gating=gating,
        )
        if layer_scale_init is None:
            self.register_parameter("gamma", None)
        else:
            self.gamma = nn.Parameter(torch.full((inner,), float(layer_scale_init)))
        self.norm2 = LayerNormChannels(inner, eps=norm_eps)
        self.conv_a = make_conv(spatial_dims, inner, channels, kernel_size)
        self.act = act_layer()
        self.conv_b = make_conv(spatial_dims, channels, channels, kernel_size)
        self.drop_path = DropPath(drop_path)
        self.final_act = act_layer() if final_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = pointwise_conv(x, self.reduce)
        h = self.hgconv(self.norm1(z))
        if self.gamma is not None:
            h = h * self.gamma.view((1, -1) + (1,) * (h.dim() - 2))
        z = z + self.drop_path(h)
        out = self.conv_b(self.act(self.conv_a(self.norm2(z))))
        return self.final_act(x + self.drop_path(out))
