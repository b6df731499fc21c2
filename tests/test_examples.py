"""The example scripts run, at small sizes, and do what their docstrings say.

Every ``examples/*.py`` must appear in ``SCRIPTS`` (a new script without an entry fails the first test);
the configurations in ``examples/configs`` are parsed by ``tests/test_training.py``.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = {
    "custom_network.py": ["--steps", "8", "--size", "16", "--width", "4", "--lr", "1e-2"],
    "forward_backward.py": ["--preset", "mambaclinix_tiny", "--size", "16", "--batch", "2"],
    "deploy_model.py": ["--steps", "2", "--cases", "3", "--size", "24"],
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_script_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


def test_custom_network_learns_the_synthetic_task(capsys):
    module = _load("custom_network.py")
    with torch.random.fork_rng(devices=[]):
        result = module.main(SCRIPTS["custom_network.py"])
    assert all(math.isfinite(v) for v in result.values())
    # 8 Adam steps on a ball-in-noise task: the loss must drop and the held-out Dice rise clearly.
    assert result["last_loss"] < result["first_loss"] - 0.3, result
    assert result["dice_after"] > result["dice_before"] + 0.2, result
    assert "foreground Dice on held-out volumes" in capsys.readouterr().out


def test_custom_network_decoder_over_another_backbone_learns(capsys):
    module = _load("custom_network.py")
    with torch.random.fork_rng(devices=[]):
        result = module.main(["--network", "backbone", *SCRIPTS["custom_network.py"]])
    assert result["last_loss"] < result["first_loss"] - 0.3, result
    assert result["dice_after"] > result["dice_before"] + 0.2, result
    assert "foreground Dice on held-out volumes" in capsys.readouterr().out


def test_custom_network_parts_shapes_and_gradients():
    module = _load("custom_network.py")
    x = torch.randn(2, 2, 8, 12, 16)
    seg = module.BackboneUNet(in_channels=2, num_classes=3, width=4)
    assert [tuple(f.shape) for f in seg.backbone(x)] == [(2, 4, 8, 12, 16), (2, 8, 4, 6, 8), (2, 16, 2, 3, 4)]
    assert seg(x).shape == (2, 3, 8, 12, 16)
    clf = module.EncoderClassifier(in_channels=2, num_classes=5, width=4)
    assert clf.encoder.stage_layer_types == ("hgcn", "hgcn", "mamba")
    assert clf(x).shape == (2, 5)
    for net in (seg, clf):
        net(x).square().mean().backward()
    # without deep supervision the decoder's coarser heads (kept for the parameter layout) are not used
    unused = {f"decoder.heads.1.{name}" for name in ("weight", "bias")}
    for name, p in [*seg.named_parameters(), *clf.named_parameters()]:
        assert (p.grad is None) == (name in unused), name
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_custom_network_shapes_and_gradients():
    module = _load("custom_network.py")
    net = module.TinyHybridUNet(in_channels=2, num_classes=3, width=4)
    x = torch.randn(1, 2, 8, 12, 16)
    out = net(x)
    assert out.shape == (1, 3, 8, 12, 16)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    image, label = module.synthetic_batch(2, 16, torch.Generator().manual_seed(0))
    assert image.shape == (2, 1, 16, 16, 16) and label.shape == (2, 16, 16, 16)
    assert set(label.unique().tolist()) == {0, 1}
    # the intensity of the ball is 1 above the background on average
    assert 0.7 < float(image[:, 0][label == 1].mean() - image[:, 0][label == 0].mean()) < 1.3


def test_forward_backward_script_runs():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "forward_backward.py"), *SCRIPTS["forward_backward.py"]],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "input        : (2, 1, 16, 16, 16) float32" in out
    assert "output[0]    : (2, 2, 16, 16, 16)" in out
    assert re.search(r"parameters without a finite gradient: 0$", out, re.MULTILINE), out
    params = int(re.search(r"mambaclinix_tiny, ([\d,]+) parameters", out).group(1).replace(",", ""))
    from mambaclinix import create_model

    assert params == sum(p.numel() for p in create_model("mambaclinix_tiny").parameters())


@pytest.mark.slow
def test_deploy_model_script_predicts_from_the_package_alone(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "deploy_model.py"), "--workdir", str(tmp_path / "w"),
         *SCRIPTS["deploy_model.py"]],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "w" / "data").exists()  # predicted without the training data
    for name in ("scan_a", "scan_b"):
        value = float(re.search(rf"{name}: Dice of the ball ([\d.]+)", proc.stdout).group(1))
        assert 0.0 <= value <= 1.0
    assert (tmp_path / "w" / "segmentations" / "scan_a.nii.gz").is_file()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_example_has_usage_in_its_docstring(name):
    module = _load(name)
    assert module.__doc__ and f"python examples/{name}" in module.__doc__
