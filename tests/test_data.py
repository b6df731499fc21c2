"""The TorchIO data layer: readers, preprocessing cache and inverse, sampler, augmentation, DataModule.

Everything runs on tiny synthetic volumes written with nibabel (20×24×28 voxels, spacing (1, 1.5, 2),
rotated/flipped affines, zero borders to crop, two foreground classes).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from _synthetic import BOX, CROP, SHAPE, SPACING, _affine, make_dataset  # noqa: E402

from mambaclinix.data.augmentation import (
    Brightness,
    Contrast,
    IntensityGamma,
    LowResolution,
    RandomBrightness,
    RandomContrast,
    RandomGaussianNoise,
    RandomIntensityGamma,
    RandomLowResolution,
    RandomRotateScale,
    RandomVoxelBlur,
    nnunet_augmentation,
)
from mambaclinix.data.datamodule import SegmentationDataModule
from mambaclinix.data.datasets import (
    DatasetError,
    find_images,
    read_cases,
    read_dataset_info,
    read_dataset_json,
    read_decathlon,
    read_manifest,
)
from mambaclinix.data.preprocessing import (
    PreprocessingPlan,
    invert_to_original,
    load_case,
    make_plan,
    nonzero_bbox,
    preprocess_case,
    preprocess_to_cache,
)
from mambaclinix.data.sampling import SEED_KEY, ForegroundOversamplingSampler


@pytest.fixture(scope="module")
def v2_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("v2"), "v2", n=4, channels=2, n_test=1)


@pytest.fixture(scope="module")
def mr_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("mr"), "v2", n=4, channels=1, n_test=1)


def _plan(channels: int = 1, spacing=SPACING, normalization: str = "zscore", **kwargs) -> PreprocessingPlan:
    return PreprocessingPlan(tuple(spacing), (normalization,) * channels, (None,) * channels, **kwargs)


# ------------------------------------------------------------------------------------------- reading


def test_read_nnunet_v2_layout(v2_dataset):
    info = read_dataset_json(v2_dataset)
    assert info.layout == "nnunetv2"
    assert info.channel_names == ("MRI", "MRI")
    assert (info.num_channels, info.num_classes, info.class_names) == (
        2,
        3,
        ["background", "organ", "tumour"],
    )
    cases = read_decathlon(v2_dataset)
    assert [c.name for c in cases] == [f"case_{i:03d}" for i in range(4)]
    assert [p.name for p in cases[1].image_paths] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert cases[1].label_path == v2_dataset / "labelsTr" / "case_001.nii.gz"
    test = read_decathlon(v2_dataset, "test")
    assert [c.name for c in test] == ["case_004"] and test[0].label_path is None


def test_read_msd_layout_with_4d_images(tmp_path):
    root = make_dataset(tmp_path, "msd", n=3, channels=2, n_test=1, test_labels=True)
    info = read_dataset_json(root)
    assert (info.layout, info.channel_names, info.name) == ("msd", ("MRI", "MRI"), "synthetic")
    cases = read_decathlon(root)
    assert [c.name for c in cases] == ["case_000", "case_001", "case_002"]
    assert len(cases[0].image_paths) == 1
    image, affine, label = load_case(cases[0], num_channels=2, num_classes=3)
    assert image.shape == (2, *SHAPE) and label.shape == SHAPE
    np.testing.assert_allclose(affine, _affine(0))
    (test,) = read_decathlon(root, "test")
    assert test.name == "case_003" and test.label_path == root / "labelsTs" / "case_003.nii.gz"


def test_read_msd_listing_converted_channel_files(tmp_path):
    """nnU-Net v1 conversions list ``x.nii.gz`` but store ``x_0000.nii.gz``: the channel files are used."""
    root = make_dataset(tmp_path, "msd", n=2)
    for path in (root / "imagesTr").iterdir():
        path.rename(path.with_name(path.name.replace(".nii.gz", "_0000.nii.gz")))
    cases = read_decathlon(root)
    assert [p.name for p in cases[0].image_paths] == ["case_000_0000.nii.gz"]


def _write_manifest(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_read_manifest_with_channels_splits_and_nrrd(tmp_path, v2_dataset):
    data = tmp_path / "files"
    data.mkdir()
    rows = []
    for i, split in enumerate(["train", "val", "test", ""]):
        name = f"case_{i:03d}"
        for c in range(2):
            shutil.copy(v2_dataset / "imagesTr" / f"{name}_{c:04d}.nii.gz", data / f"{name}_{c:04d}.nii.gz")
        label = tio.LabelMap(v2_dataset / "labelsTr" / f"{name}.nii.gz")
        label.save(data / f"{name}.nrrd")
        rows.append(
            {
                "image_0": f"files/{name}_0000.nii.gz",
                "image_1": f"files/{name}_0001.nii.gz",
                "label": f"files/{name}.nrrd" if split != "" else "",
                "split": split,
            }
        )
    manifest = _write_manifest(tmp_path / "cases.csv", rows, ["image_0", "image_1", "label", "split"])
    cases = read_manifest(manifest)
    assert [c.name for c in cases] == ["case_000", "case_001", "case_002", "case_003"]
    assert [c.split for c in cases] == ["train", "val", "test", None]
    assert cases[0].image_paths == (data / "case_000_0000.nii.gz", data / "case_000_0001.nii.gz")
    assert cases[3].label_path is None
    image, _, label = load_case(cases[0], num_channels=2, num_classes=3)
    expected = tio.LabelMap(v2_dataset / "labelsTr" / "case_000.nii.gz").data[0].numpy()
    assert image.shape == (2, *SHAPE) and np.array_equal(label, expected)


def test_read_cases_sorts_a_manifest_by_role(tmp_path, mr_dataset):
    """The training pool is the labelled rows with split train or empty; val, test and unlabelled
    unassigned rows go to their own lists (the rule the data module and the planner share)."""
    splits = {"case_000": "train", "case_001": "", "case_002": "val", "case_003": "test", "case_004": ""}
    rows = []
    for name, split in splits.items():
        folder = "imagesTs" if name == "case_004" else "imagesTr"
        label = "" if name == "case_004" else str(mr_dataset / "labelsTr" / f"{name}.nii.gz")
        image = str(mr_dataset / folder / f"{name}_0000.nii.gz")
        rows.append({"image": image, "label": label, "split": split})
    manifest = _write_manifest(tmp_path / "m.csv", rows, ["image", "label", "split"])
    lists = read_cases(manifest=manifest)
    names = {role: [c.name for c in cases] for role, cases in lists._asdict().items()}
    assert names == {"train": ["case_000", "case_001"], "val": ["case_002"], "test": ["case_003"],
                     "unlabelled": ["case_004"]}  # fmt: skip
    assert read_dataset_info(manifest=manifest) is None  # no dataset.json beside the CSV
    only_test = _write_manifest(tmp_path / "t.csv", [{**rows[3]}], ["image", "label", "split"])
    with pytest.raises(DatasetError, match="no labelled training cases"):
        read_cases(manifest=only_test)
    with pytest.raises(ValueError, match="exactly one of data_dir"):
        read_cases(mr_dataset, manifest)


def test_read_cases_of_a_decathlon_folder_reads_the_test_set_only_when_asked(tmp_path):
    root = make_dataset(tmp_path, "v2", n=3, n_test=1)
    (root / "labelsTs").mkdir()  # a labelsTs folder without the test label: the test set is broken
    with pytest.raises(DatasetError, match="case_003"):
        read_cases(root)
    lists = read_cases(root, test=False)
    assert [c.name for c in lists.train] == ["case_000", "case_001", "case_002"]
    assert lists.val == lists.test == lists.unlabelled == []
    assert read_dataset_info(root) == read_dataset_json(root)


def _break(root: Path, how: str) -> str:
    """Damage a dataset; return a fragment the error message must contain."""
    if how == "no_json":
        (root / "dataset.json").unlink()
        return "dataset.json"
    if how == "bad_json":
        (root / "dataset.json").write_text('{"channel_names": {"0": "CT"},')
        return "not valid JSON"
    if how == "missing_key":
        data = json.loads((root / "dataset.json").read_text())
        del data["file_ending"]
        (root / "dataset.json").write_text(json.dumps(data))
        return "'file_ending'"
    if how == "missing_label":
        (root / "labelsTr" / "case_001.nii.gz").unlink()
        return "case_001"
    if how == "mixed_channels":
        (root / "imagesTr" / "case_002_0001.nii.gz").unlink()
        return "case_002"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no_json", "bad_json", "missing_key", "missing_label", "mixed_channels"])
def test_bad_decathlon_datasets_name_the_problem(tmp_path, how):
    root = make_dataset(tmp_path, "v2", n=3, channels=2)
    fragment = _break(root, how)
    with pytest.raises(DatasetError, match=fragment) as info:
        read_decathlon(root)
    if how == "missing_label":
        assert "labelsTr/case_001.nii.gz" in str(info.value)
    if how == "mixed_channels":
        assert "mixed channel counts" in str(info.value)


def test_bad_msd_datasets_name_the_problem(tmp_path):
    root = make_dataset(tmp_path, "msd", n=2)
    (root / "imagesTr" / "case_001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"does not exist: .*case_001\.nii\.gz"):
        read_decathlon(root)
    root = make_dataset(tmp_path / "b", "msd", n=2)
    data = json.loads((root / "dataset.json").read_text())
    del data["training"][1]["label"]
    (root / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="case_001.*has no label"):
        read_decathlon(root)
    # MSD channel count is in the 4D file: checked on load, naming the case
    root = make_dataset(tmp_path / "c", "msd", n=2, channels=2)
    cases = read_decathlon(root)
    with pytest.raises(DatasetError, match="case_000.*mixed channel counts"):
        load_case(cases[0], num_channels=3)


def test_bad_manifests_name_the_file(tmp_path, mr_dataset):
    image = mr_dataset / "imagesTr" / "case_000_0000.nii.gz"
    label = mr_dataset / "labelsTr" / "case_000.nii.gz"
    missing = _write_manifest(
        tmp_path / "a.csv",
        [{"image": str(image), "label": str(tmp_path / "nope.nii.gz")}],
        ["image", "label"],
    )
    with pytest.raises(DatasetError, match=r"row 2: label file does not exist: .*nope\.nii\.gz"):
        read_manifest(missing)
    no_column = _write_manifest(tmp_path / "b.csv", [{"img": str(image)}], ["img"])
    with pytest.raises(DatasetError, match="missing column 'image'"):
        read_manifest(no_column)
    mixed = _write_manifest(
        tmp_path / "c.csv",
        [
            {"image_0": str(image), "image_1": str(image), "label": str(label), "name": "a"},
            {"image_0": str(image), "image_1": "", "label": str(label), "name": "b"},
        ],
        ["image_0", "image_1", "label", "name"],
    )
    with pytest.raises(DatasetError, match="case 'b'.*mixed channel counts"):
        read_manifest(mixed)
    unlabelled_train = _write_manifest(
        tmp_path / "d.csv", [{"image": str(image), "split": "train"}], ["image", "split"]
    )
    with pytest.raises(DatasetError, match="needs a label"):
        read_manifest(unlabelled_train)


def test_find_images_groups_channel_files(v2_dataset, tmp_path):
    cases = find_images(v2_dataset / "imagesTr", num_channels=2, per_channel_files=True)
    assert [len(c.image_paths) for c in cases] == [2, 2, 2, 2] and cases[0].label_path is None
    auto = find_images(v2_dataset / "imagesTr")
    assert [c.name for c in auto] == [c.name for c in cases]
    single = find_images([v2_dataset / "imagesTr" / "case_000_0000.nii.gz"], per_channel_files=False)
    assert [c.name for c in single] == ["case_000"]
    with pytest.raises(DatasetError, match="does not exist"):
        find_images(tmp_path / "nothing_here")


# ------------------------------------------------------------------------------------- preprocessing


def test_nonzero_bbox_and_crop_of_a_hand_made_volume(tmp_path):
    image = np.zeros((10, 12, 14), np.float32)
    image[3:7, 5:6, 2:13] = 1.0
    image[4, 9, 4] = -2.0  # negative values count as non-zero
    assert nonzero_bbox(image != 0) == ((3, 7), (5, 10), (2, 13))
    assert nonzero_bbox(np.zeros((2, 3, 4), bool)) == ((0, 2), (0, 3), (0, 4))
    affine = _affine(1, (1.0, 1.0, 1.0))
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "x_0000.nii.gz")
    (case,) = find_images(tmp_path)
    result = preprocess_case(case, _plan(spacing=(1.0, 1.0, 1.0), normalization="none"))
    meta = result.meta
    assert meta["crop_bbox"] == [[3, 7], [5, 10], [2, 13]]
    assert meta["cropped_shape"] == [4, 5, 11] and result.image.shape == (1, 4, 5, 11)
    np.testing.assert_array_equal(result.image[0], image[3:7, 5:10, 2:13])
    # voxel (0, 0, 0) of the crop is voxel (3, 5, 2) of the original, in world coordinates
    np.testing.assert_allclose(np.asarray(meta["cropped_affine"])[:, 3], affine @ [3, 5, 2, 1])


def test_resampling_reaches_the_target_spacing(mr_dataset):
    case = read_decathlon(mr_dataset)[0]
    target = (1.25, 1.25, 1.25)
    result = preprocess_case(case, _plan(spacing=target))
    meta = result.meta
    np.testing.assert_allclose(meta["spacing"], target)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(meta["preprocessed_affine"])[:3, :3], axis=0), target
    )
    expected = [round(n * s / t) for n, s, t in zip(meta["cropped_shape"], SPACING, target, strict=True)]
    assert meta["preprocessed_shape"] == expected
    assert result.image.shape[1:] == tuple(expected) == result.label.shape[1:]
    assert set(np.unique(result.label).tolist()) == {0, 1, 2}
    # the new grid keeps the centre of the cropped grid
    centre = lambda a, s: np.asarray(a) @ np.r_[(np.asarray(s) - 1) / 2, 1]  # noqa: E731
    np.testing.assert_allclose(
        centre(meta["preprocessed_affine"], expected), centre(meta["cropped_affine"], meta["cropped_shape"])
    )


def test_zscore_over_the_nonzero_mask(mr_dataset):
    case = read_decathlon(mr_dataset)[2]
    result = preprocess_case(case, _plan(spacing=SPACING))  # no resampling: the mask is the crop box
    x = result.image[0]
    assert x.shape == tuple(b - a for a, b in CROP)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    # with a zero margin kept inside the crop, those voxels are excluded from the statistics and stay 0
    raw = tio.ScalarImage(case.image_paths[0]).data[0].numpy()
    inner = raw[BOX]
    expected = (inner - inner.mean(dtype=np.float64)) / inner.std(dtype=np.float64)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_ct_clipping_at_foreground_percentiles(tmp_path):
    """Two CT cases whose foreground holds 1..100 and 101..200: hand-computed percentiles and z-score."""
    root = tmp_path / "ct"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for i in range(2):
        image = np.full((8, 8, 8), 50.0, np.float32)
        label = np.zeros((8, 8, 8), np.uint8)
        image[2:6, 2:7, 2:7] = np.arange(1, 101).reshape(4, 5, 5) + 100 * i
        label[2:6, 2:7, 2:7] = 1
        image[0, 0, 0], image[7, 7, 7] = -1000.0, 5000.0  # outliers outside the label
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"ct_{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"ct_{i}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "file_ending": ".nii.gz"}
        )
    )
    cases = read_decathlon(root)
    plan = make_plan(cases, ("CT",), target_spacing=(1.0, 1.0, 1.0))
    (stats,) = plan.intensity
    assert plan.normalization == ("ct",)
    # foreground = 1..200: linear-interpolated percentiles 1 + 199·q, mean 100.5, std sqrt((200² − 1)/12)
    lower, upper, mean, std = 1 + 199 * 0.005, 1 + 199 * 0.995, 100.5, np.sqrt((200**2 - 1) / 12)
    np.testing.assert_allclose([stats.lower, stats.upper, stats.mean, stats.std], [lower, upper, mean, std])
    x = preprocess_case(cases[0], plan).image[0]
    np.testing.assert_allclose(x[0, 0, 0], (lower - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(x[7, 7, 7], (upper - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(x[1, 1, 1], (50 - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(x[3, 2, 2], (26 - mean) / std, rtol=1e-5)


def test_plan_json_round_trip():
    """The cache's worker processes rebuild the plan from its JSON: every field and the key survive."""
    from mambaclinix.data.normalization import IntensityStats

    stats = IntensityStats(10.0, 2.0, -5.0, 40.0)
    plan = PreprocessingPlan((1.5, 0.75, 3.0), ("ct", "zscore"), (stats, None), "linear", "onehot_linear")
    back = PreprocessingPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back == plan and back.key == plan.key
    assert back.intensity[0] == stats and back.intensity[1] is None


