"""Dataset planning: nnU-Net's spacing/topology rules by hand, plans of synthetic NIfTI datasets, the plan's
config through ``mambaclinix fit``, bad datasets, and the memory budget measured on a real training step."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from mambaclinix.data.datasets import DatasetError
from mambaclinix.planning import (
    adaptive_layer_types,
    memory_terms,
    plan_topology,
    predict_peak,
    target_spacing,
)
from mambaclinix.planning.planner import PlanningError, choose_patch_and_batch, plan_dataset, write_plan

ROOT = Path(__file__).resolve().parent.parent


def write_dataset(root: Path, shape, spacing, n=3, modality="MRI", seed=0) -> Path:
    """nnU-Net v2 dataset: ``n`` cases of ``shape`` voxels at ``spacing`` mm (array axes), classes 0..2."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([*spacing, 1.0])
    for i in range(n):
        image = rng.normal(100.0, 10.0, size=shape).astype(np.float32)  # non-zero everywhere: no crop
        label = np.zeros(shape, np.uint8)
        c = [s // 2 for s in shape]
        label[c[0] - shape[0] // 4 : c[0], c[1] - shape[1] // 4 : c[1], c[2] - shape[2] // 4 : c[2]] = 1
        label[
            c[0] : c[0] + max(1, shape[0] // 8), c[1] : c[1] + shape[1] // 8, c[2] : c[2] + shape[2] // 8
        ] = 2
        image[label > 0] += 50
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"case_{i:03d}.nii.gz")
    description = {"channel_names": {"0": modality}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                   "numTraining": n, "file_ending": ".nii.gz", "name": root.name}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(description))
    return root


# ------------------------------------------------------------------------------------------------ rules


def test_target_spacing_median_and_the_anisotropic_axis():
    iso = [(1.0, 1.0, 1.0), (0.8, 0.9, 1.2), (1.2, 1.1, 0.9)]
    assert target_spacing(iso) == pytest.approx((1.0, 1.0, 1.0))
    # thick slices on axis 0: median 5 > 3 x 0.8 and few slices (40 x 3 < 512): 10th percentile of axis 0
    spacings = [(s, 0.8, 0.8) for s in (2.5, 4.0, 5.0, 5.0, 6.0)]
    shapes = [(40, 512, 512)] * 5
    tenth = np.percentile([2.5, 4.0, 5.0, 5.0, 6.0], 10)  # 2.5 + 0.4 * 1.5 = 3.1
    assert tenth == pytest.approx(3.1)
    assert target_spacing(spacings, shapes) == pytest.approx((3.1, 0.8, 0.8))
    # as many slices as in-plane voxels: not "few slices", the median stays
    assert target_spacing(spacings, [(512, 512, 512)] * 5) == pytest.approx((5.0, 0.8, 0.8))
    # ratio below 3: the median stays
    assert target_spacing([(2.0, 0.8, 0.8)] * 3, [(40, 512, 512)] * 3) == pytest.approx((2.0, 0.8, 0.8))


def test_isotropic_topology_follows_the_patch_size():
    for patch, n in (((128, 128, 128), 6), ((64, 64, 64), 5), ((32, 32, 32), 4), ((16, 16, 16), 3)):
        topo = plan_topology((1.0, 1.0, 1.0), patch)
        assert topo.n_stages == n, patch
        assert topo.kernel_sizes == ((3, 3, 3),) * n
        assert topo.strides == ((1, 1, 1),) + ((2, 2, 2),) * (n - 1)
        assert topo.patch_size == patch
        assert topo.size_divisor == (2 ** (n - 1),) * 3
    assert plan_topology((1.0, 1.0, 1.0), (128, 128, 128), max_stages=5).n_stages == 5
    # a patch not divisible by the strides is padded up: 100 → 4 halvings (100, 50, 25, 13, 7) → 112
    assert plan_topology((1.0, 1.0, 1.0), (100, 100, 100)).patch_size == (112, 112, 112)


def test_anisotropic_topology_waits_for_the_coarse_axis():
    # (3, 0.8, 0.8), patch (20, 160, 160); by hand: in-plane 0.8 → 1.6 (3/1.6 < 2: all axes from then on)
    topo = plan_topology((3.0, 0.8, 0.8), (20, 160, 160))
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    #                    sizes: (20,160,160) (20,80,80) (10,40,40) (5,20,20) (5,10,10) (5,5,5)
    assert topo.kernel_sizes == ((1, 3, 3),) + ((3, 3, 3),) * 5
    assert topo.size_divisor == (4, 32, 32)
    # 5 mm slices, 0.7 mm in plane: 0.7 → 1.4 (5/1.4 > 2) → 2.8 (5/2.8 < 2): two 1×3×3 stages
    topo = plan_topology((5.0, 0.7, 0.7), (24, 224, 224))
    assert topo.kernel_sizes[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert topo.strides[:4] == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2))


