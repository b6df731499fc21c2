"""The demo command end to end, shortened: a 4 mm dataset, two training steps, test, Dice table."""

import pytest

pytest.importorskip("nilearn")

from mambaclinix.cli import main  # noqa: E402
from mambaclinix.demo import build_demo_dataset  # noqa: E402


def test_demo_command_runs_and_prints_the_dice_table(tmp_path, monkeypatch, capsys):
    data = build_demo_dataset(tmp_path / "demo", n_train=3, n_test=1, spacing=4.0)
    monkeypatch.chdir(tmp_path)
    main(["demo", f"--data={data}", "--data.patch_size=[32,32,32]", "--data.num_workers=0",
          "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.check_val_every_n_epoch=1",
          "--trainer.enable_progress_bar=false", "--trainer.max_time=null"])  # fmt: skip
    out = capsys.readouterr().out
    assert "Dice per tissue on 1 held-out subjects" in out
    for tissue in ("CSF", "GM", "WM", "mean"):
        line = next(x for x in out.splitlines() if x.strip().startswith(tissue))
        net, base = (float(v) for v in line.split()[1:3])
        assert 0.0 <= net <= 1.0 and 0.0 < base <= 1.0
    assert (tmp_path / "runs/demo_brain/checkpoints/last.ckpt").is_file()
    assert (tmp_path / "runs/demo_brain/test_metrics.csv").is_file()
    # the checkpoint carries what a model package needs, validation Dice per tissue included
    import torch

    from mambaclinix.deploy.metadata import CHECKPOINT_KEY

    meta = torch.load(tmp_path / "runs/demo_brain/checkpoints/last.ckpt", weights_only=True)[CHECKPOINT_KEY]
    assert set(meta["card"]["validation_dice"]) == {"CSF", "GM", "WM"}
    # a later command in the run folder keeps the training metrics (Lightning's CSVLogger would delete them)
    metrics = tmp_path / "runs/demo_brain/logs/metrics.csv"
    before = metrics.read_text()
    main(["test", "-c", str(tmp_path / "runs/demo_brain/logs/config_run.yaml"), f"--data.data_dir={data}",
          "--ckpt_path=last", "--trainer.enable_progress_bar=false"])  # fmt: skip
    assert metrics.read_text().startswith(before.splitlines()[0])
    assert len(metrics.read_text().splitlines()) >= len(before.splitlines())
