"""``mambaclinix plan DATA_DIR``: fingerprint a dataset, write its plan and a ready config
(``docs/planning.md``)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path


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