def test_cache_hit_and_invalidation(mr_dataset, tmp_path):
    cases = read_decathlon(mr_dataset)[:2]
    plan = _plan(spacing=(1.5, 1.5, 1.5))
    first = preprocess_to_cache(cases, plan, tmp_path)
    assert [e.from_cache for e in first] == [False, False]
    assert all(e.directory.parent == tmp_path / plan.key for e in first)
    stamps = [os.stat(e.directory / "meta.json").st_mtime_ns for e in first]
    second = preprocess_to_cache(cases, plan, tmp_path)
    assert [e.from_cache for e in second] == [True, True]
    assert [os.stat(e.directory / "meta.json").st_mtime_ns for e in second] == stamps
    np.testing.assert_array_equal(np.load(second[0].image_path), np.load(first[0].image_path))
    assert second[0].meta["preprocessed_shape"] == first[0].meta["preprocessed_shape"]
    # another parameter → another plan folder, recomputed
    other = preprocess_to_cache(cases, _plan(spacing=(1.5, 1.5, 1.5), image_interpolation="linear"), tmp_path)
    assert [e.from_cache for e in other] == [False, False] and other[0].directory != first[0].directory
    # a modified source file → only that case is recomputed
    label = cases[1].label_path
    os.utime(label, ns=(os.stat(label).st_atime_ns, os.stat(label).st_mtime_ns + 10**9))
    third = preprocess_to_cache(cases, plan, tmp_path)
    assert [e.from_cache for e in third] == [True, False]
    assert not list(tmp_path.glob(f"{plan.key}/.*tmp*"))  # no temporary leftovers


