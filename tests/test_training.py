"""End to end through the command line: fit → validate → test → predict → resume, on a tiny dataset."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _synthetic import make_dataset

from mambaclinix.cli import main
from mambaclinix.training import SegmentationModule

COMMON = ["--data.patch_size=[16,16,16]", "--data.num_workers=0", "--data.samples_per_volume=2",
          "--data.batch_size=2", "--model.net=mambaclinix_tiny", "--trainer.accelerator=cpu",
          "--trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A dataset with held-out labelled cases, trained for 2 steps, then validated/tested/predicted."""
    root = tmp_path_factory.mktemp("e2e")
    data = make_dataset(root / "data", n=4, n_test=2, test_labels=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        args = [f"--data.data_dir={data}", *COMMON]
        main(["fit", *args, "--trainer.max_steps=2"])
        ckpt = root / "runs/mambaclinix/checkpoints/last.ckpt"
        first_step = torch.load(ckpt, weights_only=False)["global_step"]
        for sub in ("validate", "test", "predict"):
            main([sub, *args, "--ckpt_path=last"])
        main(["fit", *args, "--trainer.max_steps=5", "--ckpt_path=last"])
    return root, data, first_step


def test_fit_writes_checkpoints_logs_and_curves(run_dir):
    root, _, first_step = run_dir
    run = root / "runs/mambaclinix"
    assert first_step == 2
    for name in ("checkpoints/last.ckpt", "metrics.csv", "training_curves.png", "config_fit.yaml"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"


def test_resume_continues_from_the_saved_step(run_dir):
    root, _, _ = run_dir
    ckpt = torch.load(root / "runs/mambaclinix/checkpoints/last.ckpt", weights_only=False)
    steps = [
        int(r["step"]) for r in csv.DictReader(open(root / "runs/mambaclinix/metrics.csv")) if r.get("step")
    ]
    assert ckpt["global_step"] > 2
    assert max(steps) >= 4  # the resumed run logged steps beyond the first run's 2
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


def test_test_writes_per_case_metrics_and_slices(run_dir):
    root, _, _ = run_dir
    rows = list(csv.DictReader(open(root / "runs/mambaclinix/test_metrics.csv")))
    assert [r["case"] for r in rows] == ["case_004", "case_005", "mean"]
    for key in ("dice_organ", "dice_tumour", "hd95_organ", "nsd1mm_tumour"):
        values = [float(r[key]) for r in rows]
        assert all(np.isfinite(values)), key
    assert (root / "runs/mambaclinix/test_slices.png").stat().st_size > 1000


def test_predictions_keep_the_input_geometry(run_dir):
    root, data, _ = run_dir
    for case in ("case_004", "case_005"):
        pred = nib.load(root / "runs/mambaclinix/predictions" / f"{case}.nii.gz")
        ref = nib.load(data / "imagesTs" / f"{case}_0000.nii.gz")
        assert pred.shape == ref.shape
        np.testing.assert_array_equal(pred.affine, ref.affine)
        values = np.unique(np.asarray(pred.dataobj))
        assert set(values.tolist()) <= {0, 1, 2}
        assert np.issubdtype(pred.get_data_dtype(), np.integer)


def test_model_arguments_given_with_a_checkpoint_override_its_hyperparameters(run_dir, tmp_path, monkeypatch):
    root, data, _ = run_dir
    ckpt = root / "runs/mambaclinix/checkpoints/last.ckpt"
    assert torch.load(ckpt, weights_only=False)["hyper_parameters"]["output_dir"] is None
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere"
    main(["predict", f"--data.data_dir={data}", *COMMON, f"--ckpt_path={ckpt}", f"--model.output_dir={out}"])
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["case_004.nii.gz", "case_005.nii.gz"]
    # what the user did not give still comes from the checkpoint
    saved = (tmp_path / "runs/mambaclinix/config_predict.yaml").read_text()
    assert "net: mambaclinix_tiny" in saved


def test_every_config_parses(tmp_path):
    from mambaclinix.cli import lightning_cli
    from mambaclinix.demo import config_path

    configs = [config_path(), *sorted(Path(__file__).parents[1].joinpath("examples/configs").glob("*.yaml"))]
    data = make_dataset(tmp_path / "data", n=2)
    for cfg in configs:
        # accelerator=cpu: the GPU configs must parse on this machine too
        args = ["-c", str(cfg), f"--data.data_dir={data}", "--trainer.logger=false"]
        args.append("--trainer.accelerator=cpu")
        cli = lightning_cli(args, run=False)
        assert isinstance(cli.model, SegmentationModule), cfg
        assert cli.model.hparams.num_classes == 3  # linked from the data module


def test_the_cli_lives_in_the_training_layer():
    """``mambaclinix.cli`` re-exports the LightningCLI of ``mambaclinix.training``; importing the training
    layer imports neither the command line nor the demo above it (and they no longer import each other)."""
    import importlib
    import subprocess
    import sys

    code = (
        "import importlib, sys, mambaclinix.training\n"
        "module = importlib.import_module('mambaclinix.training.lightning_cli')\n"
        "from mambaclinix.training import lightning_cli\n"
        "assert callable(lightning_cli) and lightning_cli is module.lightning_cli, lightning_cli\n"
        "print(sorted(m for m in ('mambaclinix.cli', 'mambaclinix.demo', 'torchio') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

    import mambaclinix.cli as cli
    import mambaclinix.training as training

    module = importlib.import_module("mambaclinix.training.lightning_cli")
    for name in ("MambaClinixCLI", "lightning_cli"):
        assert getattr(cli, name) is getattr(training, name) is getattr(module, name)
    for name in ("TRAINER_DEFAULTS", "PARSER_DEFAULTS", "SUBCOMMANDS"):
        assert getattr(cli, name) is getattr(module, name)


def test_module_rejects_a_patch_the_network_cannot_take():
    with pytest.raises(ValueError, match="size divisor"):
        SegmentationModule(net="mambaclinix_tiny", patch_size=(12, 16, 16), num_classes=3)
