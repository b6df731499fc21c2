"""The demo: brain-MRI tissue segmentation on a dataset built offline from the MNI152 template.

``mambaclinix demo-data DIR`` builds the dataset (see :func:`mambaclinix.data.build_demo_dataset`).
``mambaclinix demo`` builds it if needed, trains the CPU-sized preset with the packaged configuration
``mambaclinix/configs/demo_brain.yaml``, tests the best checkpoint on the held-out subjects and prints
Dice per tissue beside an intensity-only baseline (k-means on the intensities inside the reference
brain mask) computed on the same subjects in the same run.
"""

from __future__ import annotations

import argparse
import logging
import time
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG = "demo_brain.yaml"


def config_path() -> Path:
    """Path of the packaged demo configuration."""
    return Path(str(resources.files("mambaclinix.configs").joinpath(CONFIG)))


def build_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="mambaclinix demo-data", description="Build the demo brain-MRI dataset.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-test", type=int, default=3)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from mambaclinix.data import build_demo_dataset

    path = build_demo_dataset(a.out_dir, n_train=a.n_train, n_test=a.n_test, spacing=a.spacing, seed=a.seed,
                              overwrite=a.overwrite)  # fmt: skip
    print(f"demo dataset ready: {path}")


def baseline_dice(data_dir: Path, class_names: list[str]) -> dict[str, list[float]]:
    """k-means (intensity-only) Dice per tissue on the held-out subjects of the demo dataset."""
    import json

    import nibabel as nib
    import numpy as np
    import torch

    from mambaclinix.data import kmeans_tissue_baseline
    from mambaclinix.metrics import per_class_dice

    ds = json.loads((data_dir / "dataset.json").read_text())
    scores: dict[str, list[float]] = {c: [] for c in class_names}
    for entry in ds["test"]:
        img_rel = entry["image"] if isinstance(entry, dict) else entry
        img_path = data_dir / img_rel
        case = img_path.name.replace("_0000.nii.gz", "")
        lab_path = data_dir / "labelsTs" / f"{case}.nii.gz"
        img = np.asarray(nib.load(img_path).dataobj, dtype=np.float32)
        ref = np.asarray(nib.load(lab_path).dataobj).astype(np.int64)
        km = kmeans_tissue_baseline(img, ref > 0)
        d = per_class_dice(
            torch.from_numpy(km)[None, None], torch.from_numpy(ref)[None, None], len(class_names) + 1
        )
        for c, v in zip(class_names, d[0].tolist(), strict=True):
            scores[c].append(v)
    return scores


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="mambaclinix demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--data", type=Path, default=Path("data/demo_brain"), help="dataset folder (built if missing)"
    )
    p.add_argument("--config", type=Path, default=None, help="LightningCLI YAML (default: the packaged one)")
    p.add_argument("overrides", nargs="*", help="extra LightningCLI arguments, e.g. --trainer.max_epochs=2")
    a, extra = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    from mambaclinix.cli import lightning_cli
    from mambaclinix.data import build_demo_dataset

    build_demo_dataset(a.data)
    cfg = a.config or config_path()
    cli = lightning_cli(["-c", str(cfg), f"--data.data_dir={a.data}", *a.overrides, *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_s = time.perf_counter() - t0
    ckpt = (
        "best"
        if cli.trainer.checkpoint_callback and cli.trainer.checkpoint_callback.best_model_path
        else None
    )
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    names = cli.model.class_names
    net = cli.model.test_summary["mean"]
    base = baseline_dice(a.data, names)
    total_s = time.perf_counter() - t0
    lines = [
        "",
        f"Dice per tissue on {len(next(iter(base.values())))} held-out subjects "
        f"(training {train_s / 60:.1f} min, total {total_s / 60:.1f} min):",
        f"  {'tissue':8s} {'MambaClinix':>12s} {'k-means':>9s}",
    ]
    for c in names:
        b = sum(base[c]) / len(base[c])
        lines.append(f"  {c:8s} {net[f'dice_{c}']:12.3f} {b:9.3f}")
    lines.append(f"  {'mean':8s} {sum(net[f'dice_{c}'] for c in names) / len(names):12.3f} "
                 f"{sum(sum(base[c]) / len(base[c]) for c in names) / len(names):9.3f}")  # fmt: skip
    print("\n".join(lines))