def test_cache_with_worker_processes(mr_dataset, tmp_path):
    cases = read_decathlon(mr_dataset)[:2]
    entries = preprocess_to_cache(cases, _plan(spacing=(1.5, 1.5, 1.5)), tmp_path, num_workers=2)
    assert [e.from_cache for e in entries] == [False, False]
    serial = preprocess_case(cases[1], _plan(spacing=(1.5, 1.5, 1.5)))
    np.testing.assert_array_equal(np.load(entries[1].image_path), serial.image)


# ----------------------------------------------------------------------------------------- inversion


def _onehot(label: np.ndarray, k: int = 3) -> torch.Tensor:
    return (
        torch.nn.functional.one_hot(torch.from_numpy(label.astype(np.int64)), k).permute(3, 0, 1, 2).float()
    )


def test_invert_to_original_is_exact_without_resampling(mr_dataset):
    case = read_decathlon(mr_dataset)[1]
    result = preprocess_case(case, _plan(spacing=SPACING))
    inverted = invert_to_original(_onehot(result.label[0]), _meta(result))
    original = tio.LabelMap(case.label_path).data[0]
    assert inverted.shape == (3, *tio.ScalarImage(case.image_paths[0]).data.shape[1:])
    assert torch.equal(inverted.argmax(0), original.long())
    # outside the crop box: the default background is one-hot channel 0
    assert torch.equal(inverted[:, 0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    filled = invert_to_original(_onehot(result.label[0]), _meta(result), background=[-5.0, 1.0, 2.0])
    assert torch.equal(filled[:, 0, 0, 0], torch.tensor([-5.0, 1.0, 2.0]))


def _meta(result):
    from mambaclinix.data.preprocessing import meta_from_json

    return meta_from_json(result.meta)


@pytest.mark.parametrize("label_interpolation", ["nearest", "onehot_linear"])
def test_invert_to_original_round_trip_with_resampling(mr_dataset, label_interpolation):
    case = read_decathlon(mr_dataset)[3]
    result = preprocess_case(case, _plan(spacing=(1.3, 1.3, 1.3), label_interpolation=label_interpolation))
    assert result.image.shape[1:] != tuple(b - a for a, b in CROP)
    inverted = invert_to_original(_onehot(result.label[0]), _meta(result))
    original = tio.LabelMap(case.label_path).data[0].long()
    assert inverted.shape[1:] == tio.ScalarImage(case.image_paths[0]).data.shape[1:]
    predicted = inverted.argmax(0)
    assert (predicted == original).float().mean() > 0.95
    for cls in (1, 2):  # the foreground lands where it was
        both = ((predicted == cls) & (original == cls)).sum()
        assert 2 * both / ((predicted == cls).sum() + (original == cls).sum()) > 0.8


def test_invert_to_original_aligns_with_an_nrrd_original(tmp_path, mr_dataset):
    source = read_decathlon(mr_dataset)[0]
    tio.ScalarImage(source.image_paths[0]).save(tmp_path / "img.nrrd")
    tio.LabelMap(source.label_path).save(tmp_path / "lab.nrrd")
    from mambaclinix.data.datasets import Case

    case = Case("nrrd", (tmp_path / "img.nrrd",), tmp_path / "lab.nrrd")
    result = preprocess_case(case, _plan(spacing=SPACING))
    inverted = invert_to_original(_onehot(result.label[0]), _meta(result))
    assert torch.equal(inverted.argmax(0), tio.LabelMap(tmp_path / "lab.nrrd").data[0].long())


def test_invert_to_original_checks_the_shape(mr_dataset):
    result = preprocess_case(read_decathlon(mr_dataset)[0], _plan(spacing=SPACING))
    with pytest.raises(ValueError, match="preprocessed shape"):
        invert_to_original(torch.zeros(3, 4, 4, 4), _meta(result))


# ------------------------------------------------------------------------------------------- sampler


def _blob_subject(shape=(32, 32, 32)) -> tio.Subject:
    label = torch.zeros(1, *shape, dtype=torch.int64)
    label[0, 2:4, 3:5, -4:-2] = 1
    label[0, shape[0] - 2, shape[1] - 3, 1] = 2
    image = torch.randn(1, *shape)
    return tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label), name="blob")


