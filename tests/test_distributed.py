"""Distributed data parallel through the command line: ``--trainer.strategy=ddp --trainer.devices=2`` on CPU
(gloo), in subprocesses, on a dataset whose validation, test and prediction case counts are odd."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from _recorders import read_records
from _synthetic import make_dataset
from torch.utils.data import DistributedSampler

from mambaclinix.data import SegmentationDataModule

TESTS = Path(__file__).parent
WORLD = 2
TEST_CASES = ["case_009", "case_010", "case_011"]  # 3 cases on 2 ranks


def _run(root: Path, records: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "mambaclinix.cli", *args, "--trainer.callbacks+=_recorders.Recorder",
           f"--trainer.callbacks.out_dir={records}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """fit (1 epoch, 2 batches per rank), test and predict, each on 2 processes."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_dataset(root / "data", n=9, n_test=3, test_labels=True)  # 6 training + 3 validation cases
    common = [f"--data.data_dir={data}", "--data.patch_size=[16,16,16]", "--data.num_workers=0",
              "--data.samples_per_volume=2", "--data.batch_size=2", "--data.val_fraction=0.34",
              "--model.net=mambaclinix_tiny", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
              f"--trainer.devices={WORLD}", "--trainer.enable_progress_bar=false"]  # fmt: skip
    _run(root, root / "fit", "fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
         "--trainer.num_sanity_val_steps=0")  # fmt: skip
    _run(root, root / "test", "test", *common, "--ckpt_path=last")
    _run(
        root,
        root / "predict",
        "predict",
        *common,
        "--ckpt_path=last",
        f"--data.predict_dir={data / 'imagesTs'}",
    )
    return root, data


