"""Tests of the embedded demo dataset (``mambaclinix.demo``) and the k-means tissue baseline.

The dataset tests build one tiny dataset per session (2 training + 1 test case at 4 mm, ≈ 6 s) with every
socket connection forbidden, so they also prove that nothing is downloaded. The k-means tests need
neither nilearn nor TorchIO.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from mambaclinix.demo import build_demo_dataset, kmeans_tissue_baseline
from mambaclinix.metrics.functional import dice_score

needs_nilearn = pytest.mark.skipif(
    importlib.util.find_spec("nilearn") is None, reason='needs nilearn: pip install "mambaclinix[demo]"'
)

TINY = {"n_train": 2, "n_test": 1, "spacing": 4.0, "seed": 0}
LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}


def _no_network(*args, **kwargs):
    raise AssertionError(f"the demo dataset tried to open a network connection: {args!r}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket.socket, "connect_ex", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        assert build_demo_dataset(out, **TINY) == out
    return out


def _entries(root: Path) -> list[dict]:
    meta = json.loads((root / "dataset.json").read_text())
    return meta["training"] + meta["test"]


def _load(path: Path):
    import nibabel as nib

    return nib.load(str(path))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------------
# Layout and content


@needs_nilearn
def test_layout_and_dataset_json(tiny):
    meta = json.loads((tiny / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1"} and meta["modality"] == {"0": "T1"}
    assert meta["labels"] == LABELS
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert meta["file_ending"] == ".nii.gz" and meta["tensorImageSize"] == "3D"
    assert "ICBM152" in meta["licence"] and "Louis Collins" in meta["licence"]
    assert "Fonov" in meta["reference"] and meta["name"] and meta["description"]
    train_ids = [Path(e["label"]).name.removesuffix(".nii.gz") for e in meta["training"]]
    test_ids = [Path(e["label"]).name.removesuffix(".nii.gz") for e in meta["test"]]
    assert train_ids == ["brain_000", "brain_001"] and test_ids == ["brain_002"]
    for split, (img_dir, lab_dir) in (
        ("training", ("imagesTr", "labelsTr")),
        ("test", ("imagesTs", "labelsTs")),
    ):
        for entry, case in zip(meta[split], train_ids if split == "training" else test_ids, strict=True):
            assert entry == {
                "image": f"./{img_dir}/{case}_0000.nii.gz",
                "label": f"./{lab_dir}/{case}.nii.gz",
            }
    listed = {(tiny / f).resolve() for e in _entries(tiny) for f in e.values()}
    on_disk = {p.resolve() for p in tiny.rglob("*.nii.gz")}
    assert listed == on_disk and all(p.is_file() for p in listed)
    assert sorted(p.name for p in tiny.iterdir()) == [
        "dataset.json",
        "imagesTr",
        "imagesTs",
        "labelsTr",
        "labelsTs",
    ]
    assert not [p for p in tiny.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@needs_nilearn
def test_images_and_labels_agree(tiny):
    for entry in _entries(tiny):
        img, lab = _load(tiny / entry["image"]), _load(tiny / entry["label"])
        assert img.shape == lab.shape and len(img.shape) == 3
        assert all(30 <= n <= 60 for n in img.shape), img.shape  # brain ≈ 145×181×155 mm at 4 mm + margin
        assert np.array_equal(img.affine, lab.affine)
        np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 4.0, rtol=1e-6)
        for hdr in (img.header, lab.header):
            assert np.array_equal(hdr.get_best_affine(), img.affine) and int(hdr["sform_code"]) == 1
        assert img.get_data_dtype() == np.float32 and lab.get_data_dtype() == np.uint8
        image, labels = np.asarray(img.dataobj), np.asarray(lab.dataobj)
        assert np.isfinite(image).all()
        assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
        # T1 contrast: CSF darkest, WM brightest (the bias field is smooth, the noise small).
        means = [float(image[labels == k].mean()) for k in (1, 2, 3)]
        assert means[0] < means[1] < means[2]
        # The crop keeps an 8 mm (2-voxel) margin around the brain.
        brain = np.argwhere(labels > 0)
        assert (brain.min(axis=0) == 2).all() and (np.array(labels.shape) - 1 - brain.max(axis=0) == 2).all()


@needs_nilearn
def test_template_labelling_rule():
    """The 1 mm template channels against nilearn's own maps, loaded independently here."""
    from nilearn import datasets

    from mambaclinix.demo import cases as demo

    _, tissue, affine = demo._load_template()
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj).astype(bool)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    brain = tissue[0] > 0
    assert np.array_equal(affine, datasets.load_mni152_template(resolution=1).affine)
    assert (brain >= mask).all() and int((brain & ~mask).sum()) == 6  # nilearn's mask, 6 holes filled
    np.testing.assert_allclose(tissue[1], brain * gm, atol=1e-6)
    np.testing.assert_allclose(tissue[2], brain * wm, atol=1e-6)
    labels = demo.tissue_labels(brain, brain * (1 - gm - wm), tissue[1], tissue[2])
    expected = np.where(brain, 1 + np.argmax(np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm]), axis=0), 0)
    assert np.array_equal(labels, expected)
    np.testing.assert_allclose(demo.class_fractions(labels), [0.083, 0.579, 0.338], atol=5e-4)