@pytest.mark.parametrize("probability", [0.0, 1 / 3, 1.0])
def test_sampler_foreground_fraction(probability):
    sampler = ForegroundOversamplingSampler((8, 8, 8), probability, seed=0)
    patches = list(sampler(_blob_subject(), num_patches=300))
    assert all(p.spatial_shape == (8, 8, 8) for p in patches)
    fraction = np.mean([bool((p["label"].data > 0).any()) for p in patches])
    uniform_rate = 0.1  # a uniform 8³ patch hits these 9 voxels in the 32³ volume rarely
    if probability == 1.0:
        assert fraction == 1.0
    elif probability == 0.0:
        assert fraction < uniform_rate
    else:
        assert fraction >= probability - 0.07
    # classes are chosen uniformly: the single class-2 voxel is hit about as often as class 1
    if probability == 1.0:
        class2 = np.mean([bool((p["label"].data == 2).any()) for p in patches])
        assert 0.35 < class2 < 0.65


def test_sampler_pads_small_volumes_and_is_seeded():
    subject = _blob_subject((6, 20, 5))
    sampler = ForegroundOversamplingSampler((8, 8, 8), 1.0)
    subject[SEED_KEY] = 123
    first = list(sampler(subject, num_patches=5))
    assert all(p["image"].data.shape == (1, 8, 8, 8) and (p["label"].data > 0).any() for p in first)
    assert subject[SEED_KEY] != 123  # advanced: a second round draws new patches
    subject[SEED_KEY] = 123
    again = list(sampler(subject, num_patches=5))
    assert all(torch.equal(a["image"].data, b["image"].data) for a, b in zip(first, again, strict=True))
    # the patch keeps world coordinates: its affine places voxel 0 where the volume has it
    patch = first[0]
    start = patch["location"][:3].numpy()
    offsets = np.array([(8 - 6) // 2, 0, (8 - 5) // 2])  # voxels padded before, per axis
    padded_origin = -offsets.astype(float)  # identity affine
    np.testing.assert_allclose(patch["image"].affine[:3, 3], padded_origin + start)


# -------------------------------------------------------------------------------------- augmentation


def _image_subject(channels: int = 2) -> tio.Subject:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(channels, 12, 14, 10, generator=generator) * 4 - 1
    label = (image[:1] > 1).long()
    return tio.Subject(
        image=tio.ScalarImage(tensor=image, affine=np.diag([1.0, 1.5, 2.0, 1.0])),
        label=tio.LabelMap(tensor=label),
    )


@pytest.mark.parametrize(
    "transform",
    [
        RandomBrightness(),
        RandomContrast(),
        RandomLowResolution(p_per_channel=1.0),
        RandomIntensityGamma(),
        RandomIntensityGamma(invert=True),
        RandomGaussianNoise(),
        RandomVoxelBlur(),
        RandomRotateScale(p_rotation=1.0, p_scale=1.0),
    ],
    ids=lambda t: t.name + ("_inv" if getattr(t, "invert", False) else ""),
)
def test_random_transforms_are_reproducible(transform):
    subject = _image_subject()
    outputs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outputs.append(transform(subject)["image"].data)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[0], subject["image"].data)  # it did something; the input is intact
    assert outputs[0].shape == subject["image"].data.shape


def test_brightness_and_contrast_on_constant_and_two_level_images():
    constant = tio.Subject(image=tio.ScalarImage(tensor=torch.full((2, 4, 4, 4), 2.0)))
    assert torch.allclose(Brightness([1.2, 0.8])(constant)["image"].data[0], torch.tensor(2.4))
    assert torch.allclose(Brightness([1.2, 0.8])(constant)["image"].data[1], torch.tensor(1.6))
    assert torch.equal(Contrast(1.7)(constant)["image"].data, constant["image"].data)
    torch.manual_seed(0)
    for _ in range(10):
        out = RandomBrightness(p=1)(constant)["image"].data
        factors = out.flatten(1)[:, 0] / 2
        assert torch.all(out == out.flatten(1)[:, :1].reshape(2, 1, 1, 1))  # still constant per channel
        assert torch.all((factors >= 0.75) & (factors <= 1.25))
        assert torch.equal(RandomContrast(p=1)(constant)["image"].data, constant["image"].data)
    two = torch.zeros(1, 4, 4, 4)
    two[:, :2] = 1.0  # mean 0.5
    out = Contrast(0.5)(tio.Subject(image=tio.ScalarImage(tensor=two)))["image"].data
    assert set(out.unique().tolist()) == {0.25, 0.75}
    out = Contrast(3.0)(tio.Subject(image=tio.ScalarImage(tensor=two)))["image"].data
    assert set(out.unique().tolist()) == {0.0, 1.0}  # stretched, then clipped to the original range


def test_gamma_and_low_resolution_by_hand():
    ramp = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    subject = tio.Subject(image=tio.ScalarImage(tensor=ramp))
    out = IntensityGamma(2.0, retain_stats=False)(subject)["image"].data
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.0, 0.25, 1.0]))
    kept = IntensityGamma(2.0)(subject)["image"].data
    assert torch.allclose(kept.mean(), ramp.mean(), atol=1e-6) and torch.allclose(
        kept.std(), ramp.std(), atol=1e-6
    )
    assert torch.allclose(IntensityGamma(1.0, invert=True)(subject)["image"].data, ramp, atol=1e-6)
    image = torch.arange(64.0).reshape(1, 4, 4, 4)
    one = tio.Subject(image=tio.ScalarImage(tensor=image))
    assert torch.equal(LowResolution(1.0)(one)["image"].data, image)
    low = LowResolution(0.5)(one)["image"].data
    assert low.shape == image.shape and not torch.equal(low, image)