def test_adaptive_stage_rule():
    assert adaptive_layer_types(6) == ("hgcn",) * 3 + ("mamba",) * 3
    assert adaptive_layer_types(5) == ("hgcn",) * 3 + ("mamba",) * 2
    assert adaptive_layer_types(4) == ("hgcn",) * 2 + ("mamba",) * 2


def test_memory_terms_by_hand():
    # patch 8×8×8, strides 1,2: voxels 512, 64; channels 4, 8; hgcn then mamba; 3 classes; batch 2
    t = memory_terms((8, 8, 8), 2, (4, 8), ((1, 1, 1), (2, 2, 2)), ("hgcn", "mamba"), 3, 1000)
    assert t == {
        "const": 1.0,
        "params": 1000.0,
        "hgcn": 2 * 4 * 512,
        "mamba": 2 * 8 * 64,
        "logits": 2 * 3 * 512,
    }
    coef = {"const": 10.0, "params": 16.0, "hgcn": 2.0, "mamba": 3.0, "logits": 4.0}
    assert predict_peak(t, coef) == 10 + 16_000 + 2 * 4096 + 3 * 1024 + 4 * 3072


def test_patch_search_shrinks_with_the_budget_and_respects_it():
    coef = {"const": 0.0, "params": 16.0, "hgcn": 100.0, "mamba": 100.0, "logits": 20.0}
    found = []
    for gib in (64, 8, 1, 0.25):
        topo, batch, peak = choose_patch_and_batch(
            (1.0, 1.0, 1.0), (256, 256, 256), gib * 2**30, coef, base_features=8, max_features=64
        )
        assert peak <= gib * 2**30
        assert batch >= 2
        found.append((math.prod(topo.patch_size), topo.n_stages))
    volumes, stages = zip(*found, strict=True)
    assert list(volumes) == sorted(volumes, reverse=True) and volumes[0] > volumes[-1]
    assert list(stages) == sorted(stages, reverse=True) and stages[0] > stages[-1]
    with pytest.raises(PlanningError, match="too small"):
        choose_patch_and_batch((1.0, 1.0, 1.0), (64, 64, 64), 1e3, coef, base_features=8, max_features=64)


# ------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("planning")
    return {
        "iso": write_dataset(root / "Iso", (64, 64, 64), (1.0, 1.0, 1.0)),
        "aniso": write_dataset(root / "Aniso", (16, 96, 96), (3.0, 0.8, 0.8)),
    }