@pytest.mark.slow  # command-line runs in subprocesses
def test_each_rank_trains_on_its_own_subjects(ddp):
    root, data = ddp
    train, _ = SegmentationDataModule(data_dir=str(data), val_fraction=0.34).split()
    names = [c.name for c in train]  # the sorted training pool, as the data module indexes it
    shards = []
    for rank in range(WORLD):  # the subjects of the first pass on each rank
        sampler = DistributedSampler(range(len(names)), num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        shards.append({names[i] for i in sampler})
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(names)
    seen = {rank: set() for rank in range(WORLD)}
    steps = {rank: 0 for rank in range(WORLD)}
    for r in read_records(root / "fit"):
        if r["kind"] == "train":
            seen[r["rank"]] |= set(r["names"])
            steps[r["rank"]] += 1
    assert steps == {0: 2, 1: 2}
    for rank in range(WORLD):
        assert seen[rank] and seen[rank] <= shards[rank], (rank, seen[rank], shards[rank])


@pytest.mark.slow  # command-line runs in subprocesses
def test_validation_dice_is_reduced_over_all_ranks(ddp):
    root, _ = ddp
    val = [r for r in read_records(root / "fit") if r["kind"] == "val" and not r["sanity"]]
    real = [r for r in val if not r["duplicate"]]
    assert len(real) == 3 and len({r["name"] for r in real}) == 3  # each validation case once
    assert sorted(r["rank"] for r in real) == [0, 0, 1]  # 2 + 1 cases, and rank 1 pads with a repeat
    assert [r["rank"] for r in val if r["duplicate"]] == [1]
    per_class = np.mean([r["dice"] for r in real], axis=0)  # Dice computed in the callback, by hand
    rank0 = np.mean([r["dice"] for r in real if r["rank"] == 0], axis=0)
    rows = [r for r in csv.DictReader(open(root / "runs/mambaclinix/metrics.csv")) if r.get("val/dice_mean")]
    assert len(rows) == 1
    logged = {k: float(v) for k, v in rows[0].items() if k.startswith("val/dice") and v}
    np.testing.assert_allclose(logged["val/dice_organ"], per_class[0], rtol=1e-6)
    np.testing.assert_allclose(logged["val/dice_tumour"], per_class[1], rtol=1e-6)
    np.testing.assert_allclose(logged["val/dice_mean"], per_class.mean(), rtol=1e-6)
    if not np.allclose(rank0, per_class):  # the check can tell a rank-0-only Dice from the reduced one
        assert not np.isclose(logged["val/dice_mean"], rank0.mean(), rtol=1e-6)


@pytest.mark.slow  # command-line runs in subprocesses
def test_rank_zero_writes_whole_checkpoints(ddp):
    root, _ = ddp
    ckpt_dir = root / "runs/mambaclinix/checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]
    for path in ckpt_dir.iterdir():
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["global_step"] == 2 and ckpt["optimizer_states"]


@pytest.mark.slow  # command-line runs in subprocesses
def test_test_metrics_count_each_case_once(ddp):
    root, _ = ddp
    records = [r for r in read_records(root / "test") if r["kind"] == "test"]
    real = sorted(r["name"] for r in records if not r["duplicate"])
    assert real == TEST_CASES and [r["rank"] for r in records if r["duplicate"]] == [1]
    rows = list(csv.DictReader(open(root / "runs/mambaclinix/test_metrics.csv")))
    assert [r["case"] for r in rows] == [*TEST_CASES, "mean"]
    for key in (k for k in rows[0] if k != "case"):
        values = [float(r[key]) for r in rows[:-1]]
        np.testing.assert_allclose(float(rows[-1][key]), np.mean(values), rtol=1e-12, err_msg=key)


@pytest.mark.slow  # command-line runs in subprocesses
def test_predict_writes_every_case_exactly_once(ddp):
    root, data = ddp
    records = [r for r in read_records(root / "predict") if r["kind"] == "predict"]
    written = [Path(p).name for r in records for p in r["written"]]
    expected = sorted(f"{c}.nii.gz" for c in TEST_CASES)
    assert sorted(written) == expected  # no duplicate writes, no gaps
    assert [r["written"] for r in records if r["duplicate"]] == [[]]
    assert {r["rank"] for r in records if r["written"]} == {0, 1}  # the work was split
    out = root / "runs/mambaclinix/predictions"
    assert sorted(p.name for p in out.iterdir()) == expected  # and nothing else (no temporary files)
    for case in TEST_CASES:
        ref = nib.load(data / "imagesTs" / f"{case}_0000.nii.gz")
        pred = nib.load(out / f"{case}.nii.gz")
        assert pred.shape == ref.shape
        np.testing.assert_array_equal(pred.affine, ref.affine)


# ----------------------------------------------------------------------------- in-process, no processes


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shard_sampler_covers_every_case_once_with_equal_lengths(n, world):
    from mambaclinix.data.loaders import _ShardSampler

    dataset = list(range(n))
    keys = [list(_ShardSampler(dataset, world, rank)) for rank in range(world)]
    assert len({len(k) for k in keys}) == 1  # every rank runs the same number of steps
    real = sorted(k for ks in keys for k in ks if k < n)
    assert real == list(range(n))  # each case on exactly one rank
    padding = [k for ks in keys for k in ks if k >= n]
    assert len(padding) == world * -(-n // world) - n and all(k - n < n for k in padding)


def test_padding_batches_are_flagged_and_skipped(tmp_path):
    from mambaclinix.data.loaders import _EvalDataset, _ShardSampler, collate_subjects
    from mambaclinix.training import SegmentationModule

    data = make_dataset(tmp_path / "data", n=3)
    dm = SegmentationDataModule(data_dir=str(data), patch_size=(16, 16, 16), num_workers=0, val_fraction=0.34)
    dm.prepare_data()
    dm.setup("fit")
    dataset = _EvalDataset(dm.train_subjects)  # 2 cases on 3 ranks: rank 2 gets a flagged repeat
    batches = [collate_subjects([dataset[k] for k in _ShardSampler(dataset, 3, rank)]) for rank in range(3)]
    assert ["duplicate" in b for b in batches] == [False, False, True]
    assert batches[2]["name"] == batches[0]["name"]
    model = SegmentationModule(net="mambaclinix_tiny", num_classes=3, patch_size=(16, 16, 16))
    model.validation_step(batches[2], 0)
    assert int(model.val_dice.count.sum()) == 0  # the repeat is not counted
    model.validation_step(batches[0], 0)
    assert int(model.val_dice.count.sum()) == 2  # one case, two foreground classes
    assert model.predict_step(batches[2], 0) == []
