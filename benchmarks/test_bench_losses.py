"""pytest-benchmark timings of loss forward + backward on a small 2×4×32³ patch (CPU).

Run with ``pytest benchmarks --benchmark-only`` (the ``benchmarks`` folder is outside the default test
paths). MONAI's losses are timed beside ours when MONAI is installed. The machine and versions are in the
``extra_info`` of every benchmark.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from mambaclinix.losses import (  # noqa: E402
    DeepSupervisionLoss,
    DiceCELoss,
    DiceCETverskyLoss,
    RegionSpecificTverskyLoss,
    TverskyLoss,
)

SHAPE = (2, 4, 32, 32, 32)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).requires_grad_(True)
    y = torch.randint(0, SHAPE[1], (SHAPE[0], 1, *SHAPE[2:]), generator=g)
    return x, y


def _monai_losses():
    return pytest.importorskip("monai.losses")


def _run(benchmark, loss, x, y):
    benchmark.extra_info.update(machine_info(), shape=list(SHAPE), dtype=str(x.dtype), device=str(x.device))

    def step():
        x.grad = None
        out = loss(x, y)
        out.backward()
        return out

    out = benchmark(step)
    assert torch.isfinite(out)


CASES = {
    "ours_softdice_ce": lambda: DiceCETverskyLoss(lambda_trs=0.0),
    "ours_dicece_monai_compatible": lambda: DiceCELoss(
        softmax=True, to_onehot_y=True, include_background=False
    ),
    "ours_tversky": lambda: TverskyLoss(softmax=True, to_onehot_y=True, include_background=False),
    "ours_region_tversky": lambda: RegionSpecificTverskyLoss(),
    "ours_compound": lambda: DiceCETverskyLoss(),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bench_ours(benchmark, data, name):
    _run(benchmark, CASES[name](), *data)


def test_bench_ours_compound_deep_supervision(benchmark, data):
    x, y = data
    loss = DeepSupervisionLoss(DiceCETverskyLoss())
    benchmark.extra_info["outputs"] = [list(x[..., :: 2**i, :: 2**i, :: 2**i].shape) for i in range(4)]

    def step():
        x.grad = None
        xs = [x[..., :: 2**i, :: 2**i, :: 2**i] for i in range(4)]  # four scales from one leaf
        out = loss(xs, y)
        out.backward()
        return out

    assert torch.isfinite(benchmark(step))


def test_bench_monai_dicece(benchmark, data):
    monai_losses = _monai_losses()
    _run(benchmark, monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, include_background=False), *data)


def test_bench_monai_tversky(benchmark, data):
    monai_losses = _monai_losses()
    _run(benchmark, monai_losses.TverskyLoss(softmax=True, to_onehot_y=True, include_background=False), *data)
