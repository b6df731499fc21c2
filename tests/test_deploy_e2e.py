"""Ship a trained model: train 2 steps, export a package, delete the training data and its cache, and
predict from another folder in a fresh process with nothing but the package and the images; the label maps
equal those of the LightningCLI ``predict`` on the same checkpoint, with the input's geometry exactly."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from _synthetic import make_dataset

from mambaclinix.cli import main
from mambaclinix.deploy import read_package

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--data.patch_size=[16,16,16]", "--data.num_workers=0", "--data.samples_per_volume=2",
          "--data.batch_size=2", "--model.net=mambaclinix_tiny", "--trainer.accelerator=cpu",
          "--trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.mark.slow
def test_an_exported_package_predicts_as_the_lightning_cli_without_the_training_data(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n=4, n_test=2)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path in sorted((data / "imagesTs").iterdir()):
        shutil.copy(path, inputs / path.name)
    # a single-channel case under a plain name, in another format
    sitk.WriteImage(sitk.ReadImage(str(inputs / "case_004_0000.nii.gz")), str(inputs / "brain1.nrrd"))

    monkeypatch.chdir(tmp_path)
    args = [f"--data.data_dir={data}", *COMMON]
    main(["fit", *args, "--trainer.max_steps=2"])
    main(["predict", *args, "--ckpt_path=last", f"--data.predict_dir={inputs}", "--model.output_dir=cli"])
    main(["export", "runs/mambaclinix", "package", "--zip"])
    model = read_package(tmp_path / "package.zip").metadata
    assert model["plan"]["target_spacing"] == [1.0, 1.5, 2.0]  # the training cases' median spacing
    assert model["channel_names"] == ["MRI"] and model["labels"] == {"background": 0, "organ": 1, "tumour": 2}
    # the Mamba layers' token order travels with the network (x fastest on TorchIO's xyz arrays)
    assert model["network"] == {"name": "mambaclinix_tiny", "kwargs": {"mamba_scan_order": "F"}}
    assert model["patch_size"] == [16, 16, 16]
    assert (model["card"]["training_steps"], model["card"]["training_cases"]) == (2, 4)

    shutil.rmtree(data)  # the training data and the preprocessing cache inside it
    shutil.rmtree(tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    package, out = tmp_path / "package.zip", tmp_path / "out"
    command = [sys.executable, "-m", "mambaclinix.cli", "predict", "-i", str(inputs), "-o", str(out),
               "-m", str(package), "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr

    expected = ["brain1.nrrd", "case_004.nii.gz", "case_005.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "cli" / "predictions").iterdir()) == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected
    for case in ("case_004", "case_005"):
        ours = nib.load(tmp_path / "out" / f"{case}.nii.gz")
        cli = nib.load(tmp_path / "cli" / "predictions" / f"{case}.nii.gz")
        ref = nib.load(inputs / f"{case}_0000.nii.gz")
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(cli.dataobj))
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours.affine, ref.affine)
        np.testing.assert_array_equal(ours.header.get_sform(), ref.header.get_sform())
        np.testing.assert_array_equal(ours.header.get_qform(), ref.header.get_qform())
    ours, cli = (
        sitk.ReadImage(str(p / "brain1.nrrd")) for p in (tmp_path / "out", tmp_path / "cli" / "predictions")
    )
    ref = sitk.ReadImage(str(inputs / "brain1.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(cli))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(ours, get)() == getattr(ref, get)(), get
