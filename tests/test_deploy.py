"""Model packages: export from a checkpoint, safe reading (tampering, truncation, pickles), the Predictor,
ensembles, the ONNX engine's wiring, and ``mambaclinix predict -i -o -m`` case handling.

The checkpoints here are written by hand (an untrained tiny network and its prediction metadata), so the
tests run in seconds; tests/test_deploy_e2e.py trains, exports and predicts through the command line.
"""

import hashlib
import json
import pickle
import sys
import types
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mambaclinix.cli import main
from mambaclinix.data.cases import find_images
from mambaclinix.data.preprocessing import PreprocessingPlan
from mambaclinix.deploy.checkpoint import read_checkpoint
from mambaclinix.deploy.metadata import CHECKPOINT_KEY, CROP_RULE, PackageError
from mambaclinix.deploy.package import export_package, read_package
from mambaclinix.deploy.predictor import Predictor, load_model
from mambaclinix.inference import ensemble_probabilities, sliding_window_inference
from mambaclinix.models import create_model

SHAPE = (14, 12, 10)


def _metadata(num_classes: int = 3, tta: bool = False, channels: int = 1) -> dict:
    plan = PreprocessingPlan((1.0, 1.0, 1.0), ("zscore",) * channels, (None,) * channels)
    names = ["background", "organ", "tumour"][:num_classes]
    return {
        "network": {"name": "mambaclinix_tiny", "kwargs": {}},
        "in_channels": channels,
        "num_classes": num_classes,
        "channel_names": ["T1", "T2"][:channels] if channels > 1 else ["MRI"],
        "labels": {n: i for i, n in enumerate(names)},
        "file_ending": ".nii.gz",
        "plan": plan.to_json(),
        "crop": CROP_RULE,
        "patch_size": [16, 16, 16],
        "sliding_window": {"batch_size": 2, "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125},
        "mirror_axes": [0, 1, 2],
        "tta": tta,
        "versions": {"mambaclinix": "0.1.0", "torch": str(torch.__version__)},
        "card": {
            "dataset": "synthetic",
            "training_cases": 4,
            "fold": None,
            "training_steps": 2,
            "validation_dice": {"organ": 0.5},
            "date": "2026-01-01T00:00:00+00:00",
        },  # fmt: skip
    }


def _checkpoint(path: Path, seed: int = 0, fold=None, channels: int = 1, **net_kwargs) -> Path:
    torch.manual_seed(seed)
    net = create_model("mambaclinix_tiny", in_channels=channels, out_channels=3, **net_kwargs)
    meta = _metadata(channels=channels)
    meta["card"]["fold"] = fold
    meta["network"]["kwargs"] = json.loads(json.dumps(net_kwargs))
    ckpt = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "global_step": 2,
            CHECKPOINT_KEY: meta}  # fmt: skip
    torch.save(ckpt, path)
    return path


def _image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = np.zeros(SHAPE, np.float32)
    data[2:12, 1:11, 1:9] = rng.normal(100, 20, (10, 10, 8))
    affine = np.diag([1.2, -0.9, 1.5, 1.0])
    affine[:3, 3] = [4.0, -7.0, 2.0]
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def package(tmp_path):
    return export_package([_checkpoint(tmp_path / "a.ckpt")], tmp_path / "pkg")


# ------------------------------------------------------------------------------------------- export


def test_the_package_holds_safetensors_weights_equal_to_the_checkpoints(package, tmp_path):
    files = sorted(p.name for p in package.iterdir())
    assert files == ["fold_0.safetensors", "model.json"]
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    net = load_model(package)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, ckpt["state_dict"][f"net.{key}"], rtol=0, atol=0)
    model = json.loads((package / "model.json").read_text())
    assert model["card"]["validation_dice"] == {"organ": 0.5}
    assert (
        model["folds"][0]["sha256"]
        == hashlib.sha256((package / "fold_0.safetensors").read_bytes()).hexdigest()
    )


