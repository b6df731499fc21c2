"""Bad input: one test per row of docs/bad_input.md. Each asserts the error type, that the message names the
case and/or file and what was expected, and that nothing already written is lost."""

import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from _synthetic import SHAPE, make_dataset

from mambaclinix.data.datasets import (
    Case,
    DatasetError,
    read_dataset_json,
    read_decathlon,
    read_manifest,
)
from mambaclinix.data.preprocessing import load_case
from mambaclinix.data.validation import nifti_truncation, validate_cases
from mambaclinix.training import SegmentationModule

TINY = dict(net="mambaclinix_tiny", patch_size=(16, 16, 16), num_classes=3, channels_last=False)


@pytest.fixture
def dataset(tmp_path):
    root = make_dataset(tmp_path / "data", n=3)
    return root, read_decathlon(root), read_dataset_json(root)


def _check(cases, info, *fragments, match_count=None):
    with pytest.raises(DatasetError) as err:
        validate_cases(cases, info)
    message = str(err.value)
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    if match_count is not None:
        assert f"{match_count} problem(s)" in message, message
    return message


def _save(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), path)


def _load(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def test_a_clean_dataset_passes_and_reports_what_it_saw(dataset):
    _, cases, info = dataset
    report = validate_cases(cases, info)
    assert report.num_cases == 3 and report.num_channels == 1
    assert report.label_values == {0, 1, 2}  # _synthetic writes both classes in every case
    assert report.empty_labels == [] and report.errors == []


def test_missing_file(dataset):
    root, cases, info = dataset
    image = root / "imagesTr/case_001_0000.nii.gz"
    image.unlink()
    _check(cases, info, "case 'case_001'", image, "file does not exist", match_count=1)


def test_missing_label_when_listing(tmp_path):
    root = make_dataset(tmp_path / "data", n=2)
    (root / "labelsTr/case_000.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case 'case_000'.*has no label; expected .*labelsTr/case_000"):
        read_decathlon(root)


def test_unreadable_file_that_is_not_an_image(dataset):
    root, cases, info = dataset
    label = root / "labelsTr/case_002.nii.gz"
    label.write_bytes(b"this is not an image" * 10)
    message = _check(cases, info, "case 'case_002'", label, match_count=1)
    assert "NIfTI" in message or "cannot read" in message


@pytest.mark.parametrize("compressed", [True, False])
def test_truncated_nifti_is_named_although_simpleitk_reads_it(tmp_path, compressed):
    root = make_dataset(tmp_path / "data", n=2)
    cases, info = read_decathlon(root), read_dataset_json(root)
    path = root / "imagesTr/case_000_0000.nii.gz"
    if not compressed:  # rewrite the case as plain .nii (a Case built by hand)
        data, affine = _load(path)
        path = path.with_name("case_000_0000.nii")
        _save(path, data, affine)
        cases[0] = Case("case_000", (path,), cases[0].label_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])
    import torchio as tio

    assert tio.ScalarImage(path).data.shape[1:] == SHAPE  # the silent zero-fill this check exists for
    assert nifti_truncation(path) is not None
    _check(cases, info, "case 'case_000'", path, "corrupt NIfTI file", match_count=1)
    with pytest.raises(DatasetError, match=r"case 'case_000': corrupt NIfTI file .*case_000_0000"):
        load_case(cases[0], 1, 3)


def test_complete_nifti_files_pass_the_truncation_check(dataset):
    root, cases, _ = dataset
    for case in cases:
        for path in (*case.image_paths, case.label_path):
            assert nifti_truncation(path) is None
    assert nifti_truncation(root / "dataset.json") is None  # not NIfTI: not checked


def test_channel_files_with_different_shapes_or_affines(tmp_path):
    root = make_dataset(tmp_path / "data", n=2, channels=2)
    cases, info = read_decathlon(root), read_dataset_json(root)
    second = root / "imagesTr/case_000_0001.nii.gz"
    data, affine = _load(second)
    _save(second, data[:-2], affine)
    _check(cases, info, "case 'case_000'", second, "spatial shape (18, 24, 28)", "expected (20, 24, 28)")
    shifted = affine.copy()
    shifted[0, 3] += 0.5
    _save(second, data, shifted)
    _check(cases, info, "case 'case_000'", second, "differs from the first channel's", "by 0.5 mm")
    shifted[0, 3] = affine[0, 3] + 1e-5  # float noise is tolerated
    _save(second, data, shifted)
    validate_cases(cases, info)


