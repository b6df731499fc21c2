"""pytest-benchmark timings of the network-level hot paths (CPU, small sizes: the whole file takes well
under a minute on two cores).

Run with ``pytest benchmarks --benchmark-only``. Groups: the depthwise conv of hgConv (channels-last fast
path against ``nn.Conv3d``), the channel LayerNorm, a train step of the ``mambaclinix_tiny`` preset, and
Gaussian sliding-window inference over a volume with it. The machine and versions are in ``extra_info``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402

from mambaclinix.inference import sliding_window_inference  # noqa: E402
from mambaclinix.layers import LayerNormChannels  # noqa: E402
from mambaclinix.layers.hgconv import depthwise_conv  # noqa: E402
from mambaclinix.models import create_model  # noqa: E402


@pytest.mark.benchmark(group="depthwise Conv3d fwd+bwd B2 C24 32^3")
@pytest.mark.parametrize("impl", ["channels_last_fast_path", "nn.Conv3d"])
def test_depthwise_conv(benchmark, impl):
    conv = nn.Conv3d(24, 24, 3, padding=1, groups=24)
    x = torch.randn(2, 24, 32, 32, 32, requires_grad=True)
    benchmark.extra_info.update(machine_info(), impl=impl)
    fn = (lambda: depthwise_conv(x, conv)) if impl.startswith("channels") else (lambda: conv(x))

    def step():
        fn().sum().backward()

    step()
    benchmark(step)


@pytest.mark.benchmark(group="LayerNormChannels fwd+bwd B2 C32 32^3")
def test_channel_layernorm(benchmark):
    norm = LayerNormChannels(32)
    x = torch.randn(2, 32, 32, 32, 32, requires_grad=True)
    benchmark.extra_info.update(machine_info())

    def step():
        norm(x).sum().backward()

    step()
    benchmark(step)


@pytest.mark.benchmark(group="mambaclinix_tiny train step B2 32^3")
def test_tiny_train_step(benchmark):
    torch.manual_seed(0)
    model = create_model("mambaclinix_tiny", deep_supervision=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(2, 1, 32, 32, 32)
    y = torch.randint(0, 2, (2, 32, 32, 32))
    benchmark.extra_info.update(machine_info())

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    benchmark(step)


@pytest.mark.benchmark(group="sliding window, mambaclinix_tiny, 48^3 volume, roi 32^3")
@pytest.mark.parametrize("mirror", [False, True])
def test_sliding_window(benchmark, mirror):
    torch.manual_seed(0)
    model = create_model("mambaclinix_tiny", deep_supervision=False).eval()
    volume = torch.randn(1, 1, 48, 48, 48)
    benchmark.extra_info.update(machine_info(), windows=8, mirror=mirror)

    def run():
        with torch.inference_mode():
            return sliding_window_inference(
                volume,
                (32, 32, 32),
                4,
                model,
                overlap=0.5,
                mode="gaussian",
                mirror_axes=(0, 1, 2) if mirror else None,
            )

    run()
    benchmark(run)