def test_a_planned_topology_survives_the_package(tmp_path):
    """Network arguments such as a planner writes (1x3x3 kernels, anisotropic strides) are rebuilt from
    model.json's lists; the network computes what the checkpoint's did."""
    kwargs = {"kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
              "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}  # fmt: skip
    ckpt = _checkpoint(tmp_path / "p.ckpt", **kwargs)
    net = load_model(export_package([ckpt], tmp_path / "pkg"))
    torch.manual_seed(0)
    ref = create_model("mambaclinix_tiny", in_channels=1, out_channels=3,
                       kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                       strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2))).eval()  # fmt: skip
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=0)


def test_a_zip_package_predicts_as_the_folder(package, tmp_path):
    zipped = export_package([tmp_path / "a.ckpt"], tmp_path / "pkg", as_zip=True)
    assert zipped.name == "pkg.zip" and zipfile.is_zipfile(zipped)
    image = _image(tmp_path / "img.nii.gz")
    a = Predictor(package, device="cpu").predict(image)
    b = Predictor(zipped, device="cpu").predict(image)
    np.testing.assert_array_equal(a, b)


def test_export_replaces_a_package_but_not_another_folder(package, tmp_path):
    export_package([tmp_path / "a.ckpt"], package)  # a second export over the first
    assert sorted(p.name for p in package.iterdir()) == ["fold_0.safetensors", "model.json"]
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(PackageError, match="not a model package"):
        export_package([tmp_path / "a.ckpt"], other)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_checkpoint_without_metadata_says_how_to_re_export(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)}}, path)
    with pytest.raises(PackageError, match="older mambaclinix.*export that one"):
        read_checkpoint(path)
    torch.save(
        {"state_dict": {}, CHECKPOINT_KEY: {"error": "the network was given as a module object"}}, path
    )
    with pytest.raises(PackageError, match="module object"):
        read_checkpoint(path)


def test_folds_that_differ_in_preprocessing_are_refused(tmp_path):
    a = _checkpoint(tmp_path / "a.ckpt")
    b = tmp_path / "b.ckpt"
    ckpt = torch.load(a, weights_only=False)
    ckpt[CHECKPOINT_KEY]["plan"]["target_spacing"] = [2.0, 2.0, 2.0]
    torch.save(ckpt, b)
    with pytest.raises(PackageError, match="differs .* in plan"):
        export_package([a, b], tmp_path / "pkg")


# ---------------------------------------------------------------------------------------- safety


def _rewrite_json(package: Path, change) -> None:
    model = json.loads((package / "model.json").read_text())
    change(model)
    (package / "model.json").write_text(json.dumps(model))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=99), "format version 99 is not supported"),
        (lambda m: m.pop("plan"), "missing field 'plan'"),
        (lambda m: m.pop("folds"), "missing field 'folds'"),
        (lambda m: m["network"].update(kwargs={"features_per_stage": [8, 8, 16, 16]}), "wrong shapes"),
        (lambda m: m["network"].update(name="os.system"), "unknown network preset"),
        (lambda m: m.update(labels={"background": 0, "organ": 1}), "'labels'"),
        (lambda m: m["folds"][0].update(weights="../../a.ckpt"), "must be a file name in the package"),
    ],
)
def test_a_tampered_model_json_is_refused(package, change, message):
    _rewrite_json(package, change)
    with pytest.raises(PackageError, match=message):
        Predictor(package, device="cpu")


def test_truncated_packages_are_refused(package, tmp_path):
    zipped = export_package([tmp_path / "a.ckpt"], tmp_path / "z", as_zip=True)
    data = zipped.read_bytes()
    zipped.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="truncated or not a zip"):
        read_package(zipped)
    weights = package / "fold_0.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PackageError, match="damaged or was replaced"):
        load_model(package)
    weights.unlink()
    with pytest.raises(PackageError, match="cannot read fold_0.safetensors"):
        load_model(package)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_pickle_in_place_of_the_weights_is_refused_and_not_run(package, tmp_path):
    _Payload.marker = str(tmp_path / "code-was-executed")
    data = pickle.dumps({"w": _Payload()})
    torch.save({"w": _Payload()}, tmp_path / "evil.pt")
    for payload in (data, (tmp_path / "evil.pt").read_bytes()):
        (package / "fold_0.safetensors").write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        _rewrite_json(package, lambda m, d=digest: m["folds"][0].update(sha256=d))
        with pytest.raises(PackageError, match="not a valid safetensors file"):
            load_model(package)
        assert not Path(_Payload.marker).exists()


