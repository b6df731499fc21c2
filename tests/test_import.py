"""Import hygiene: the model needs only PyTorch (STYLE.md habits 1 and 4), checked in fresh interpreters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "pytorch_lightning", "torchio", "mamba_ssm", "causal_conv1d", "numba")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_import_does_not_pull_heavy_packages():
    proc = _run(
        f"""
        import sys
        import mambaclinix
        from mambaclinix import MambaClinixUNet
        assert MambaClinixUNet.__module__ == "mambaclinix.models.mambaclinix"
        loaded = sorted(m for m in {HEAVY!r} if m in sys.modules)
        assert not loaded, f"importing mambaclinix loaded {{loaded}}"
        print("clean")
        """
    )
    assert proc.stdout.strip() == "clean"


def test_model_runs_without_cuda_kernels():
    proc = _run(
        """
        import importlib.abc
        import sys

        BLOCKED = {"mamba_ssm", "causal_conv1d", "selective_scan_cuda"}

        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{name} blocked by the test")
                return None

        sys.meta_path.insert(0, Blocker())
        for name in ("mamba_ssm", "causal_conv1d"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise AssertionError(f"{name} was not blocked")

        import torch
        from mambaclinix import create_model

        torch.manual_seed(0)
        model = create_model("mambaclinix_tiny")
        out = model(torch.randn(1, 1, 8, 8, 16))
        assert [tuple(o.shape) for o in out] == [(1, 2, 8, 8, 16), (1, 2, 4, 4, 8), (1, 2, 2, 2, 4)]
        assert all(torch.isfinite(o).all() for o in out)
        sum(o.mean() for o in out).backward()
        assert all(p.grad is not None for p in model.parameters())
        assert not any(m in sys.modules for m in BLOCKED)
        print("ran")
        """
    )
    assert proc.stdout.strip().endswith("ran")
