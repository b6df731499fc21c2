"""pytest-benchmark timings of the hot paths of the Mamba stages (CPU).

Run with ``pytest benchmarks --benchmark-only``. Groups: the selective scan forward+backward per backend
(``B=2, E=640, N=16, L=512``), the residual Mamba layer and the HGCN block on small feature maps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from mambaclinix.layers import HGCNBlock, MambaLayer  # noqa: E402
from mambaclinix.ops import selective_scan  # noqa: E402


def _scan_inputs(L=512, batch=2, E=640, N=16):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(batch, E, L, generator=g), torch.randn(batch, E, L, generator=g) - 4.0,
          -torch.arange(1, N + 1.0).repeat(E, 1), torch.randn(batch, N, L, generator=g),
          torch.randn(batch, N, L, generator=g)]  # fmt: skip
    return [t.requires_grad_() for t in ts]


@pytest.mark.benchmark(group="selective_scan fwd+bwd B2 E640 N16 L512")
@pytest.mark.parametrize("backend", ["reference", "chunked", "numba"])
def test_scan(benchmark, backend):
    inputs = _scan_inputs()
    benchmark.extra_info.update(machine_info(), backend=backend)

    def step():
        y = selective_scan(*inputs, delta_softplus=True, backend=backend)
        y.backward(torch.ones_like(y))

    step()  # compile outside the timing
    benchmark(step)


@pytest.mark.benchmark(group="MambaLayer fwd+bwd B2 C64 16^3")
@pytest.mark.parametrize("backend", ["chunked", "numba"])
def test_mamba_layer(benchmark, backend):
    layer = MambaLayer(64, scan_backend=backend)
    x = torch.randn(2, 64, 16, 16, 16, requires_grad=True)
    benchmark.extra_info.update(machine_info(), backend=backend)

    def step():
        layer(x).sum().backward()

    step()
    benchmark(step)


@pytest.mark.benchmark(group="HGCNBlock fwd+bwd B2 C32 32^3")
@pytest.mark.parametrize("gating", ["add", "mul"])
def test_hgcn_block(benchmark, gating):
    block = HGCNBlock(32, order=2, gating=gating)
    x = torch.randn(2, 32, 32, 32, 32, requires_grad=True)
    benchmark.extra_info.update(machine_info(), gating=gating)

    def step():
        block(x).sum().backward()

    step()
    benchmark(step)