def test_nnunet_augmentation_keeps_labels_and_shapes():
    subject = _image_subject()
    subject["label"] = tio.LabelMap(tensor=torch.randint(0, 3, (1, 12, 14, 10)))
    torch.manual_seed(0)
    pipeline = nnunet_augmentation(p_scale=3.0)  # probabilities ×3 (capped at 1) to exercise everything
    for _ in range(3):
        out = pipeline(subject)
        assert out["image"].data.shape == subject["image"].data.shape
        assert set(out["label"].data.unique().tolist()) <= {0, 1, 2}
    none = nnunet_augmentation(p_scale=0.0)(subject)
    assert torch.equal(none["image"].data, subject["image"].data)


# ---------------------------------------------------------------------------------------- datamodule


def _datamodule(root: Path, tmp_path: Path, **kwargs) -> SegmentationDataModule:
    defaults = dict(
        data_dir=str(root),
        patch_size=(16, 16, 16),
        batch_size=2,
        samples_per_volume=2,
        num_workers=0,
        val_fraction=0.25,
        target_spacing=(1.5, 1.5, 1.5),
        cache_dir=str(tmp_path / "cache"),
    )
    defaults.update(kwargs)
    return SegmentationDataModule(**defaults)


def test_datamodule_fit_batches(v2_dataset, tmp_path):
    dm = _datamodule(v2_dataset, tmp_path, iterations_per_epoch=3)
    assert (dm.num_channels, dm.num_classes, dm.class_names) == (2, 3, ["background", "organ", "tumour"])
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    batch = batches[0]
    assert set(batch) == {"image", "label", "name", "meta"}
    assert batch["image"].shape == (2, 2, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.int64
    assert len(batch["name"]) == 2 and all(isinstance(m, dict) for m in batch["meta"])
    (val,) = list(dm.val_dataloader())
    meta = val["meta"][0]
    assert val["image"].shape == (1, 2, *meta["preprocessed_shape"])
    assert val["label"].shape == (1, 1, *meta["preprocessed_shape"])
    assert meta["spacing"] == (1.5, 1.5, 1.5) and meta["name"] == val["name"][0]
    for key in ("image_paths", "original_shape", "original_affine", "crop_bbox", "cropped_affine"):
        assert key in meta
    assert meta["original_affine"].shape == (4, 4)


def test_datamodule_training_is_deterministic(v2_dataset, tmp_path):
    def first_batches(seed):
        dm = _datamodule(v2_dataset, tmp_path, seed=seed, iterations_per_epoch=2)
        dm.prepare_data()
        dm.setup("fit")
        return list(dm.train_dataloader())

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))


