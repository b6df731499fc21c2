"""``mambaclinix demo-data DIR`` and ``mambaclinix demo``: the embedded brain-MRI demo."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path


def demo_data_main(argv: Sequence[str]) -> None:
    """``mambaclinix demo-data DIR``: build the demo brain-MRI dataset."""
    p = argparse.ArgumentParser(prog="mambaclinix demo-data", description="Build the demo brain-MRI dataset.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-test", type=int, default=3)
    p.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace what DIR holds")
    a = p.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mambaclinix.demo import build_demo_dataset

    try:
        path = build_demo_dataset(a.out_dir, n_train=a.n_train, n_test=a.n_test, spacing=a.spacing,
                                  seed=a.seed, overwrite=a.overwrite)  # fmt: skip
    except FileExistsError as err:  # the library's message names the argument, not the flag
        from mambaclinix.cli._errors import UserError

        raise UserError(str(err).replace("overwrite=True", "--overwrite")) from err
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
