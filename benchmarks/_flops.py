"""Counting multiply-accumulates of a forward pass, without running it, plus the selective scan by hand.

What is counted, and how:

- ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (shapes only: a 48 M-parameter model
  at 2×1×128³ costs well under a second and no memory). It counts 2 FLOPs per multiply-accumulate of
  ``aten.convolution`` (dense, grouped and depthwise alike, transposed included; the causal conv1d of the
  Mamba block is one) and of the matrix products ``mm``, ``addmm``, ``bmm``, ``baddbmm`` and scaled
  dot-product attention. It does **not** count normalisation, activations, pooling, interpolation,
  softmax or any other element-wise op, nor bias additions; those are memory-bound and add a few percent
  of FLOPs at most, but their time is real (see the per-block profile in ``docs/benchmarks.md``).
- The selective scan is no matmul, so the counter misses it. During counting the scan is replaced by a
  shape-only stand-in (element-wise, hence uncounted) and added analytically: 9 FLOPs per
  (batch, token, channel, state) element, mamba-ssm's own estimate (state decay ``exp(Δ·A)``, input
  ``Δ·B·x``, the update ``h = a·h + b`` and the readout ``C·h``), i.e. 4.5 MACs.

MACs = FLOPs / 2 throughout; the tables say which is which.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from unittest import mock

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

SCAN_FLOPS_PER_ELEMENT = 9

_CONV_OPS = {"convolution", "_convolution", "convolution_backward"}
_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm"}


def _category(op) -> str:
    name = str(op).split(".")[1] if "." in str(op) else str(op)
    if name in _CONV_OPS:
        return "conv"
    if name in _MATMUL_OPS:
        return "matmul"
    if "attention" in name:
        return "attention"
    return "other"


@contextlib.contextmanager
def _scan_stub(counter: list[int]):
    """Replace the Mamba layers' selective scan by an element-wise stand-in that records B·L·E·N."""

    def stub(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kwargs):
        counter.append(u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1])
        y = u * delta
        return y * z if z is not None else y

    with mock.patch("mambaclinix.layers.mamba.selective_scan", stub):
        yield


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under ``torch.device("meta")``, or on the CPU and then moved to meta if the constructor
    reads tensor values (e.g. MONAI's SwinUNETR calls ``.item()``)."""
    try:
        with torch.device("meta"):
            return build()
    except RuntimeError:
        return build().to("meta")


def count_macs(
    build: Callable[[], nn.Module],
    input_shape: Sequence[int],
    backward: bool = False,
) -> dict[str, float]:
    """MACs of one forward (and optionally backward) pass of ``build()`` on an input of ``input_shape``.

    Args:
        build: Zero-argument constructor of the model; called under ``torch.device("meta")`` (or on the
            CPU and moved to meta if its constructor reads tensor values).
        input_shape: ``(B, C, D, H, W)``.
        backward: Also count the backward of ``output.sum()`` (FlopCounterMode counts the convolution
            and matmul gradients; the scan's backward is added as twice its forward, as mamba-ssm does).

    Returns:
        ``{"conv", "matmul", "attention", "other", "scan", "total"}`` in MACs (floats).
    """
    model = build_on_meta(build)
    x = torch.empty(tuple(input_shape), device="meta", requires_grad=backward)
    scan_elems: list[int] = []
    flops = FlopCounterMode(display=False)
    with _scan_stub(scan_elems), flops:
        out = model(x)
        if backward:
            out = out[0] if isinstance(out, (list, tuple)) else out
            out.sum().backward()
    macs = {"conv": 0.0, "matmul": 0.0, "attention": 0.0, "other": 0.0}
    for op, n in flops.get_flop_counts().get("Global", {}).items():
        macs[_category(op)] += n / 2
    scan = SCAN_FLOPS_PER_ELEMENT * sum(scan_elems) / 2
    macs["scan"] = scan * (3 if backward else 1)
    macs["total"] = sum(macs.values())
    return macs


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