def test_training_batches_do_not_depend_on_the_worker_count(v2_dataset, tmp_path):
    def batches(workers):
        dm = _datamodule(v2_dataset, tmp_path, num_workers=workers, iterations_per_epoch=3)
        dm.prepare_data()
        dm.setup("fit")
        return list(dm.train_dataloader())

    for x, y in zip(batches(0), batches(2), strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["name"] == y["name"]


def test_queue_length_is_deprecated_and_oversampling_checked(v2_dataset, tmp_path):
    with pytest.warns(FutureWarning, match="queue_length"):
        _datamodule(v2_dataset, tmp_path, queue_length=64)
    with pytest.raises(ValueError, match="oversampling"):
        _datamodule(v2_dataset, tmp_path, oversampling="queue")


def test_split_is_deterministic_and_disjoint(v2_dataset, tmp_path):
    names = lambda cases: [c.name for c in cases]  # noqa: E731
    train, val = _datamodule(v2_dataset, tmp_path, val_fraction=0.5).split()
    again = _datamodule(v2_dataset, tmp_path, val_fraction=0.5).split()
    assert (names(train), names(val)) == (names(again[0]), names(again[1]))
    assert len(val) == 2 and not set(names(train)) & set(names(val))
    assert sorted(names(train) + names(val)) == [f"case_{i:03d}" for i in range(4)]
    vals = [names(_datamodule(v2_dataset, tmp_path, fold=f, num_folds=2).split()[1]) for f in range(2)]
    assert not set(vals[0]) & set(vals[1])
    assert sorted(vals[0] + vals[1]) == [f"case_{i:03d}" for i in range(4)]
    for f in range(2):
        train, val = _datamodule(v2_dataset, tmp_path, fold=f, num_folds=2).split()
        assert sorted(names(train)) == sorted(vals[1 - f])


def test_simulated_ddp_gives_each_rank_its_own_subjects(v2_dataset, tmp_path, monkeypatch):
    dm = _datamodule(v2_dataset, tmp_path, val_fraction=0.0, samples_per_volume=1, batch_size=1)
    dm.prepare_data()
    dm.setup("fit")
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        loader = dm.train_dataloader()
        sampler = dm.train_subject_sampler
        assert isinstance(sampler, torch.utils.data.DistributedSampler)
        assert (sampler.num_replicas, sampler.rank) == (2, rank)
        indices = {dm.train_subjects[i]["name"] for i in sampler}
        names = {n for batch in loader for n in batch["name"]}
        assert names == indices and len(names) == 2
        seen.append(names)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"case_{i:03d}" for i in range(4)}