# ------------------------------------------------------------------------------------- prediction


def test_an_array_with_its_affine_predicts_as_its_file(package, tmp_path):
    path = _image(tmp_path / "img.nii.gz")
    img = nib.load(path)
    predictor = Predictor(package, device="cpu")
    from_file = predictor.predict(path)
    from_array = predictor.predict(np.asarray(img.dataobj), affine=img.affine)
    assert from_file.shape == SHAPE
    np.testing.assert_array_equal(from_file, from_array)
    with pytest.raises(ValueError, match="spacing"):
        predictor.predict(np.zeros(SHAPE, np.float32))
    with pytest.raises(ValueError, match=r"C = 1 channel"):
        predictor.predict(np.zeros((2, *SHAPE), np.float32), spacing=(1, 1, 1))


def test_ensemble_probabilities_average_the_folds():
    torch.manual_seed(0)
    nets = [create_model("mambaclinix_tiny", in_channels=1, out_channels=3).eval() for _ in range(2)]
    image = torch.randn(1, 1, 20, 18, 16)
    with torch.no_grad():
        both = ensemble_probabilities(image, nets, (16, 16, 16), 2, 0.5)
        single = [
            sliding_window_inference(
                image,
                (16, 16, 16),
                2,
                lambda p, n=n: torch.softmax(n(p)[0], 1),
                overlap=0.5,
                mode="gaussian",
                sigma_scale=0.125,
            )  # fmt: skip
            for n in nets
        ]
    torch.testing.assert_close(both, (single[0] + single[1]) / 2, rtol=1e-5, atol=1e-6)


def test_a_two_fold_package_ensembles_and_selects_folds(tmp_path):
    a, b = _checkpoint(tmp_path / "a.ckpt", seed=0, fold=0), _checkpoint(tmp_path / "b.ckpt", seed=1, fold=3)
    pkg = export_package([a, b], tmp_path / "pkg")
    assert read_package(pkg).folds == [0, 3]
    predictor = Predictor(pkg, device="cpu")
    assert len(predictor.networks) == 2
    assert len(Predictor(pkg, device="cpu", folds=[3]).networks) == 1
    with pytest.raises(PackageError, match="no fold 7"):
        Predictor(pkg, device="cpu", folds=[7])


def test_the_onnx_engine_runs_the_packaged_onnx_file(tmp_path, monkeypatch):
    """The ONNX export and runtime are a stand-in here: what is checked is that ``--onnx`` stores each fold's
    file in the package and that ``engine="onnx"`` runs that file."""
    exported = {}

    def export_onnx(network, path, roi_size, in_channels, opset=18):
        Path(path).write_bytes(b"onnx-" + str(len(exported)).encode())
        exported[Path(path).read_bytes()] = network
        return Path(path)

    class OnnxNetwork:
        def __init__(self, path):
            self.net = exported[Path(path).read_bytes()]

        def __call__(self, x):
            with torch.no_grad():
                out = self.net(x)
            return out[0] if isinstance(out, (list, tuple)) else out

    fake = types.ModuleType("mambaclinix.deploy.onnx")
    fake.export_onnx, fake.OnnxNetwork = export_onnx, OnnxNetwork
    monkeypatch.setitem(sys.modules, "mambaclinix.deploy.onnx", fake)
    pkg = export_package([_checkpoint(tmp_path / "a.ckpt")], tmp_path / "pkg", onnx=True, as_zip=True)
    with zipfile.ZipFile(pkg) as archive:
        assert "fold_0.onnx" in archive.namelist()
    image = _image(tmp_path / "img.nii.gz")
    onnx = Predictor(pkg, engine="onnx").predict(image)
    np.testing.assert_array_equal(onnx, Predictor(pkg, device="cpu").predict(image))
    plain = export_package([tmp_path / "a.ckpt"], tmp_path / "plain")
    with pytest.raises(PackageError, match="export the package with --onnx"):
        Predictor(plain, engine="onnx")