# ----------------------------------------------------------------------------------------------------
# Randomness: reproducible, varied, close to the template


@needs_nilearn
def test_same_seed_gives_identical_files(tiny, tmp_path):
    again = build_demo_dataset(tmp_path / "again", **TINY)
    assert _digests(again) == _digests(tiny)


@needs_nilearn
def test_other_seed_and_other_cases_differ(tiny):
    from mambaclinix.demo import make_case

    first = np.asarray(_load(tiny / _entries(tiny)[0]["label"]).dataobj)
    image, labels, affine = make_case(seed=0, index=0, spacing=4.0)  # the same case, in memory
    assert np.array_equal(labels, first)
    assert np.array_equal(image, np.asarray(_load(tiny / _entries(tiny)[0]["image"]).dataobj))
    other_image, other_labels, other_affine = make_case(seed=1, index=0, spacing=4.0)
    assert other_labels.shape != labels.shape or not np.array_equal(other_labels, labels)
    assert other_image.shape != image.shape or not np.allclose(other_image, image, atol=0.05)
    second = np.asarray(_load(tiny / _entries(tiny)[1]["label"]).dataobj)
    assert second.shape != first.shape or not np.array_equal(second, first)


@needs_nilearn
def test_subjects_are_deformed_but_close_to_the_template(tiny):
    """In world coordinates, each subject overlaps the undeformed template but is not equal to it.

    With translations ≤ 10 mm per axis, rotations ≤ 10°, scaling 0.9–1.1 and ≤ 7.5 mm elastic
    displacement, the brain masks still overlap well (Dice > 0.7; observed 0.82–0.87) but never coincide
    (Dice < 0.97). A mild deformation keeps the tissue proportions (within 1.5 points of the template's on
    the same grid: interpolation moves thin CSF a little) and the brain volume within the scaling range
    [0.9³, 1.1³] widened by 5 % for the elastic part.
    """
    import torch
    import torchio as tio

    from mambaclinix import demo

    template = demo.template_subject(4.0)
    tpl_labels = demo.subject_labels(template)
    reference = tio.LabelMap(
        tensor=torch.from_numpy(tpl_labels[None].astype(np.int16)), affine=template["image"].affine
    )
    tpl_fractions = np.array(demo.class_fractions(tpl_labels))
    for entry in _entries(tiny):
        subject = tio.LabelMap(tiny / entry["label"])
        labels = subject.data.numpy()[0]
        on_template_grid = tio.Resample(reference)(subject).data.numpy()[0]  # nearest neighbour
        assert 0.7 < dice_score(on_template_grid > 0, tpl_labels > 0) < 0.97
        np.testing.assert_allclose(demo.class_fractions(labels), tpl_fractions, atol=0.015)
        volume_ratio = (labels > 0).sum() / (tpl_labels > 0).sum()
        assert 0.9**3 * 0.95 < volume_ratio < 1.1**3 * 1.05