def test_plan_of_an_isotropic_dataset(datasets, tmp_path):
    plan = plan_dataset(datasets["iso"])
    assert plan.target_spacing == pytest.approx([1.0, 1.0, 1.0])
    assert plan.patch_size == [64, 64, 64]  # capped at the median shape
    net = plan.network
    assert net["n_stages"] == 5
    assert net["kernel_sizes"] == [[3, 3, 3]] * 5
    assert net["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert net["features_per_stage"] == [32, 64, 128, 256, 320]
    assert net["stage_layer_types"] == ["hgcn"] * 3 + ["mamba"] * 2
    assert plan.normalization == ["zscore"] and plan.foreground_probability == pytest.approx(1 / 3)
    # the fingerprint by hand: class voxels per case 16³ (organ) and 8³ (lesion) of 64³
    frac = plan.fingerprint["class_voxel_fraction"]
    assert frac["organ"] == pytest.approx(16**3 / 64**3, abs=1e-6)
    assert frac["lesion"] == pytest.approx(8**3 / 64**3, abs=1e-6)
    # 5% of 3 × 64³ voxels is 0.15 patches: nnU-Net's minimum batch of 2
    assert plan.batch_size == 2
    plan_path, config_path = write_plan(plan, tmp_path)
    written = yaml.safe_load(plan_path.read_text())
    assert written["patch_size"] == [64, 64, 64] and written["network"]["n_stages"] == 5


def test_plan_of_a_ct_dataset_uses_its_foreground_statistics(tmp_path):
    data = write_dataset(tmp_path / "Ct", (32, 32, 32), (1.0, 1.0, 1.0), n=2, modality="CT")
    plan = plan_dataset(data)
    assert plan.normalization == ["ct"]
    # fewer than 10,000 foreground voxels per case: the statistics use all of them
    values = []
    for i in range(2):
        image = np.asarray(nib.load(data / "imagesTr" / f"case_{i:03d}_0000.nii.gz").dataobj, np.float64)
        label = np.asarray(nib.load(data / "labelsTr" / f"case_{i:03d}.nii.gz").dataobj)
        values.append(image[label > 0])
    values = np.concatenate(values)
    stats = plan.fingerprint["foreground_intensity"][0]
    assert stats["channel"] == "CT"
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-6)
    assert stats["p00_5"] == pytest.approx(np.percentile(values, 0.5), rel=1e-6)
    assert stats["p99_5"] == pytest.approx(np.percentile(values, 99.5), rel=1e-6)
    _, config_path = write_plan(plan, tmp_path / "out")
    assert yaml.safe_load(config_path.read_text())["data"]["normalization"] == "auto"
    plan = plan_dataset(data, normalization="zscore", validate=False)
    _, config_path = write_plan(plan, tmp_path / "out2")
    assert yaml.safe_load(config_path.read_text())["data"]["normalization"] == "zscore"


def test_gpu_config_gets_loader_workers_for_the_gpu(datasets, tmp_path, monkeypatch):
    """A GPU plan asks for 6 loader processes (one augments about 3.5 patches/s at 128³, MambaClinix on an
    H200 takes 9.4/s), never more than the machine's cores less one; a CPU plan for one."""
    from mambaclinix.planning import render

    gpu = plan_dataset(datasets["iso"], accelerator="gpu", validate=False)
    for cores, workers in ((32, 6), (4, 3), (1, 1), (None, 1)):
        monkeypatch.setattr(render.os, "cpu_count", lambda cores=cores: cores)
        _, config_path = write_plan(gpu, tmp_path / f"gpu{cores}")
        assert yaml.safe_load(config_path.read_text())["data"]["num_workers"] == workers
    cpu = plan_dataset(datasets["iso"], accelerator="cpu", memory_gb=1, validate=False)
    _, config_path = write_plan(cpu, tmp_path / "cpu")
    assert yaml.safe_load(config_path.read_text())["data"]["num_workers"] == 1