def test_predict_and_test_loaders(tmp_path):
    root = make_dataset(tmp_path / "ds", "v2", n=3, n_test=1, test_labels=True, modality="CT")
    dm = _datamodule(root, tmp_path, target_spacing=None)
    dm.prepare_data()
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    assert batch["name"] == ["case_003"] and batch["label"].dtype == torch.int64
    assert batch["meta"][0]["normalization"] == ("ct",)
    np.testing.assert_allclose(batch["meta"][0]["spacing"], SPACING)  # the median spacing
    # predicting a folder of images without labels
    folder = tmp_path / "to_predict"
    folder.mkdir()
    shutil.copy(root / "imagesTr" / "case_000_0000.nii.gz", folder / "new_0000.nii.gz")
    dm = _datamodule(root, tmp_path, target_spacing=None, predict_dir=str(folder))
    dm.prepare_data()
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert set(batch) == {"image", "name", "meta"} and batch["name"] == ["new"]
    meta = batch["meta"][0]
    assert meta["image_paths"] == [str(folder / "new_0000.nii.gz")]
    probs = torch.softmax(torch.randn(3, *batch["image"].shape[2:]), 0)
    full = invert_to_original(probs, meta)
    assert full.shape[1:] == tio.ScalarImage(folder / "new_0000.nii.gz").data.shape[1:]