def test_label_with_another_shape_or_affine(dataset):
    root, cases, info = dataset
    label = root / "labelsTr/case_001.nii.gz"
    data, affine = _load(label)
    _save(label, data[:, :, :-1], affine)
    _check(cases, info, "case 'case_001'", label, "label spatial shape (20, 24, 27)", "(20, 24, 28)")
    flipped = affine.copy()
    flipped[:3, 0] *= -1
    _save(label, data, flipped)
    _check(cases, info, "case 'case_001'", label, "label affine", "differs from the image's", "same grid")


def test_label_values_outside_the_declared_classes(dataset):
    root, cases, info = dataset
    label = root / "labelsTr/case_000.nii.gz"
    data, affine = _load(label)
    data[0, 0, 0] = 7
    _save(label, data, affine)
    _check(cases, info, "case 'case_000'", label, "label values [7] are not declared", "[0, 1, 2]")


def test_non_integer_label_values(dataset):
    root, cases, info = dataset
    label = root / "labelsTr/case_000.nii.gz"
    data, affine = _load(label)
    data = data.astype(np.float32)
    data[5, 5, 5] = 0.5
    _save(label, data, affine)
    _check(cases, info, "case 'case_000'", label, "non-integer value(s) (e.g. 0.5)", "integer class values")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_intensities_are_an_error(dataset, bad):
    root, cases, info = dataset
    image = root / "imagesTr/case_002_0000.nii.gz"
    data, affine = _load(image)
    data[3, 4, 5] = bad
    _save(image, data, affine)
    counts = "1 NaN and 0 infinite" if np.isnan(bad) else "0 NaN and 1 infinite"
    _check(cases, info, "case 'case_002'", image, counts, "expected finite values")
    # without the check: SimpleITK's NIfTI reader turns them into 0 (the documented repair) ...
    loaded, _, _ = load_case(cases[2], 1, 3)
    assert np.isfinite(loaded).all() and loaded[0, 3, 4, 5] == 0
    # ... while a format that keeps them (NRRD) is refused by the preprocessing
    import SimpleITK as sitk

    nrrd = root / "imagesTr/case_002.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.transpose(data, (2, 1, 0))), str(nrrd))
    case = Case("case_002", (nrrd,))
    _check([case], info, "case 'case_002'", nrrd, counts)
    with pytest.raises(DatasetError, match=rf"case 'case_002': image .*case_002.nrrd has {counts}"):
        load_case(case, 1, 3)


def test_an_empty_label_is_a_warning_and_the_case_is_kept(dataset, caplog, tmp_path):
    root, cases, info = dataset
    label = root / "labelsTr/case_001.nii.gz"
    data, affine = _load(label)
    _save(label, np.zeros_like(data), affine)
    with caplog.at_level(logging.WARNING, logger="mambaclinix.data.validation"):
        report = validate_cases(cases, info)
    assert report.empty_labels == ["case_001"]
    assert any("case 'case_001'" in r.message and "all background" in r.message for r in caplog.records)
    from mambaclinix.data import SegmentationDataModule

    dm = SegmentationDataModule(
        data_dir=str(root), patch_size=(16, 16, 16), num_workers=0, val_fraction=0,
        cache_dir=str(tmp_path / "cache"), samples_per_volume=2, batch_size=2,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert "case_001" in [s["name"] for s in dm.train_subjects]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 16, 16)


def test_inconsistent_channel_counts_across_cases(tmp_path):
    root = make_dataset(tmp_path / "data", layout="msd", n=3)
    cases = read_decathlon(root)
    data, affine = _load(cases[1].image_paths[0])
    _save(cases[1].image_paths[0], np.stack([data, data], -1), affine)  # a 2-channel 4D file
    _check(
        cases, read_dataset_json(root), "case 'case_001'", "2 image channel(s)", "expected 1 (dataset.json)"
    )
    _check(cases, None, "case 'case_001'", "2 image channel(s)", "expected 1 (most cases)")


def test_all_problems_are_reported_together(dataset):
    root, cases, info = dataset
    (root / "imagesTr/case_000_0000.nii.gz").unlink()
    label = root / "labelsTr/case_002.nii.gz"
    data, affine = _load(label)
    data[0, 0, 0] = 9
    _save(label, data, affine)
    message = _check(cases, info, "2 problem(s) in 2 of 3 case(s)", "case 'case_000'", "case 'case_002'")
    many = [Case(f"ghost_{i}", (root / f"ghost_{i}.nii.gz",)) for i in range(30)]
    with pytest.raises(DatasetError) as err:
        validate_cases(many, info, max_reported=5)
    text = str(err.value)
    assert "30 problem(s) in 30 of 30 case(s) (first 5 listed)" in text and "... and 25 more" in text
    assert "ghost_4" in text and "ghost_5'" not in text
    assert message.count("\n  - ") == 2


