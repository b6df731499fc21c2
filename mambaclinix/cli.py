"""Command line interface.

``mambaclinix fit|validate|test|predict -c CONFIG.yaml [--section.option value ...]`` is Lightning's
``LightningCLI`` (:func:`mambaclinix.training.lightning_cli`, re-exported here) over
:class:`~mambaclinix.training.SegmentationModule` and :class:`~mambaclinix.data.SegmentationDataModule`;
the data module's channel count, class count, class names and patch size are linked into the model.
``--ckpt_path last`` resumes or evaluates the last checkpoint. Every Trainer gets a
:class:`~mambaclinix.training.NonFiniteGuard` (skips steps with NaN/inf losses or gradients, stops after 5
in a row) unless ``trainer.callbacks`` lists one with other settings. ``mambaclinix demo-data DIR`` builds
the embedded brain-MRI dataset and ``mambaclinix demo`` runs the whole demo (data, training, test, Dice
per tissue against an intensity-only baseline); both import :mod:`mambaclinix.demo` when they run.
``mambaclinix plan DATA_DIR`` fingerprints a dataset and writes its plan and a ready config
(``docs/planning.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

# The LightningCLI lives in the training layer; its names stay importable from here.
from mambaclinix.training.lightning_cli import (
    PARSER_DEFAULTS,
    SUBCOMMANDS,
    TRAINER_DEFAULTS,
    MambaClinixCLI,
    lightning_cli,
)

__all__ = [
    "PARSER_DEFAULTS",
    "SUBCOMMANDS",
    "TRAINER_DEFAULTS",
    "MambaClinixCLI",
    "demo_data_main",
    "demo_main",
    "lightning_cli",
    "main",
    "plan_main",
]


def demo_data_main(argv: Sequence[str]) -> None:
    """``mambaclinix demo-data DIR``: build the demo brain-MRI dataset."""
    p = argparse.ArgumentParser(prog="mambaclinix demo-data", description="Build the demo brain-MRI dataset.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-test", type=int, default=3)
    p.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mambaclinix.demo import build_demo_dataset

    path = build_demo_dataset(a.out_dir, n_train=a.n_train, n_test=a.n_test, spacing=a.spacing, seed=a.seed,
                              overwrite=a.overwrite)  # fmt: skip
    print(f"demo dataset ready: {path}")


def demo_main(argv: Sequence[str]) -> None:
    """``mambaclinix demo``: data, training, test and the Dice table against the k-means baseline."""
    from mambaclinix.demo import run_demo

    p = argparse.ArgumentParser(
        prog="mambaclinix demo",
        description="Train and test the CPU-sized preset on the demo brain-MRI dataset (built if missing); "
        "print Dice per tissue beside a k-means baseline. Extra arguments go to LightningCLI, "
        "e.g. --trainer.max_epochs=2.",
    )
    p.add_argument("--data", type=Path, default=Path("data/demo_brain"), help="dataset folder")
    p.add_argument("--config", type=Path, default=None, help="LightningCLI YAML (default: the packaged one)")
    a, overrides = p.parse_known_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_demo(a.data, a.config, overrides)
    print()
    print(result.table())


def plan_main(argv: Sequence[str]) -> None:
    """``mambaclinix plan DATA_DIR``: fingerprint a dataset, write its plan and a LightningCLI config."""
    from mambaclinix.planning.planner import ACCELERATORS, plan_dataset, write_plan

    p = argparse.ArgumentParser(
        prog="mambaclinix plan",
        description="Fingerprint a dataset and plan spacing, patch, batch and network for a memory budget; "
        "write OUT/plan.yaml and OUT/config.yaml (train with: mambaclinix fit -c OUT/config.yaml).",
    )
    p.add_argument("data_dir", nargs="?", type=Path, help="Decathlon / nnU-Net raw dataset folder")
    p.add_argument("--manifest", type=Path, default=None, help="CSV manifest instead of DATA_DIR")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: DATA_DIR/plans)")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="gpu")
    p.add_argument(
        "--memory-gb",
        type=float,
        default=None,
        help="memory budget in GiB (default 24 on gpu, 8 on cpu; on cpu: what training adds)",
    )
    p.add_argument("--reserve-gb", type=float, default=None, help="taken off the budget (gpu 1, cpu 0)")
    p.add_argument(
        "--safety",
        type=float,
        default=None,
        help="predicted peak <= safety x (budget - reserve); default from the model's error",
    )
    p.add_argument("--precision", default=None, help="gpu: bf16-mixed (default) or 32-true")
    p.add_argument("--base-features", type=int, default=32)
    p.add_argument("--max-features", type=int, default=320)
    p.add_argument("--max-stages", type=int, default=7)
    p.add_argument("--min-batch-size", type=int, default=2)
    p.add_argument("--normalization", default="auto", choices=("auto", "ct", "zscore", "none"))
    p.add_argument("--no-validate", action="store_true", help="skip the file checks")
    a = p.parse_args(list(argv))
    if (a.data_dir is None) == (a.manifest is None):
        p.error("give DATA_DIR or --manifest (one of them)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    plan = plan_dataset(
        a.data_dir, manifest=a.manifest, accelerator=a.accelerator, memory_gb=a.memory_gb,
        reserve_gb=a.reserve_gb, safety=a.safety, precision=a.precision, base_features=a.base_features,
        max_features=a.max_features, max_stages=a.max_stages, min_batch_size=a.min_batch_size,
        normalization=a.normalization, validate=not a.no_validate,
    )  # fmt: skip
    out = a.out if a.out is not None else (a.data_dir or a.manifest.parent) / "plans"
    plan_path, config_path = write_plan(plan, out)
    net = plan.network
    print(f"target spacing {plan.target_spacing}, patch {plan.patch_size}, batch {plan.batch_size}, "
          f"{net['n_stages']} stages, strides {net['strides']}, kernels {net['kernel_sizes']}")  # fmt: skip
    print(f"predicted peak {plan.memory['predicted_peak_gib']} GiB of {plan.memory['usable_gib']} GiB usable")
    print(f"plan:   {plan_path}\nconfig: {config_path}\ntrain:  mambaclinix fit -c {config_path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "plan":
        return plan_main(args[1:])
    if args and args[0] == "demo-data":
        return demo_data_main(args[1:])
    if args and args[0] == "demo":
        return demo_main(args[1:])
    lightning_cli(None if argv is None else args)


if __name__ == "__main__":
    main()
