"""Crash safety: atomic checkpoint writes, a real SIGKILL in the middle of training and ``--ckpt_path last``,
and prediction files that a failing re-run leaves whole."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from _recorders import read_records
from _synthetic import make_dataset

from mambaclinix.data import SegmentationDataModule
from mambaclinix.training import AtomicCheckpointIO, ResumableCheckpoint

TESTS = Path(__file__).parent
STEPS_PER_EPOCH, EPOCHS = 4, 2
DATA = dict(patch_size=[16, 16, 16], num_workers=0, samples_per_volume=2, batch_size=2,
            iterations_per_epoch=STEPS_PER_EPOCH)  # fmt: skip
TARGET = STEPS_PER_EPOCH * EPOCHS


# ----------------------------------------------------------------------------------------- atomic writes


def test_a_failing_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 3, "w": torch.arange(5.0)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # partial bytes, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 4, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 3 and torch.equal(kept["w"], torch.arange(5.0))


_WRITER = """
import sys, torch
from mambaclinix.training.checkpoint import atomic_torch_save
path, i = sys.argv[1], 0
while True:
    atomic_torch_save({"i": i, "w": torch.full((2_000_000,), float(i))}, path)  # 8 MB
    print(i, flush=True)
    i += 1
"""


def test_sigkill_during_writes_never_leaves_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"  # one complete write
        time.sleep(0.15)  # somewhere in a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["w"], torch.full((2_000_000,), float(ckpt["i"])))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(n.startswith(".last.ckpt.tmp-") and not n.endswith(".ckpt") for n in leftovers), leftovers


def test_resumable_checkpoint_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="last_every_n_train_steps"):
        ResumableCheckpoint(last_every_n_train_steps=-1)
    with pytest.raises(ValueError, match="save_last='link'"):
        ResumableCheckpoint(last_every_n_train_steps=10, save_last="link")


def test_csv_logger_keeps_the_rows_of_earlier_runs(tmp_path):
    from mambaclinix.training import AppendingCSVLogger

    first = AppendingCSVLogger(tmp_path, name="run", version="")
    first.log_metrics({"train/loss": 0.5}, step=0)
    first.log_metrics({"train/loss": 0.25}, step=1)
    first.save()
    metrics = tmp_path / "run" / "metrics.csv"
    with open(metrics, "a") as f:  # a process killed in the middle of appending a row
        f.write("0.125,")
    second = AppendingCSVLogger(tmp_path, name="run", version="")  # the resumed run, or `test` after `fit`
    second.log_metrics({"train/loss": 0.1}, step=2)
    second.log_metrics({"test/dice": 0.9}, step=3)  # a new column: the file is rewritten with it
    second.save()
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["test/dice"]) for r in rows] == [
        ("0", "0.5", ""),
        ("1", "0.25", ""),
        ("2", "0.1", ""),
        ("3", "", "0.9"),
    ]  # the first run's rows kept, the half-written one dropped
    assert [p.name for p in metrics.parent.iterdir()] == ["metrics.csv"]


# ------------------------------------------------------------------------------- patch stream per epoch


def _patches(loader) -> list[tuple]:
    return [(tuple(b["name"]), float(b["image"].double().sum())) for b in loader]


def test_each_epoch_stream_is_reproducible_on_its_own(tmp_path):
    """Epoch e's patches do not depend on the epochs before it (what a resume relies on), and a saved
    mid-epoch position skips exactly the batches already trained on."""
    data = make_dataset(tmp_path / "data", n=4)
    kwargs = dict(data_dir=str(data), patch_size=(16, 16, 16), batch_size=2, samples_per_volume=3,
                  num_workers=0, val_fraction=0.25, iterations_per_epoch=3)  # fmt: skip
    dm = SegmentationDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [_patches(loader) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh stream every epoch, not a replay

    fresh = SegmentationDataModule(**kwargs)
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    loader.next_epoch = 2  # what the Trainer's current_epoch would say
    assert _patches(loader) == epochs[2]  # without epochs 0 and 1 having run in this process

    fresh.load_state_dict({"epoch": 2, "batches": 1, "seed": 0})  # a checkpoint after one batch of epoch 2
    assert _patches(loader)[:2] == epochs[2][1:]  # the two batches the interrupted epoch still had to train


# ------------------------------------------------------------------------------------- kill and resume


def _config(path: Path, records: Path, sleep: float) -> Path:
    cfg = {
        "trainer": {
            "accelerator": "cpu", "max_epochs": EPOCHS, "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "callbacks": [
                {"class_path": "mambaclinix.training.ResumableCheckpoint",
                 "init_args": {"save_last": True, "monitor": "val/dice_mean", "mode": "max",
                               "filename": "best-{epoch}", "last_every_n_train_steps": 2}},
                {"class_path": "_recorders.Recorder", "init_args": {"out_dir": str(records), "sleep": sleep}},
            ],
        },
        "model": {"net": "mambaclinix_tiny"},
        "data": DATA,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(data: Path, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mambaclinix.cli", "fit", "-c", str(config), f"--data.data_dir={data}"] + [
        *extra
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _train_steps(records: Path) -> list[dict]:
    return [r for r in read_records(records) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "data", n=4)
    run = root / "run"
    run.mkdir()
    cfg = _config(run / "cfg.yaml", run / "records", sleep=0.3)
    ckpt_dir = run / "runs/mambaclinix/checkpoints"
    proc = subprocess.Popen(_cli(data, cfg), cwd=run, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    saved_step = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            steps = _train_steps(run / "records") if (run / "records").is_dir() else []
            last = ckpt_dir / "last.ckpt"
            if steps and last.is_file():
                saved_step = torch.load(last, weights_only=False)["global_step"]
                # in the middle of the second epoch, and at least one batch past the checkpoint
                if saved_step >= STEPS_PER_EPOCH + 2 and steps[-1]["step"] > saved_step:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, (
            "training ended before it could be killed:\n" + proc.stderr.read().decode()
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_steps = _train_steps(run / "records")
    after_kill = {p.name: p.stat().st_size for p in ckpt_dir.iterdir()}
    loadable = {p.name: torch.load(p, weights_only=False)["global_step"] for p in ckpt_dir.glob("*.ckpt")}
    saved_step = loadable["last.ckpt"]
    (run / "records").rename(run / "records_killed")
    cfg = _config(run / "cfg_resume.yaml", run / "records", sleep=0.0)
    resume = subprocess.run(
        _cli(data, cfg, "--ckpt_path=last"), cwd=run, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    return {"root": root, "saved_step": saved_step, "killed_steps": killed_steps, "after_kill": after_kill,
            "loadable": loadable, "resumed_steps": _train_steps(run / "records"),
            "data": data, "ckpt_dir": ckpt_dir, "log": resume.stderr}  # fmt: skip


@pytest.mark.slow  # command-line runs in subprocesses
def test_kill_leaves_only_whole_checkpoints(killed_and_resumed):
    r = killed_and_resumed
    assert "last.ckpt" in r["loadable"]
    # the end-of-validation save of the best checkpoint still happened at step 4, a step save too
    assert r["loadable"]["best-epoch=0.ckpt"] == STEPS_PER_EPOCH
    for name in r["after_kill"]:  # every checkpoint loaded; anything else is a hidden temporary file
        assert name in r["loadable"] or (name.startswith(".") and ".tmp-" in name), name
    assert STEPS_PER_EPOCH + 2 <= r["saved_step"] < TARGET
    assert max(s["step"] for s in r["killed_steps"]) > r["saved_step"]  # the kill lost some steps


@pytest.mark.slow  # command-line runs in subprocesses
def test_resume_continues_at_the_saved_step_with_the_optimizer_state(killed_and_resumed):
    r = killed_and_resumed
    steps = [s["step"] for s in r["resumed_steps"]]
    assert steps == list(range(r["saved_step"], TARGET))  # neither repeated nor skipped
    ckpt = torch.load(r["ckpt_dir"] / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == TARGET and ckpt["epoch"] == EPOCHS - 1
    adam = ckpt["optimizer_states"][0]["state"]
    assert adam and all(int(s["step"]) == TARGET for s in adam.values())  # Adam's moments kept counting
    assert ckpt["lr_schedulers"][0]["last_epoch"] == TARGET  # the poly schedule too


@pytest.mark.slow  # command-line runs in subprocesses
def test_resume_trains_on_the_patches_of_the_uninterrupted_run(killed_and_resumed):
    """The patches of every step, before the kill and after the resume, are those of an uninterrupted
    stream (generated here by the data module alone, epoch by epoch)."""
    r = killed_and_resumed
    dm = SegmentationDataModule(data_dir=str(r["data"]), **DATA)
    dm.setup("fit")
    loader = dm.train_dataloader()
    reference = {}
    for epoch in range(EPOCHS):
        for i, b in enumerate(loader):
            reference[epoch * STEPS_PER_EPOCH + i] = (b["name"], float(b["image"].double().sum()),
                                                      int(b["label"].sum()))  # fmt: skip
    for s in r["killed_steps"] + r["resumed_steps"]:
        assert (s["names"], s["image_sum"], s["label_sum"]) == reference[s["step"]], s["step"]
    assert r["saved_step"] % STEPS_PER_EPOCH != 0  # a mid-epoch resume: the skipped batches matter


# ------------------------------------------------------------------------------------------ predictions


@pytest.mark.slow  # command-line runs in subprocesses
def test_a_failing_predict_rerun_keeps_the_earlier_predictions(killed_and_resumed, tmp_path, monkeypatch):
    from mambaclinix.cli import main

    r = killed_and_resumed
    data = make_dataset(tmp_path / "data", n=4, n_test=2)
    args = ["predict", f"--data.data_dir={data}", "--data.patch_size=[16,16,16]", "--data.num_workers=0",
            "--model.net=mambaclinix_tiny", "--trainer.accelerator=cpu", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'out'}",
            f"--ckpt_path={r['ckpt_dir'] / 'last.ckpt'}"]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    main(args)
    out = tmp_path / "out/predictions"
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["case_004.nii.gz", "case_005.nii.gz"]

    real_save, calls = nib.save, []

    def save_then_fail(img, filename):  # the second case's write dies half-way
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"\x1f\x8b half a file")
            raise OSError(5, "Input/output error")
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", save_then_fail)
    with pytest.raises(OSError, match="Input/output"):
        main(args)
    assert sorted(p.name for p in out.iterdir()) == sorted(first)  # no partial or temporary file left
    for name in first:
        ref = nib.load(data / "imagesTs" / name.replace(".nii.gz", "_0000.nii.gz"))
        pred = nib.load(out / name)
        assert pred.shape == ref.shape and np.asarray(pred.dataobj).max() <= 2
