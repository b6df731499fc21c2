"""Mamba (v1) block and the residual Mamba layer for 3D feature maps (MambaClinix §3.2; Gu & Dao 2023).

:class:`Mamba` has the parameter names and shapes of ``mamba_ssm.Mamba`` (``in_proj``, ``conv1d``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``), so state dicts load both ways. It runs on any
device: the selective scan and the causal conv1d go through :mod:`mambaclinix.ops`, which use the
``mamba_ssm``/``causal_conv1d`` CUDA kernels only when they are installed and the tensors are on a GPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.ops.causal_conv1d import causal_conv1d
from mambaclinix.ops.selective_scan import selective_scan

__all__ = ["SCAN_ORDERS", "Mamba", "MambaLayer"]

SCAN_ORDERS = ("C", "F")
"""Token orders of :class:`MambaLayer`: ``"C"`` row-major (last spatial axis fastest), ``"F"`` column-major
(first spatial axis fastest), named as NumPy's ``order`` argument."""


class Mamba(nn.Module):
    """Selective state-space block (Gu & Dao, 2023), the v1 ``Mamba`` of ``mamba_ssm``.

    ``[x, z] = in_proj(u)``; ``x = SiLU(causal_conv1d(x))``; ``[δ, B, C] = x_proj(x)``;
    ``Δ = softplus(dt_proj(δ))``; ``y = S6(x; Δ, A, B, C) + D·x``; ``out = out_proj(y · SiLU(z))``.

    Args:
        d_model: token width ``C``.
        d_state: state size ``N`` per channel.
        d_conv: causal conv1d width.
        expand: inner width ``E = expand · d_model``.
        dt_rank: rank ``R`` of the Δ projection; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min: smallest initial Δ. The Δ initialisation is that of ``mamba_ssm``: the ``dt_proj`` bias
            is the inverse softplus of a log-uniform Δ in ``[dt_min, dt_max]``, floored at ``dt_init_floor``.
        dt_max: largest initial Δ.
        dt_init: ``dt_proj`` weight initialisation: ``"random"`` (uniform in ``±dt_scale / sqrt(dt_rank)``)
            or ``"constant"`` (every weight ``dt_scale / sqrt(dt_rank)``).
        dt_scale: scale of the ``dt_proj`` weight initialisation.
        dt_init_floor: floor of the initial Δ.
        conv_bias: bias of the conv1d.
        bias: bias of ``in_proj``/``out_proj``.
        scan_backend: selective-scan backend (``None`` = process default; see
            :mod:`mambaclinix.ops.backend`).
        conv_backend: causal-conv1d backend (``None``/``"auto"``, ``"torch"``, ``"cuda"``).

    Shapes:
        ``(B, L, d_model) -> (B, L, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str | None = None,
        conv_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.scan_backend, self.conv_backend = scan_backend, conv_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **fk)  # fmt: skip
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(
            torch.rand(self.d_inner, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"Mamba expects (batch, length, d_model={self.d_model}), got {tuple(hidden_states.shape)}"
            )
        batch, length, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", self.conv_backend)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, E, L); bias added inside the scan
        A = -torch.exp(_fp32_or_wider(self.A_log))
        y = selective_scan(
            x, dt, A, B.transpose(1, 2), C.transpose(1, 2), _fp32_or_wider(self.D), z=z,
            delta_bias=_fp32_or_wider(self.dt_proj.bias), delta_softplus=True, backend=self.scan_backend,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2))


def _fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _no_autocast(device_type: str):
    if device_type in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class MambaLayer(nn.Module):
    """Residual Mamba layer for 3D feature maps (MambaClinix §3.2).

    ``X0 (B, C, D, H, W)`` is flattened to ``L = D·H·W`` tokens and ``Y = Linear(LN(Mamba(LN(tokens))))``
    with one shared LayerNorm, reshaped back and added to ``X0``. The layer always computes in float32
    (float64 stays float64), also under autocast (the scan is unstable in half precision), and returns its
    input's dtype.

    **Scan order.** The scan is causal, so the order of the tokens matters. ``scan_order="C"`` (default)
    flattens row-major, the last array axis fastest: token ``t`` of a ``(D, H, W)`` map is voxel
    ``(t // (H·W), (t // W) % H, t % W)``. ``scan_order="F"`` flattens with the first array axis fastest:
    voxel ``(t % D, (t // D) % H, t // (D·H))``. The authors' arrays are SimpleITK's ``(z, y, x)`` and
    their layer flattens row-major, so physically **x is the fastest axis**; on TorchIO's ``(x, y, z)``
    arrays (this library's data pipeline) ``"F"`` scans the same physical voxels in the same order.
    :class:`~mambaclinix.training.SegmentationModule` chooses the order from its ``array_axes``
    (``docs/architecture.md``, "Axis order"). The order has no parameters: a state dict loads either way.

    Args:
        dim: channels ``C``.
        d_state: state size ``N`` per channel, passed to :class:`Mamba`.
        d_conv: causal conv1d width, passed to :class:`Mamba`.
        expand: inner width factor, passed to :class:`Mamba`.
        dt_rank: rank of the Δ projection (``"auto"``: ``ceil(dim / 16)``), passed to :class:`Mamba`.
        scan_backend: selective-scan backend (``None`` = process default).
        conv_backend: causal-conv1d backend.
        scan_order: ``"C"`` (last array axis fastest) or ``"F"`` (first array axis fastest); see above.

    Shapes:
        ``(B, C, *spatial) -> (B, C, *spatial)`` (any number of spatial dimensions).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        scan_backend: str | None = None,
        conv_backend: str | None = None,
        scan_order: str = "C",
    ) -> None:
        super().__init__()
        if scan_order not in SCAN_ORDERS:
            raise ValueError(
                f"scan_order must be 'C' (last array axis fastest) or 'F' (first array axis fastest), "
                f"got {scan_order!r}"
            )
        self.dim = dim
        self.scan_order = scan_order
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
                           scan_backend=scan_backend, conv_backend=conv_backend)  # fmt: skip
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.dim:
            raise ValueError(
                f"MambaLayer expects (batch, channels={self.dim}, *spatial), got {tuple(x.shape)}"
            )
        with _no_autocast(x.device.type):
            out = self.residual(_fp32_or_wider(x))
        return out.to(x.dtype)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``x + proj(norm(mamba(norm(tokens(x)))))`` for a float32/64 ``x``, without the autocast guard
        and the checks of :meth:`forward` (the ONNX export traces this)."""
        # "F": reversing the spatial axes makes the first one the fastest of a row-major flatten
        reverse = (0, 1, *range(x.dim() - 1, 1, -1))
        grid = x.permute(reverse) if self.scan_order == "F" else x
        tokens = grid.flatten(2).transpose(1, 2)  # (B, L, C)
        y = self.proj(self.norm(self.mamba(self.norm(tokens))))
        y = y.transpose(1, 2).reshape(grid.shape)
        # x first: the sum takes its (contiguous) layout, not the token-major one of y.
        return x + (y.permute(reverse) if self.scan_order == "F" else y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scan_order={self.scan_order!r}"