def test_datamodule_from_a_manifest(tmp_path, mr_dataset):
    rows = []
    for i in range(4):
        name = f"case_{i:03d}"
        rows.append(
            {
                "image": str(mr_dataset / "imagesTr" / f"{name}_0000.nii.gz"),
                "label": str(mr_dataset / "labelsTr" / f"{name}.nii.gz"),
                "split": "val" if i == 3 else "train",
            }
        )
    manifest = _write_manifest(tmp_path / "m.csv", rows, ["image", "label", "split"])
    dm = SegmentationDataModule(
        manifest=str(manifest), patch_size=(8, 8, 8), samples_per_volume=1, num_workers=0,
        augment=False, target_spacing=(2.0, 2.0, 2.0),
    )  # fmt: skip
    assert (dm.num_channels, dm.num_classes) == (1, 3)
    train, val = dm.split()
    assert [c.name for c in val] == ["case_003"] and len(train) == 3
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / ".mambaclinix_cache").is_dir()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 8, 8, 8)


def test_datamodule_rejects_bad_arguments(v2_dataset):
    with pytest.raises(ValueError, match="exactly one of data_dir"):
        SegmentationDataModule()
    with pytest.raises(ValueError, match="patch_size"):
        SegmentationDataModule(data_dir=str(v2_dataset), patch_size=(16, 16))
    with pytest.raises(ValueError, match="fold"):
        SegmentationDataModule(data_dir=str(v2_dataset), fold=5, num_folds=5)
    with pytest.raises(ValueError, match="normalization"):
        SegmentationDataModule(data_dir=str(v2_dataset), normalization="minmax")