# ----------------------------------------------------------------------------------------------------
# Idempotence, atomicity, errors


@needs_nilearn
def test_second_call_does_nothing(tiny, caplog):
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    with caplog.at_level(logging.INFO, logger="mambaclinix.demo.dataset"):
        assert build_demo_dataset(tiny, **TINY) == tiny
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before
    assert "already complete" in caplog.text


@needs_nilearn
def test_incomplete_foreign_or_different_dataset_raises_and_overwrite_rebuilds(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    missing = broken / _entries(broken)[-1]["label"]
    missing.unlink()
    with pytest.raises(FileExistsError, match="incomplete"):
        build_demo_dataset(broken, **TINY)
    assert not missing.exists()
    with pytest.raises(FileExistsError, match="other arguments"):
        build_demo_dataset(tiny, **{**TINY, "seed": 1})
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory"):
        build_demo_dataset(a_file, **TINY)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no dataset.json"):
        build_demo_dataset(foreign, **TINY)
    assert (foreign / "notes.txt").read_text() == "mine"

    assert build_demo_dataset(broken, **TINY, overwrite=True) == broken
    assert _digests(broken) == _digests(tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "broken", "foreign"]  # no temporary left


@needs_nilearn
def test_a_concurrent_build_that_finished_first_is_kept(tiny, tmp_path, monkeypatch, caplog):
    """Another process publishes ``out`` while this build is writing: a complete dataset with the same
    arguments is kept (ours is discarded), one with other arguments is refused; no temporary remains."""
    from mambaclinix.demo import dataset

    def competitor_finishes_first(seed):
        def write(root, *args):
            (root / "ours.txt").write_text("discarded")
            shutil.copytree(tiny, out)
            if seed != TINY["seed"]:
                meta = json.loads((out / "dataset.json").read_text())
                meta["mambaclinix_demo"]["seed"] = seed
                (out / "dataset.json").write_text(json.dumps(meta))

        return write

    out = tmp_path / "out"
    monkeypatch.setattr(dataset, "_write_dataset", competitor_finishes_first(TINY["seed"]))
    with caplog.at_level(logging.INFO, logger="mambaclinix.demo.dataset"):
        assert build_demo_dataset(out, **TINY) == out
    assert "concurrent build" in caplog.text
    assert _digests(out) == _digests(tiny)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    shutil.rmtree(out)
    monkeypatch.setattr(dataset, "_write_dataset", competitor_finishes_first(1))
    with pytest.raises(FileExistsError, match="other arguments"):
        build_demo_dataset(out, **TINY)
    assert json.loads((out / "dataset.json").read_text())["mambaclinix_demo"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@needs_nilearn
def test_empty_existing_directory_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    build_demo_dataset(out, n_train=1, n_test=0, spacing=4.0)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and meta["test"] == []
    assert (out / "imagesTr" / "brain_000_0000.nii.gz").is_file()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"seed": -1}, "seed"),
        ({"n_train": 1.5}, "n_train"),
        ({"spacing": 0.5}, "spacing"),
        ({"spacing": float("nan")}, "spacing"),
        ({"spacing": "2mm"}, "spacing"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        build_demo_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_nilearn_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes `import nilearn` raise ImportError
    with pytest.raises(ImportError, match=r"pip install \"mambaclinix\[demo\]\""):
        build_demo_dataset(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_importing_the_packages_imports_neither_torchio_nor_nilearn():
    """Nor Lightning; and the data layer does not import the demo above it."""
    import subprocess

    heavy = ("torchio", "nilearn", "lightning")
    for package, forbidden in (
        ("mambaclinix.data", (*heavy, "mambaclinix.demo")),
        ("mambaclinix.demo", heavy),
    ):
        code = f"import sys, {package}; print([m for m in {forbidden!r} if m in sys.modules])"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "[]", package


# ----------------------------------------------------------------------------------------------------
# k-means baseline


def _phantom(rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three tissue slabs with intensities 0.8 (WM), 0.3 (CSF), 0.55 (GM) in that spatial order."""
    truth = np.zeros((12, 10, 8), dtype=np.uint8)
    truth[2:5], truth[5:8], truth[8:11] = 3, 1, 2
    truth[:, :, 0] = 0  # a slice outside the mask
    intensity = np.array([5.0, 0.3, 0.55, 0.8])[truth] + noise * rng.standard_normal(truth.shape)
    return intensity, truth > 0, truth


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_kmeans_recovers_a_three_intensity_phantom(noise):
    image, mask, truth = _phantom(np.random.default_rng(0), noise)
    pred = kmeans_tissue_baseline(image, mask)
    assert pred.dtype == np.uint8 and pred.shape == truth.shape
    assert np.array_equal(pred, truth)  # labels ordered by intensity, 0 outside the mask (which is bright)
    with pytest.raises(TypeError):  # iters is keyword-only: a 4th positional argument used to be a seed
        kmeans_tissue_baseline(image, mask, 3, 100)


def test_kmeans_hand_computed_1d():
    # Quantile init (1/6, 1/2, 5/6) → centres 2, 11, 21 after one update; the assignment is then stable.
    values = np.array([3.0, 1.0, 2.0, 12.0, 10.0, 11.0, 20.0, 22.0, 21.0])
    pred = kmeans_tissue_baseline(values, np.ones(9, dtype=bool))
    assert pred.tolist() == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    two = kmeans_tissue_baseline(values, np.ones(9, dtype=bool), n_classes=2)
    assert two.tolist() == [1, 1, 1, 1, 1, 1, 2, 2, 2]  # centres 6.5 and 21: 12 is nearer to 6.5


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((np.zeros((2, 2)), np.ones((2, 3), dtype=bool)), "same shape"),
        ((np.zeros(4), np.array([0, 1, 2, 1])), "brain_mask"),
        ((np.zeros(4), np.ones(4, dtype=bool), 1), "n_classes"),
        ((np.zeros(4), np.array([True, True, False, False])), "at least n_classes"),
        ((np.array([0.0, np.nan, 1.0, 2.0]), np.ones(4, dtype=bool)), "finite"),
    ],
)
def test_kmeans_rejects_bad_input(args, name):
    with pytest.raises(ValueError, match=name):
        kmeans_tissue_baseline(*args)


@needs_nilearn
def test_kmeans_baseline_on_the_demo_data(tiny):
    """Well above a chance labelling with the same class proportions, well below perfect.

    Chance = the k-means labels randomly permuted inside the brain mask. Observed on this 4 mm dataset:
    CSF ≈ 0.31, GM ≈ 0.78, WM ≈ 0.80 (chance ≈ 0.03, 0.6, 0.3).
    """
    from mambaclinix.demo import kmeans_baseline_dice

    scores = kmeans_baseline_dice(tiny, split="training")
    assert set(scores) == {"CSF", "GM", "WM"} and all(len(v) == 2 for v in scores.values())
    rng = np.random.default_rng(0)
    training = json.loads((tiny / "dataset.json").read_text())["training"]
    for entry, csf, gm, wm in zip(training, scores["CSF"], scores["GM"], scores["WM"], strict=True):
        image = np.asarray(_load(tiny / entry["image"]).dataobj)
        ref = np.asarray(_load(tiny / entry["label"]).dataobj)
        pred = kmeans_tissue_baseline(image, ref > 0)
        shuffled = pred.copy()
        shuffled[ref > 0] = rng.permutation(pred[ref > 0])
        for k, score in zip((1, 2, 3), (csf, gm, wm), strict=True):
            assert score == pytest.approx(dice_score(pred == k, ref == k))
            assert dice_score(shuffled == k, ref == k) + 0.1 < score < 0.95