def test_wrong_channel_count_for_a_checkpoint(tmp_path):
    model = SegmentationModule(in_channels=1, **TINY)
    path = tmp_path / "one_channel.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip
    with pytest.raises(ValueError, match=r"trained with 1 input channel\(s\) \(in_channels\).* has 2"):
        SegmentationModule.load_from_checkpoint(path, in_channels=2, weights_only=False)
    with pytest.raises(
        ValueError, match=r"case\(s\) two_channels: .* 2 channel\(s\); this model takes \(B, 1"
    ):
        model.predict_volume(torch.zeros(1, 2, 16, 16, 16), ["two_channels"])


def test_non_finite_predictions_and_checkpoints_are_refused(tmp_path):
    model = SegmentationModule(in_channels=1, **TINY).eval()
    image = torch.zeros(1, 1, 16, 16, 16)
    image[0, 0, 3, 3, 3] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match=r"case\(s\) bad: .* not finite .* in the image"):
        model.predict_volume(image, ["bad"])
    with torch.no_grad():
        model.net.stem.conv.weight[0, 0, 0, 0, 0] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match=r"case\(s\) ok: .* in the network output"):
        model.predict_volume(torch.zeros(1, 1, 16, 16, 16), ["ok"])
    path = tmp_path / "diverged.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)  # fmt: skip
    with pytest.raises(ValueError, match=r"holds non-finite weights \(net\.stem\.conv\.weight"):
        SegmentationModule.load_from_checkpoint(path, weights_only=False)


@pytest.mark.parametrize("shape", [(10, 12, 7), (21, 17, 19)])
def test_volumes_smaller_than_the_patch_or_not_divisible_keep_their_shape(shape):
    torch.manual_seed(0)
    model = SegmentationModule(in_channels=1, **TINY).eval()
    image = torch.randn(1, 1, *shape)
    with torch.no_grad():
        probs = model.predict_volume(image, ["odd"])
    assert probs.shape == (1, 3, *shape)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(1, *shape))


def test_training_on_volumes_smaller_than_the_patch(tmp_path):
    from mambaclinix.data import SegmentationDataModule

    root = make_dataset(tmp_path / "data", n=2)
    dm = SegmentationDataModule(
        data_dir=str(root), patch_size=(32, 32, 32), num_workers=0, val_fraction=0,
        cache_dir=str(tmp_path / "cache"), samples_per_volume=1, batch_size=1,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (1, 1, 32, 32, 32) and batch["label"].shape == (1, 1, 32, 32, 32)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}), "missing key 'labels'"),
        (json.dumps({"channel_names": {"0": "CT"}, "labels": {"a": 1.5}, "file_ending": ".nii.gz"}),
         "label 'a' must map to a non-negative int"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)  # fmt: skip
def test_malformed_dataset_json(tmp_path, content, expected):
    root = make_dataset(tmp_path / "data", n=1)
    (root / "dataset.json").write_text(content)
    with pytest.raises(DatasetError) as err:
        read_decathlon(root)
    assert str(root / "dataset.json") in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("path,label\nimagesTr/case_000_0000.nii.gz,labelsTr/case_000.nii.gz\n", "missing column 'image'"),
        (
            "image,label\nimagesTr/nope_0000.nii.gz,labelsTr/case_000.nii.gz\n",
            "row 2: image file does not exist",
        ),
        ("image,label,split\nimagesTr/case_000_0000.nii.gz,,train\n", "split 'train' needs a label"),
    ],
)
def test_malformed_manifest(tmp_path, rows, expected):
    root = make_dataset(tmp_path / "data", n=1)
    manifest = root / "cases.csv"
    manifest.write_text(rows)
    with pytest.raises(DatasetError) as err:
        read_manifest(manifest)
    assert str(manifest) in str(err.value) and expected in str(err.value)


# ---------------------------------------------------------------------------------------- through the CLI

COMMON = ["--data.patch_size=[16,16,16]", "--data.num_workers=0", "--data.samples_per_volume=2",
          "--data.batch_size=2", "--model.net=mambaclinix_tiny", "--trainer.accelerator=cpu",
          "--trainer.enable_progress_bar=false", "--data.val_fraction=0"]  # fmt: skip


