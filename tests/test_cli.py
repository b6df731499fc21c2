"""The ``mambaclinix`` command as a user meets it, run in subprocesses (``python -m mambaclinix.cli``, the
code of the ``mambaclinix`` script): exit codes, one message and no traceback for errors the user can fix,
the refusal to evaluate without trained weights, ``--ckpt_path last`` restoring the network, what
``fit`` prints, a failed set-up leaving no files, and every shipped config keeping its logs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _synthetic import make_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.patch_size=[16,16,16]", "--data.num_workers=0", "--data.samples_per_volume=2",
         "--data.batch_size=2", "--trainer.accelerator=cpu",
         "--trainer.enable_progress_bar=false"]  # fmt: skip


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "MAMBACLINIX_DEBUG"}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    environ.update(env or {})
    cmd = [sys.executable, "-m", "mambaclinix.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)


def user_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Assert a clean user error (status 1, no traceback, one ``error:`` line) naming ``expected``."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)
    return proc.stderr


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ------------------------------------------------------------------------------------- start and help


def test_help_lists_every_command_without_importing_lightning_or_torchio(tmp_path):
    from mambaclinix.cli import COMMANDS

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["--help"], ["plan", "--help"]):
        cmd = [sys.executable, "-X", "importtime", "-m", "mambaclinix.cli", *args]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()}
        assert not imported & {"lightning", "torchio", "pytorch_lightning"}, (args, imported)
        if args == ["--help"]:
            assert "torch" not in imported  # `import mambaclinix` is lazy
            for name, command in COMMANDS.items():
                assert f"  {name}" in proc.stdout and command.summary in proc.stdout, name
            assert "--debug" in proc.stdout
        else:
            assert "--accelerator" in proc.stdout
    for name in ("demo-data", "demo"):
        proc = cli(name, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    proc = cli("predict", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "--allow_untrained" in proc.stdout and "--ckpt_path" in proc.stdout
    proc = cli("nonsense", cwd=tmp_path)
    assert proc.returncode != 0 and "unknown command 'nonsense'" in proc.stderr


# ------------------------------------------------------------------------------------------ errors


def test_configuration_errors_are_one_message_and_debug_shows_the_traceback(tmp_path):
    proc = cli("fit", "--trainer.accelerator=cpu", cwd=tmp_path)  # no dataset given
    user_error(proc, "mambaclinix fit: error:", "data_dir", "hint: give --data.data_dir DIR")
    proc = cli("fit", "--trainer.accelerator=cpu", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "data_dir" in proc.stderr
    assert files_under(tmp_path) == []


def test_debug_flag_and_environment_variable(monkeypatch):
    from mambaclinix.cli._errors import debug_requested

    monkeypatch.delenv("MAMBACLINIX_DEBUG", raising=False)
    assert debug_requested(["fit", "--debug", "-c", "x.yaml"]) == (True, ["fit", "-c", "x.yaml"])
    assert debug_requested(["fit"]) == (False, ["fit"])
    monkeypatch.setenv("MAMBACLINIX_DEBUG", "1")
    assert debug_requested(["fit"]) == (True, ["fit"])
    monkeypatch.setenv("MAMBACLINIX_DEBUG", "0")
    assert debug_requested(["fit"]) == (False, ["fit"])


def test_a_gpu_error_gets_the_cpu_hint():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from mambaclinix.cli._errors import format_user_error, user_error_classes

    err = MisconfigurationException("No supported gpu backend found!")
    assert isinstance(err, user_error_classes())
    text = format_user_error(err, "mambaclinix fit")
    assert text.startswith("mambaclinix fit: error: No supported gpu backend found!")
    assert "--trainer.accelerator cpu" in text and "mambaclinix plan DATA_DIR --accelerator cpu" in text


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_config_on_a_cpu_machine_says_what_to_change(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    proc = cli("fit", "-c", ROOT / "examples/configs/paper_gpu.yaml", f"--data.data_dir={data}", cwd=tmp_path)
    user_error(proc, "--trainer.accelerator cpu", "plan DATA_DIR --accelerator cpu")
    assert not (tmp_path / "runs").exists()


def test_bad_data_lists_a_missing_label_with_every_other_problem(tmp_path):
    data = make_dataset(tmp_path / "data", n=3)
    label = data / "labelsTr/case_000.nii.gz"
    label.unlink()
    image = data / "imagesTr/case_001_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:500])
    for command in (["plan", data, "--accelerator", "cpu"], ["fit", f"--data.data_dir={data}", *SMALL]):
        text = user_error(cli(*command, cwd=tmp_path), "2 problem(s) in 2 of 3 case(s)")
        assert f"{label}: label file does not exist" in text and f"{image}: corrupt NIfTI file" in text
    assert not (tmp_path / "runs").exists()


def test_demo_data_into_a_foreign_folder_names_the_flag(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/notes.txt").write_text("mine")
    text = user_error(cli("demo-data", "out", cwd=tmp_path), "is not empty", "pass --overwrite")
    assert "overwrite=True" not in text
    assert (tmp_path / "out/notes.txt").read_text() == "mine"


def test_a_plan_that_cannot_fit_the_budget_is_one_message(tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    proc = cli("plan", data, "--accelerator", "cpu", "--memory-gb", "0.0001", "--no-validate", cwd=tmp_path)
    user_error(proc, "mambaclinix plan: error:", "too small")


# ---------------------------------------------------------------------- weights: refusal and `last`


def test_evaluation_without_weights_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", n=2, n_test=1)
    args = [f"--data.data_dir={data}", *SMALL, "--model.net=mambaclinix_tiny"]
    text = user_error(cli("predict", *args, "--ckpt_path=last", cwd=tmp_path), "no last.ckpt in",
                      str(Path("runs/mambaclinix/checkpoints")), "--allow_untrained")  # fmt: skip
    assert "save_last" not in text  # Lightning's misleading hint
    assert not (tmp_path / "runs").exists()


def test_no_checkpoint_or_a_missing_file_is_named(tmp_path, monkeypatch):
    from mambaclinix.cli import main
    from mambaclinix.training.cli_support import MissingWeightsError

    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "data", n=2)
    with pytest.raises(MissingWeightsError, match="test needs trained weights: give --ckpt_path last"):
        main(["test", f"--data.data_dir={data}", *SMALL])
    with pytest.raises(MissingWeightsError, match="nope.ckpt: checkpoint file not found"):
        main(["validate", f"--data.data_dir={data}", *SMALL, "--ckpt_path=nope.ckpt"])
    with pytest.raises(MissingWeightsError, match="best checkpoint is known only inside the fit"):
        main(["test", f"--data.data_dir={data}", *SMALL, "--ckpt_path=best"])


def test_allow_untrained_runs_and_says_so(tmp_path, monkeypatch, caplog):
    from mambaclinix.cli import main

    monkeypatch.chdir(tmp_path)
    data = make_dataset(tmp_path / "data", n=2, n_test=1)
    out = tmp_path / "out"
    args = [f"--data.data_dir={data}", *SMALL, "--model.net=mambaclinix_tiny", f"--model.output_dir={out}"]
    with caplog.at_level("WARNING", logger="mambaclinix"):
        main(["predict", *args, "--ckpt_path=last", "--allow_untrained=true"])
    assert "predict with untrained weights (--allow_untrained)" in caplog.text
    assert [p.name for p in (out / "predictions").iterdir()] == ["case_002.nii.gz"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fit (2 steps, no validation cases) of the tiny network; its output."""
    root = tmp_path_factory.mktemp("cli")
    data = make_dataset(root / "data", n=3, n_test=2)  # test images without labels
    proc = cli("fit", f"--data.data_dir={data}", *SMALL, "--model.net=mambaclinix_tiny",
               "--data.val_fraction=0", "--trainer.max_steps=2", cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root, data, proc


def test_fit_says_what_it_checked_without_lightning_noise(trained):
    root, _, proc = trained
    out = proc.stdout + proc.stderr
    assert "dataset check: 3 case(s) OK" in out
    assert "preprocessing cache" in out and "3 case(s) computed" in out
    assert out.count("no validation cases") == 1
    for noise in ("Tip:", "LeafSpec", "FLOPs", "could not find the monitored key", "across ranks is zero",
                  "LightningCLI's args parameter"):  # fmt: skip
        assert noise not in out, noise
    assert (root / "runs/mambaclinix/checkpoints/last.ckpt").is_file()
    assert not list((root / "runs/mambaclinix/checkpoints").glob("best*"))


def test_predict_with_last_restores_the_network_and_data_settings(trained, tmp_path):
    root, data, _ = trained
    out = tmp_path / "out"
    # no network, data folder or patch size given: all come from the checkpoint; the output folder wins
    proc = cli("predict", "--ckpt_path=last", "--trainer.accelerator=cpu",
               "--trainer.enable_progress_bar=false", f"--model.output_dir={out}", cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["case_003.nii.gz", "case_004.nii.gz"]
    saved = (root / "runs/mambaclinix/config_predict.yaml").read_text()
    assert "net: mambaclinix_tiny" in saved and f"data_dir: {data}" in saved
    assert "checkpoints/last.ckpt" in saved  # the file `last` resolved to


def test_a_command_that_fails_at_set_up_leaves_no_files(trained, tmp_path):
    root, data, _ = trained
    ckpt = root / "runs/mambaclinix/checkpoints/last.ckpt"
    # validate without validation cases fails after Lightning created its loggers: nothing stays
    proc = cli(
        "validate", f"--ckpt_path={ckpt}", "--data.val_fraction=0", "--trainer.accelerator=cpu", cwd=tmp_path
    )
    user_error(proc, "no validation cases")
    # test on images without labels
    user_error(
        cli("test", f"--ckpt_path={ckpt}", "--trainer.accelerator=cpu", cwd=tmp_path), "test needs labels"
    )
    assert not (tmp_path / "runs").exists(), files_under(tmp_path)


# ------------------------------------------------------------------------------------ shipped configs


def _configs() -> list[Path]:
    return [ROOT / "mambaclinix/configs/demo_brain.yaml", *sorted((ROOT / "examples/configs").glob("*.yaml"))]


@pytest.mark.slow
@pytest.mark.parametrize("config", _configs(), ids=lambda p: p.name)
def test_every_shipped_config_keeps_the_training_log(config, tmp_path):
    data = make_dataset(tmp_path / "data", n=3, n_test=1, test_labels=True)
    tiny = [f"--data.data_dir={data}", *SMALL, "--model.net=mambaclinix_tiny", "--trainer.precision=32-true",
            "--trainer.devices=1", "--model.sw_batch_size=1", "--model.mirror_tta=false"]  # fmt: skip
    fit = cli("fit", "-c", config, *tiny, "--trainer.max_steps=2", "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=2", "--trainer.log_every_n_steps=1", "--data.val_fraction=0",
              cwd=tmp_path)  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    (metrics,) = [p for p in tmp_path.joinpath("runs").rglob("metrics.csv")]
    trained_rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("train/loss_step") for r in trained_rows)
    for command in ("test", "predict"):
        proc = cli(command, "-c", config, *tiny, "--ckpt_path=last", cwd=tmp_path)
        assert proc.returncode == 0, (command, proc.stderr)
    losses = [r["train/loss_step"] for r in csv.DictReader(metrics.open()) if r.get("train/loss_step")]
    assert losses == [r["train/loss_step"] for r in trained_rows if r.get("train/loss_step")]


def test_preprocessing_shows_a_progress_bar(tmp_path, capsys):
    from mambaclinix.data.datasets import read_decathlon
    from mambaclinix.data.preprocessing import make_plan, preprocess_to_cache

    cases = read_decathlon(make_dataset(tmp_path / "data", n=2))
    plan = make_plan(cases, ("MRI",), target_spacing=(2.0, 2.0, 2.0))
    preprocess_to_cache(cases, plan, tmp_path / "cache", progress=True)
    err = capsys.readouterr().err
    assert "preprocessing:" in err and "0/2 [" in err
    preprocess_to_cache(cases, plan, tmp_path / "cache", progress=True)  # all cached: no bar
    assert "preprocessing" not in capsys.readouterr().err
