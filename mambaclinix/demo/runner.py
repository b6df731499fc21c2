"""The demo run: brain-MRI tissue segmentation on a dataset built offline from the MNI152 template.

:func:`run_demo` builds the dataset if needed (:func:`~mambaclinix.demo.build_demo_dataset`), trains the
CPU-sized preset with the packaged configuration ``mambaclinix/configs/demo_brain.yaml``, tests the best
checkpoint on the held-out subjects and returns Dice per tissue beside an intensity-only baseline
(k-means on the intensities inside the reference brain mask,
:func:`~mambaclinix.demo.kmeans_baseline_dice`) computed on the same subjects in the same run. The
command line is ``mambaclinix demo`` (and ``mambaclinix demo-data DIR`` for the dataset alone).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mambaclinix.demo.baseline import kmeans_baseline_dice
from mambaclinix.demo.dataset import build_demo_dataset

CONFIG = "demo_brain.yaml"


def config_path() -> Path:
    """Path of the packaged demo configuration."""
    return Path(str(resources.files("mambaclinix.configs").joinpath(CONFIG)))


@dataclass
class DemoResult:
    """Mean Dice per tissue of the trained network and of the k-means baseline, and the timings."""

    tissues: list[str]
    network: dict[str, float]
    baseline: dict[str, float]
    n_test: int
    train_seconds: float
    total_seconds: float

    def table(self) -> str:
        lines = [
            f"Dice per tissue on {self.n_test} held-out subjects "
            f"(training {self.train_seconds / 60:.1f} min, total {self.total_seconds / 60:.1f} min):",
            f"  {'tissue':8s} {'MambaClinix':>12s} {'k-means':>9s}",
        ]
        for t in self.tissues:
            lines.append(f"  {t:8s} {self.network[t]:12.3f} {self.baseline[t]:9.3f}")
        net_mean, base_mean = (
            sum(d[t] for t in self.tissues) / len(self.tissues) for d in (self.network, self.baseline)
        )
        lines.append(f"  {'mean':8s} {net_mean:12.3f} {base_mean:9.3f}")
        return "\n".join(lines)


def run_demo(data_dir: str | Path = "data/demo_brain", config: str | Path | None = None,
             overrides: Sequence[str] = ()) -> DemoResult:  # fmt: skip
    """Build the demo data (if missing), train, test the best checkpoint, and score the baseline.

    Args:
        data_dir: dataset folder; built there (default arguments) when it holds no ``dataset.json``.
        config: LightningCLI YAML (default: the packaged ``demo_brain.yaml``).
        overrides: extra LightningCLI arguments, e.g. ``["--trainer.max_epochs=2"]``.
    """
    from mambaclinix.training import lightning_cli  # imports Lightning: only when the demo runs

    t0 = time.perf_counter()
    data_dir = Path(data_dir)
    if not (data_dir / "dataset.json").is_file():
        data_dir = build_demo_dataset(data_dir)
    cli = lightning_cli(
        ["-c", str(config or config_path()), f"--data.data_dir={data_dir}", *overrides], run=False
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_s = time.perf_counter() - t0
    best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    summary = cli.model.test_summary
    tissues = list(cli.model.class_names)
    base = kmeans_baseline_dice(data_dir, split="test")
    return DemoResult(
        tissues=tissues,
        network={t: summary["mean"][f"dice_{t}"] for t in tissues},
        baseline={t: sum(v) / len(v) for t, v in base.items()},
        n_test=len(summary["cases"]),
        train_seconds=train_s,
        total_seconds=time.perf_counter() - t0,
    )