def test_plan_of_an_anisotropic_dataset(datasets):
    plan = plan_dataset(datasets["aniso"])
    assert plan.target_spacing == pytest.approx([3.0, 0.8, 0.8])
    net = plan.network
    assert plan.patch_size == [16, 96, 96]
    # by hand: in plane 0.8 → 1.6 mm before axis 0 (3 mm) joins; sizes (16, 96, 96) → (16, 48, 48) →
    # (8, 24, 24) → (4, 12, 12) → (4, 6, 6): axis 0 stops at 4 (< 8), the others at 6
    assert net["kernel_sizes"][0] == [1, 3, 3]
    assert all(k == [3, 3, 3] for k in net["kernel_sizes"][1:])
    assert net["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert net["n_stages"] == 5


def test_plan_from_a_manifest_without_dataset_json(datasets, tmp_path):
    src = datasets["aniso"]
    rows = ["image,label"] + [
        f"{src / 'imagesTr' / f'case_{i:03d}_0000.nii.gz'},{src / 'labelsTr' / f'case_{i:03d}.nii.gz'}"
        for i in range(3)
    ]
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    plan = plan_dataset(manifest=tmp_path / "cases.csv")
    assert plan.dataset["channel_names"] == ["unknown"] and plan.normalization == ["zscore"]
    assert plan.dataset["num_classes"] == 3  # from the labels' values 0, 1, 2
    assert plan.target_spacing == pytest.approx([3.0, 0.8, 0.8])
    assert plan.network["kernel_sizes"][0] == [1, 3, 3]
    _, config_path = write_plan(plan, tmp_path / "out")
    assert yaml.safe_load(config_path.read_text())["data"]["manifest"] == str(
        (tmp_path / "cases.csv").resolve()
    )


def test_plan_command_round_trips_into_fit(datasets, tmp_path, monkeypatch):
    from mambaclinix.cli import main

    out = tmp_path / "plan"
    main(["plan", str(datasets["iso"]), "--out", str(out), "--accelerator", "cpu", "--memory-gb", "1",
          "--base-features", "4", "--max-features", "8", "--max-stages", "3"])  # fmt: skip
    config = yaml.safe_load((out / "config.yaml").read_text())
    kwargs = config["model"]["net_kwargs"]
    assert kwargs == {"n_stages": 3, "features_per_stage": [4, 8, 8], "kernel_sizes": [[3, 3, 3]] * 3,
                      "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_hgcn_stages": 2}  # fmt: skip
    assert config["data"]["patch_size"] == [64, 64, 64]
    monkeypatch.chdir(tmp_path)
    # the plan's network as written; overrides on the command line for the patch, batch and steps
    main(["fit", "-c", str(out / "config.yaml"), "--trainer.max_steps=2", "--data.num_workers=0",
          "--data.samples_per_volume=1", "--data.patch_size=[16,16,16]",
          "--data.batch_size=1", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
          "--trainer.num_sanity_val_steps=0"])  # fmt: skip
    ckpt = torch.load(tmp_path / "runs/mambaclinix/checkpoints/last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["net_kwargs"] == kwargs
    assert ckpt["hyper_parameters"]["net"] == "mambaclinix_paper"
    data = ckpt["datamodule_hyper_parameters"]
    assert data["batch_size"] == 1 and tuple(data["patch_size"]) == (16, 16, 16)
    assert list(data["target_spacing"]) == pytest.approx(config["data"]["target_spacing"])
    # the network of the plan was built: 3 stages, so 2 decoder levels
    assert len({k.split(".")[2] for k in ckpt["state_dict"] if k.startswith("net.up_convs")}) == 2


def _corrupt(src: Path, dst: Path, how: str) -> None:
    import shutil

    shutil.copytree(src, dst)
    if how == "missing_label":
        (dst / "labelsTr" / "case_001.nii.gz").unlink()
    elif how == "label_shape":
        nib.save(
            nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), dst / "labelsTr" / "case_001.nii.gz"
        )
    elif how == "label_values":
        img = nib.load(dst / "labelsTr" / "case_001.nii.gz")
        data = np.asarray(img.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, img.affine), dst / "labelsTr" / "case_001.nii.gz")
    elif how == "label_affine":
        img = nib.load(dst / "labelsTr" / "case_001.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine * np.diag([1, 1, 2, 1])),
                 dst / "labelsTr" / "case_001.nii.gz")  # fmt: skip


