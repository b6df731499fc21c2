"""Train, export a model package, and predict with it without the training data.

    python examples/deploy_model.py                            # work in ./deploy_example
    python examples/deploy_model.py --workdir /tmp/deploy --steps 20 --preset mambaclinix_small

1. writes a small synthetic dataset in the nnU-Net layout (a bright ball in noisy volumes, anisotropic
   spacing) and trains ``--preset`` on it for ``--steps`` steps with the ``mambaclinix`` command line;
2. exports the run as a model package (``mambaclinix export RUN model.zip --zip``);
3. deletes the training data and the preprocessing cache;
4. segments new scans from the package alone: from Python (``mambaclinix.Predictor`` on a NumPy array and
   on a file) and with ``mambaclinix predict -i IN -o OUT -m model.zip``, and prints the Dice of each
   against the ball it drew.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

SPACING = (1.0, 1.0, 2.0)


def _scan(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with a bright ball (label 1) at a random place."""
    grid = np.stack(
        np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)], indexing="ij")
    )
    size = np.array(shape) * SPACING
    centre = rng.uniform(0.35, 0.65, 3) * size
    label = (np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0)) < 0.2 * size.min()).astype(np.uint8)
    image = rng.normal(0.0, 1.0, shape).astype(np.float32) + 2.0 * label + 10.0
    return image, label


def write_dataset(root: Path, cases: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A Decathlon / nnU-Net v2 dataset with ``cases`` training cases."""
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING, 1.0])
    for i in range(cases):
        image, label = _scan(rng, shape)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"ball_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"ball_{i:03d}.nii.gz")
    meta = {"name": "Balls", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "ball": 1},
            "numTraining": cases, "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("deploy_example"))
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--preset", default="mambaclinix_tiny")
    parser.add_argument("--cases", type=int, default=4, help="training cases")
    parser.add_argument("--size", type=int, default=32, help="edge of the synthetic volumes (voxels)")
    parser.add_argument("--patch", type=int, default=16, help="training patch edge (a multiple of 16)")
    args = parser.parse_args(argv)
    from mambaclinix import Predictor
    from mambaclinix.cli import main as mambaclinix

    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    shape = (args.size, args.size, max(args.size // 2, args.patch))
    data = write_dataset(work / "data", args.cases, shape)

    # 1. train (any run works: the checkpoints carry what prediction needs); the run folder is ./runs
    os.chdir(work)
    patch = f"[{args.patch},{args.patch},{args.patch}]"
    mambaclinix(["fit", f"--data.data_dir={data}", f"--data.patch_size={patch}", "--data.num_workers=0",
                 "--data.batch_size=2", "--data.samples_per_volume=2", f"--model.net={args.preset}",
                 "--model.lr=0.01", "--trainer.accelerator=cpu", f"--trainer.max_steps={args.steps}",
                 "--trainer.enable_progress_bar=false"])  # fmt: skip
    run = work / "runs" / "mambaclinix"

    # 2. export, 3. delete the training data (and its cache)
    mambaclinix(["export", str(run), str(work / "model.zip"), "--zip"])
    shutil.rmtree(data)
    print(f"package: {work / 'model.zip'} ({(work / 'model.zip').stat().st_size / 2**20:.2f} MiB)")

    # 4. new scans, segmented from the package alone
    rng = np.random.default_rng(123)
    new = work / "new_scans"
    new.mkdir()
    truth = {}
    for name in ("scan_a", "scan_b"):
        image, label = _scan(rng, shape)
        nib.save(nib.Nifti1Image(image, np.diag([*SPACING, 1.0])), new / f"{name}.nii.gz")
        truth[name] = label
    predictor = Predictor(work / "model.zip", device="cpu")
    t0 = time.perf_counter()
    from_array = predictor.predict(
        nib.load(new / "scan_a.nii.gz").get_fdata(dtype=np.float32), spacing=SPACING
    )
    from_file = predictor.predict(new / "scan_a.nii.gz")
    print(f"Predictor: {time.perf_counter() - t0:.1f} s for two predictions; classes {predictor.class_names}")
    assert np.array_equal(from_array, from_file)
    mambaclinix(["predict", "-i", str(new), "-o", str(work / "segmentations"), "-m", str(work / "model.zip")])
    result = {}
    for name, label in truth.items():
        pred = np.asarray(nib.load(work / "segmentations" / f"{name}.nii.gz").dataobj)
        result[name] = dice(pred == 1, label == 1)
        print(f"{name}: Dice of the ball {result[name]:.3f}")
    return result


if __name__ == "__main__":
    main()