def test_the_onnx_engine_predicts_the_torch_engine_labels(tmp_path):
    """The real export: a package written with ``onnx=True`` predicts with onnxruntime the label maps of
    the PyTorch engine (the logits agree to float32 rounding)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pkg = export_package([_checkpoint(tmp_path / "a.ckpt")], tmp_path / "pkg", onnx=True)
    assert (pkg / "fold_0.onnx").is_file()
    image = _image(tmp_path / "img.nii.gz")
    onnx = Predictor(pkg, engine="onnx").predict(image)
    torch_labels = Predictor(pkg, device="cpu").predict(image)
    assert onnx.shape == torch_labels.shape
    assert float((onnx == torch_labels).mean()) > 0.999


# ------------------------------------------------------------------------------------------- CLI


def test_predict_cli_skips_existing_outputs_reports_failures_and_goes_on(package, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _image(inputs / "a_0000.nii.gz", 0)
    _image(inputs / "c_0000.nii.gz", 1)
    (inputs / "b_0000.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"1 case\(s\) failed:\n  b: "):
        main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(package), "--device", "cpu"])
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz"]
    ref = nib.load(inputs / "a_0000.nii.gz")
    pred = nib.load(out / "a.nii.gz")
    np.testing.assert_array_equal(pred.affine, ref.affine)
    assert pred.shape == ref.shape
    (inputs / "b_0000.nii.gz").unlink()
    stamp = (out / "a.nii.gz").stat().st_mtime_ns
    main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(package)])
    assert "2 skipped" in capsys.readouterr().err
    assert (out / "a.nii.gz").stat().st_mtime_ns == stamp
    main(["predict", "-i", str(inputs / "a_0000.nii.gz"), "-o", str(out), "-m", str(package), "--overwrite",
          "--tta"])  # fmt: skip
    assert "1 case(s) predicted" in capsys.readouterr().err


def test_predict_cli_reports_a_case_with_a_missing_channel_and_predicts_the_others(tmp_path):
    package = export_package([_checkpoint(tmp_path / "two.ckpt", channels=2)], tmp_path / "pkg")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a_0000", "a_0001", "b_0000", "c_0000", "c_0001", "c_0002"):
        _image(inputs / f"{name}.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(package)])
    message = str(info.value)
    assert "2 case(s) failed" in message
    assert "b: missing channel file(s) b_0001" in message
    assert "c: unexpected channel file(s) c_0002.nii.gz" in message
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]


def test_predict_cli_names_a_missing_package(tmp_path):
    with pytest.raises(SystemExit, match="no such model package"):
        main(["predict", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "nope")])


def test_single_channel_plain_file_names_are_cases_of_their_own(tmp_path):
    for name in ("brain1.nrrd", "case_0000.nii.gz", "scan.mha"):
        (tmp_path / name).write_bytes(b"")
    cases = find_images(tmp_path, num_channels=1, per_channel_files=True)
    assert [(c.name, [p.name for p in c.image_paths]) for c in cases] == [
        ("brain1", ["brain1.nrrd"]),
        ("case", ["case_0000.nii.gz"]),
        ("scan", ["scan.mha"]),
    ]
    (tmp_path / "brain1_0000.nrrd").write_bytes(b"")
    with pytest.raises(ValueError, match="two cases are named 'brain1'"):
        find_images(tmp_path, num_channels=1, per_channel_files=True)


def test_shipped_configs_log_with_a_logger_that_keeps_earlier_metrics():
    """Lightning's CSVLogger deletes metrics.csv when a later command (predict, test, a resumed fit) starts in
    the run folder; every configuration we ship uses AppendingCSVLogger instead."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    configs = sorted((root / "mambaclinix" / "configs").glob("*.yaml")) + sorted(
        (root / "examples" / "configs").glob("*.yaml")
    )
    assert configs
    for path in configs:
        loggers = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("logger") or []
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            cls = logger.get("class_path", "") if isinstance(logger, dict) else str(logger)
            assert not cls.endswith(".CSVLogger") or "Appending" in cls, f"{path.name}: {cls}"


def test_the_command_list_names_export():
    from mambaclinix.cli import usage

    assert "export" in usage() and "-i IN -o OUT -m MODEL" in usage()