@pytest.mark.parametrize("how", ["missing_label", "label_shape", "label_values", "label_affine"])
def test_plan_fails_early_naming_the_case(datasets, tmp_path, how):
    from mambaclinix.cli import main

    bad = tmp_path / "bad"
    _corrupt(datasets["aniso"], bad, how)
    with pytest.raises(DatasetError, match="case_001"):
        main(["plan", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------ memory, measured

_STEP_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[2])
import memory_model as mm
from mambaclinix.models import MambaClinixUNet
cfg = json.loads(sys.argv[1])
torch.set_num_threads(2)
mm.cpu_warmup()
base = mm.reset_peak_rss()
net = MambaClinixUNet(in_channels=1, out_channels=cfg["classes"], **cfg["net_kwargs"])
cpu = torch.device("cpu")
mm.train_steps(net, cfg["patch"], cfg["batch"], cfg["classes"], cpu, steps=2, channels_last=True)
print(json.dumps({"peak": mm.peak_rss_since_reset() - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_planned_patch_stays_under_a_cpu_budget(tmp_path):
    """Plan for a 0.4 GiB CPU budget, train 2 steps in a fresh process (the peak comes in the second,
    with Adam's state), measure the peak RSS they add."""
    data = write_dataset(tmp_path / "Big", (80, 80, 80), (1.0, 1.0, 1.0), n=2)
    budget = 0.4
    plan = plan_dataset(data, accelerator="cpu", memory_gb=budget, base_features=8, max_features=64,
                        validate=False)  # fmt: skip
    assert math.prod(plan.patch_size) < 80**3  # the budget, not the image, limits the patch
    cfg = {"net_kwargs": plan.net_kwargs, "patch": plan.patch_size, "batch": plan.batch_size, "classes": 3}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, json.dumps(cfg), str(ROOT / "benchmarks")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    assert peak <= budget * 2**30, f"measured {peak / 2**30:.3f} GiB > budget {budget} GiB"
    predicted = plan.memory["predicted_peak_gib"] * 2**30
    print(f"patch {plan.patch_size} batch {plan.batch_size}: predicted {predicted / 2**30:.3f} GiB, "
          f"measured {peak / 2**30:.3f} GiB, budget {budget} GiB")  # fmt: skip
    assert abs(predicted - peak) / peak < 0.35, (predicted / 2**30, peak / 2**30)


def test_rules_and_memory_model_import_without_the_data_stack():
    """The GPU measurement script needs only torch/numpy: no TorchIO, Lightning or nibabel."""
    code = ("import sys, mambaclinix.planning.memory, mambaclinix.planning.topology, mambaclinix.planning; "
            "bad = [m for m in ('torchio', 'lightning', 'nibabel') if m in sys.modules]; "
            "assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_memory_model_has_fits_for_cpu_and_gpu():
    from mambaclinix.planning import load_coefficients

    for device, precision in (("cpu", "32-true"), ("cuda", "32-true"), ("cuda", "bf16-mixed")):
        coef = load_coefficients(device, precision)
        assert coef["params"] >= 0 and coef["source"]
    # a training step keeps weights, gradients and Adam's two moments in float32: 16 bytes per parameter
    # is the physical floor the fitted per-parameter cost should be near
    assert 8 <= load_coefficients("cuda", "32-true")["params"] <= 24


def test_topology_matches_the_network(datasets):
    """The planned kernels/strides build a network whose size divisor is the plan's, and it runs."""
    from mambaclinix.models import MambaClinixUNet

    topo = plan_topology((3.0, 0.8, 0.8), (8, 32, 32))
    net = MambaClinixUNet(1, 2, n_stages=topo.n_stages, features_per_stage=[4, 8, 8, 16][: topo.n_stages],
                          kernel_sizes=topo.kernel_sizes, strides=topo.strides)  # fmt: skip
    assert tuple(net.size_divisor) == topo.size_divisor
    with torch.no_grad():
        out = net(torch.randn(1, 1, *topo.patch_size))
    assert out[0].shape == (1, 2, *topo.patch_size)


def test_fit_recovers_known_coefficients_and_writes_them(tmp_path):
    """``benchmarks/memory_model.py --fit`` on peaks made from known coefficients gets them back, holds
    out every 4th point with zero error, and writes a coefficients file like the planner's package data,
    keeping the fits of devices not refitted."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_model as mm
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    truth = {"const": 3e8, "params": 16.0, "hgcn": 120.0, "mamba": 200.0, "logits": 40.0}
    rows = []
    for point in mm.GRIDS["cuda"] + mm.GRIDS["cpu"]:  # every grid point gives a valid network
        rows.append(
            {"point": point, "precision": "32-true", "peak_bytes": predict_peak(mm.terms_of(point), truth)}
        )
    data = {"device": "cuda", "date": "2026-01-01T00:00", "scan_backend": "test", "results": rows,
            "machine": {"gpu": "test GPU", "torch": torch.__version__}}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(data))
    out = tmp_path / "coef.json"
    out.write_text(json.dumps({"coefficients": {"cpu/32-true": {"const": 1.0, "source": "kept"}}}))
    report = mm.fit([tmp_path / "m.json"], holdout_every=4, write=out)
    fitted = report["cuda/32-true"]["coefficients"]
    for key, value in truth.items():
        assert fitted[key] == pytest.approx(value, rel=1e-6), key
    assert all(abs(h["rel_error"]) < 1e-9 for h in report["cuda/32-true"]["heldout"])
    written = json.loads(out.read_text())["coefficients"]
    assert written["cuda/32-true"]["hgcn"] == pytest.approx(120.0, rel=1e-5)
    assert written["cpu/32-true"] == {"const": 1.0, "source": "kept"}
    package = json.loads((ROOT / "mambaclinix" / "planning" / "memory_coefficients.json").read_text())
    assert set(written["cuda/32-true"]) == set(package["coefficients"]["cuda/32-true"])