def test_fit_fails_early_and_the_check_is_remembered(tmp_path, monkeypatch):
    from mambaclinix.cli import main

    monkeypatch.chdir(tmp_path)
    root = make_dataset(tmp_path / "data", n=3)
    cache = tmp_path / "cache"
    args = [f"--data.data_dir={root}", f"--data.cache_dir={cache}", *COMMON, "--trainer.max_steps=1"]
    label = root / "labelsTr/case_001.nii.gz"
    data, affine = _load(label)
    data[0, 0, 0] = 5
    _save(label, data, affine)
    image = root / "imagesTr/case_002_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:500])
    with pytest.raises(DatasetError) as err:
        main(["fit", *args])
    text = str(err.value)
    assert "2 problem(s) in 2 of 3 case(s)" in text and str(label) in text and str(image) in text
    assert not list(cache.glob("*/*/meta.json")), "nothing is preprocessed before the check passes"
    assert not list(tmp_path.rglob("*.ckpt"))

    shutil.rmtree(root)
    make_dataset(tmp_path / "data", n=3)
    from mambaclinix.data import SegmentationDataModule

    def prepare(**kwargs):
        dm = SegmentationDataModule(data_dir=str(root), cache_dir=str(cache), num_workers=0, **kwargs)
        dm.prepare_data()

    prepare()
    assert len(list(cache.glob("validated-*.json"))) == 1
    import mambaclinix.data.validation as validation

    monkeypatch.setattr(validation, "validate_cases", lambda *a, **k: pytest.fail("checked again"))
    prepare()  # unchanged files are not read again
    os.utime(label, (1, 1))  # a changed file: the check would run again ...
    with pytest.raises(pytest.fail.Exception, match="checked again"):
        prepare()
    prepare(validate=False)  # ... unless it is switched off


def test_a_cache_entry_broken_between_runs_stops_the_resume_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from mambaclinix.cli import main

    monkeypatch.chdir(tmp_path)
    root = make_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    args = [f"--data.data_dir={root}", f"--data.cache_dir={cache}", *COMMON]
    main(["fit", *args, "--trainer.max_steps=1"])
    last = tmp_path / "runs/mambaclinix/checkpoints/last.ckpt"
    saved = last.read_bytes()
    broken = sorted(cache.glob("*/case_001-*/image.npy"))[0]
    broken.write_bytes(broken.read_bytes()[:100])  # e.g. a disk problem after the files were checked
    with pytest.raises(DatasetError) as err:
        main(["fit", *args, "--trainer.max_steps=3", "--ckpt_path=last"])
    text = str(err.value)
    assert "case 'case_001'" in text and str(broken) in text and "delete the folder" in text
    assert last.read_bytes() == saved

    # a checkpoint for 1 channel, used on a 2-channel dataset: a clear error before anything is predicted
    two = make_dataset(tmp_path / "two", n=2, channels=2, n_test=1)
    with pytest.raises(ValueError, match=r"trained with 1 input channel\(s\).*has 2"):
        main(["predict", f"--data.data_dir={two}", f"--data.cache_dir={cache}", *COMMON,
              f"--ckpt_path={last}", f"--model.output_dir={tmp_path / 'out'}"])  # fmt: skip
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


class _BreakCacheAfterFirstEpoch(L.Callback):
    def __init__(self, cache: Path):
        self.cache = cache
        self.broken: list[Path] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == 2:  # the last step of epoch 0 (patches are read from the cache one by one)
            for path in sorted(self.cache.glob("*/*/image.npy")):
                path.write_bytes(path.read_bytes()[:150])
                self.broken.append(path)


def test_a_cache_entry_broken_during_training_stops_the_run_cleanly(tmp_path):
    from mambaclinix.data import SegmentationDataModule

    root = make_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    dm = SegmentationDataModule(data_dir=str(root), patch_size=(16, 16, 16), num_workers=0, val_fraction=0,
                                cache_dir=str(cache), samples_per_volume=2, batch_size=2)  # fmt: skip
    model = SegmentationModule(in_channels=1, **TINY)
    breaker = _BreakCacheAfterFirstEpoch(cache)
    checkpoints = tmp_path / "ckpt"
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[breaker, L.pytorch.callbacks.ModelCheckpoint(checkpoints, save_last=True)],
                        enable_model_summary=False)  # fmt: skip
    with pytest.raises(DatasetError) as err:  # 2 batches per epoch: epoch 1 reloads the (broken) subjects
        trainer.fit(model, datamodule=dm)
    assert breaker.broken and any(str(p) in str(err.value) for p in breaker.broken)
    assert "delete the folder" in str(err.value)
    assert trainer.global_step == 2  # stopped at the first bad load, not trained on anything else
    assert (checkpoints / "last.ckpt").is_file()  # written at the end of epoch 0, kept
    state = torch.load(checkpoints / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
