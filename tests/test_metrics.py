"""Tests of mambaclinix.metrics against analytic shapes, documented empty cases and independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mambaclinix.metrics import (
    HausdorffDistance95,
    NormalizedSurfaceDice,
    PerClassDice,
    dice_score,
    hausdorff_distance_95,
    normalized_surface_dice,
    per_class_dice,
    per_class_hd95,
    per_class_nsd,
    surface_distances,
)

SPACING = (2.0, 1.0, 0.8)  # anisotropic, mm
DIAG = math.sqrt(sum(s * s for s in SPACING))


# --------------------------------------------------------------------------------------------------------
# analytic shapes
# --------------------------------------------------------------------------------------------------------
def offset_boxes(shift_vox: int = 3):
    """Two 24×24×24 mm boxes (12×24×30 voxels at SPACING), the second shifted along axis 0."""
    shape, size, start = (30, 50, 60), (12, 24, 30), (5, 10, 12)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    sl = tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
    a[sl] = True
    b[(slice(start[0] + shift_vox, start[0] + shift_vox + size[0]),) + sl[1:]] = True
    sides = tuple(n * s for n, s in zip(size, SPACING, strict=True))
    return a, b, shift_vox * SPACING[0], sides


def boxes_nsd_analytic(tau: float, delta: float, sides) -> float:
    """Area fraction of the two box surfaces within τ of the other box (B = A shifted by δ along x).

    Face x=0 of A is δ from B; face x=L_x lies inside B at distance min(δ, y, L_y−y, z, L_z−z); the four side
    faces are on B's surface where x >= δ and δ − x away elsewhere. Symmetric for B.
    """
    lx, ly, lz = sides
    if tau >= delta:
        return 1.0
    tau = max(tau, 0.0)
    total = 2 * (ly * lz + lx * lz + lx * ly)
    inner_face = ly * lz - max(ly - 2 * tau, 0.0) * max(lz - 2 * tau, 0.0)
    side_faces = 2 * max(lx - delta + tau, 0.0) * (ly + lz)
    return (inner_face + side_faces) / total


def concentric_spheres(r_small: float = 6.0, r_large: float = 12.0, spacing=(1.5, 1.0, 0.75)):
    shape = (24, 36, 48)
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    centre = np.array([(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)])
    r = np.linalg.norm(grid - centre, axis=-1)
    return r <= r_small, r <= r_large


def test_hd95_offset_boxes_anisotropic():
    a, b, delta, _ = offset_boxes()
    assert abs(hausdorff_distance_95(a, b, SPACING) - delta) <= DIAG
    assert abs(hausdorff_distance_95(b, a, SPACING) - delta) <= DIAG
    # spacing matters: the same voxels with isotropic 1 mm voxels are 3 mm apart, not 6 mm
    assert abs(hausdorff_distance_95(a, b, (1.0, 1.0, 1.0)) - 3.0) <= math.sqrt(3)
    assert hausdorff_distance_95(a, b, SPACING) > hausdorff_distance_95(a, b, (1.0, 1.0, 1.0)) + 2


def test_hd95_concentric_spheres_anisotropic():
    spacing = (1.5, 1.0, 0.75)
    diag = math.sqrt(sum(s * s for s in spacing))
    small, large = concentric_spheres(spacing=spacing)
    assert abs(hausdorff_distance_95(small, large, spacing) - 6.0) <= diag
    assert hausdorff_distance_95(small, small, spacing) == 0.0


@pytest.mark.parametrize("tau", [0.5, 2.0, 3.0, 4.5, 5.9])
def test_nsd_offset_boxes_within_one_voxel_diagonal(tau):
    a, b, delta, sides = offset_boxes()
    nsd = normalized_surface_dice(a, b, tau, SPACING)
    lo = boxes_nsd_analytic(tau - DIAG, delta, sides)
    hi = boxes_nsd_analytic(tau + DIAG, delta, sides)
    assert lo <= nsd <= hi
    assert 0.0 < nsd < 1.0


def test_nsd_offset_boxes_limits():
    a, b, delta, _ = offset_boxes()
    assert normalized_surface_dice(a, b, delta + 1e-9, SPACING) == 1.0
    assert normalized_surface_dice(a, a, 0.0, SPACING) == 1.0


def test_nsd_concentric_spheres_step_at_radius_difference():
    spacing = (1.5, 1.0, 0.75)
    diag = math.sqrt(sum(s * s for s in spacing))
    small, large = concentric_spheres(spacing=spacing)
    # every surface point of one sphere is 6 mm from the other: NSD jumps from 0 to 1 at τ = 6 (± a voxel)
    assert normalized_surface_dice(small, large, 6.0 - diag, spacing) == 0.0
    assert normalized_surface_dice(small, large, 6.0 + diag, spacing) == 1.0
    assert 0.0 < normalized_surface_dice(small, large, 6.0, spacing) < 1.0


def test_nsd_area_weighting_with_anisotropic_voxels():
    # a 1-voxel-thick slab 4×4 voxels: with spacing (5, 1, 1) the two big faces (area 16 each) dominate
    # the thin rim (16 faces of 5 mm² each); counting voxels would weigh them the same
    mask = np.zeros((3, 6, 6), dtype=bool)
    mask[1, 1:5, 1:5] = True
    _, _, area, _ = surface_distances(mask, mask, (5.0, 1.0, 1.0))
    assert area.sum() == pytest.approx(2 * 16 * 1.0 + 16 * 5.0)


def test_dice_values():
    a, b, _, _ = offset_boxes(shift_vox=3)
    # overlap 9 of 12 slices
    assert dice_score(a, b) == pytest.approx(9 / 12)
    assert dice_score(a, a) == 1.0


# --------------------------------------------------------------------------------------------------------
# empty cases: documented values, never NaN
# --------------------------------------------------------------------------------------------------------
def test_empty_cases_documented_values():
    empty = np.zeros((6, 7, 8), dtype=bool)
    full = empty.copy()
    full[2:4, 2:5, 3:6] = True
    assert dice_score(empty, empty) == 1.0
    assert dice_score(empty, full) == 0.0
    assert hausdorff_distance_95(empty, empty, SPACING) == 0.0
    diag_mm = math.sqrt((6 * 2.0) ** 2 + (7 * 1.0) ** 2 + (8 * 0.8) ** 2)
    assert hausdorff_distance_95(empty, full, SPACING) == pytest.approx(diag_mm)
    assert hausdorff_distance_95(full, empty, SPACING, empty_distance=math.inf) == math.inf
    assert normalized_surface_dice(empty, empty, 1.0, SPACING) == 1.0
    assert normalized_surface_dice(full, empty, 1.0, SPACING) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, full, SPACING)


def test_per_class_functions_with_empty_classes():
    # class 1 in both, class 2 in neither, class 3 only in the prediction
    pred = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    ref = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    pred[0, 1:3, 1:3, 1:3] = 1
    ref[0, 1:3, 1:4, 1:3] = 1
    pred[0, 4, 4, 4] = 3
    dice = per_class_dice(pred, ref, num_classes=4)
    torch.testing.assert_close(dice, torch.tensor([[2 * 8 / (8 + 12), 1.0, 0.0]], dtype=torch.float64))
    hd = per_class_hd95(pred, ref, num_classes=4, spacing=(1.0, 1.0, 1.0))
    assert hd[0, 1] == 0.0 and hd[0, 2] == pytest.approx(math.sqrt(3 * 36))
    assert hd[0, 0] == pytest.approx(1.0)
    nsd = per_class_nsd(pred, ref, num_classes=4, tolerance=0.5)
    assert nsd[0, 1] == 1.0 and nsd[0, 2] == 0.0
    assert not torch.isnan(torch.cat([dice, hd, nsd])).any()


# --------------------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------------------
def _random_blobs(seed: int, shape=(14, 16, 18)):
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    masks = []
    for _ in range(2):
        c = rng.uniform(4, 10, 3)
        radii = rng.uniform(2.5, 5, 3)
        masks.append(sum(((ax - ci) / ri) ** 2 for ax, ci, ri in zip(axes, c, radii, strict=True)) <= 1.0)
    return masks


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside MONAI's own get_mask_edges call
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_monai(seed):
    monai_metrics = pytest.importorskip("monai.metrics")
    a, b = _random_blobs(seed)
    onehot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (a, b)]
    ref = monai_metrics.compute_hausdorff_distance(onehot[0], onehot[1], percentile=95, spacing=list(SPACING))
    assert hausdorff_distance_95(a, b, SPACING) == pytest.approx(float(ref), abs=1e-5)


def test_hd100_2d_matches_torchmetrics_on_square_images():
    # torchmetrics' HausdorffDistance is spacing-aware in 2-D, but only right for square images (its
    # distance transform flattens with the height: torchmetrics issue #3300) and it fails on 3-D inputs
    from torchmetrics.functional.segmentation import hausdorff_distance

    yy, xx = np.meshgrid(np.arange(22), np.arange(22), indexing="ij")
    a2 = ((yy - 8) / 5.0) ** 2 + ((xx - 9) / 7.0) ** 2 <= 1
    b2 = ((yy - 11) / 4.0) ** 2 + ((xx - 12) / 6.5) ** 2 <= 1
    spacing = [1.7, 0.6]
    oh = [torch.from_numpy(np.stack([~m, m])[None].astype(np.int64)) for m in (a2, b2)]
    ref = hausdorff_distance(oh[0], oh[1], num_classes=2, spacing=spacing)
    assert hausdorff_distance_95(a2, b2, spacing, percentile=100) == pytest.approx(float(ref), abs=1e-5)


@pytest.mark.parametrize("seed", [4, 5])
def test_surface_distances_match_brute_force(seed):
    # independent of the distance transform: all pairwise distances between surface voxel centres
    a, b = _random_blobs(seed, shape=(12, 13, 11))
    sa = a & ~_eroded(a)
    sb = b & ~_eroded(b)
    pa = np.argwhere(sa) * np.array(SPACING)
    pb = np.argwhere(sb) * np.array(SPACING)
    pair = np.linalg.norm(pa[:, None, :] - pb[None, :, :], axis=-1)
    d_ab, d_ba = pair.min(axis=1), pair.min(axis=0)
    ours_ab, ours_ba, _, _ = surface_distances(a, b, SPACING)
    np.testing.assert_allclose(np.sort(ours_ab), np.sort(d_ab), atol=1e-9)
    np.testing.assert_allclose(np.sort(ours_ba), np.sort(d_ba), atol=1e-9)
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assert hausdorff_distance_95(a, b, SPACING) == pytest.approx(hd95, abs=1e-9)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Face-connected erosion written out by hand: a voxel survives if its 6 neighbours are all inside."""
    padded = np.pad(mask, 1)
    out = mask.copy()
    for axis in range(3):
        for shift in (-1, 1):
            out &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return out


def test_dice_matches_torchmetrics_on_non_empty_classes():
    from torchmetrics.functional.segmentation import dice_score as tm_dice

    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (2, 6, 7, 5), generator=g)
    ref = torch.randint(0, 4, (2, 6, 7, 5), generator=g)
    ours = per_class_dice(pred, ref, num_classes=4)
    theirs = tm_dice(pred, ref, num_classes=4, include_background=False, average="none", input_format="index")
    torch.testing.assert_close(ours, theirs.double(), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# torchmetrics Metric classes
# --------------------------------------------------------------------------------------------------------
def test_metric_classes_accumulate_per_class_means():
    a, b, delta, _ = offset_boxes()
    pred = torch.from_numpy(np.stack([a.astype(np.int64), a.astype(np.int64) * 2]))  # class 1, then class 2
    ref = torch.from_numpy(np.stack([b.astype(np.int64), b.astype(np.int64)]))  # class 1 twice
    dice = PerClassDice(num_classes=3)
    dice.update(pred, ref)
    # sample 0: class 1 Dice 0.75, class 2 both empty (1); sample 1: class 1 missed (0), class 2 FP only (0)
    torch.testing.assert_close(dice.compute(), torch.tensor([0.375, 0.5], dtype=torch.float64))
    macro = PerClassDice(num_classes=3, average="macro")
    macro.update(pred, ref)
    assert macro.compute().item() == pytest.approx(0.4375)

    hd = HausdorffDistance95(num_classes=3, spacing=SPACING, empty_distance=100.0)
    hd.update(pred[:1], ref[:1])
    hd.update(pred[1:], ref[1:])
    out = hd.compute()
    assert abs(out[0].item() - (delta + 100.0) / 2) <= DIAG / 2
    assert out[1].item() == pytest.approx(50.0)

    nsd = NormalizedSurfaceDice(num_classes=3, tolerance=[delta + 0.1, 1.0], spacing=SPACING)
    nsd.update(pred, ref)
    torch.testing.assert_close(nsd.compute(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_metric_spacing_override_and_score_inputs():
    a, b, delta, _ = offset_boxes()
    pred = torch.from_numpy(a[None].astype(np.int64))
    ref = torch.from_numpy(b[None].astype(np.int64))
    hd = HausdorffDistance95(num_classes=2)  # default spacing 1 mm
    hd.update(pred, ref, spacing=torch.tensor([SPACING]))
    assert abs(hd.compute().item() - delta) <= DIAG  # torchmetrics squeezes a 1-element result
    scores = torch.stack([1 - pred, pred], dim=1).float()  # (B, K, *spatial) → argmax
    dice = PerClassDice(num_classes=2)
    dice.update(scores, ref[:, None])
    assert dice.compute().item() == pytest.approx(0.75)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: PerClassDice(num_classes=0), "num_classes must be an int >= 1"),
        (lambda: PerClassDice(num_classes=3, average="micro"), "average must be one of"),
        (lambda: HausdorffDistance95(num_classes=3, spacing=(1.0, 1.0)), "spacing must hold 3 positive"),
        (
            lambda: HausdorffDistance95(num_classes=3, spacing=(1.0, -1.0, 1.0)),
            "spacing must hold 3 positive",
        ),
        (lambda: NormalizedSurfaceDice(num_classes=3, tolerance=-1.0), "tolerance must be one finite number"),
        (lambda: NormalizedSurfaceDice(num_classes=3, tolerance=[1.0, 2.0, 3.0]), "or 2 of them"),
        (
            lambda: PerClassDice(num_classes=3).update(torch.full((1, 4, 4, 4), 3), torch.zeros(1, 4, 4, 4)),
            r"preds labels must be in \[0, 2\]",
        ),
        (
            lambda: PerClassDice(num_classes=3).update(torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 5)),
            "differ in shape",
        ),
        (lambda: PerClassDice(num_classes=3).update(torch.zeros(4, 4), torch.zeros(4, 4)), "expected labels"),
        (lambda: hausdorff_distance_95(np.ones((3, 3)), np.full((3, 3), 2)), "binary mask"),
        (lambda: normalized_surface_dice(np.ones((3, 3)), np.ones((3, 3)), math.nan), "tolerance"),
    ],
)
def test_metric_validation_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_compute_before_update_raises_instead_of_nan():
    metric = PerClassDice(num_classes=3)
    with (
        pytest.warns(UserWarning, match="called before the ``update``"),
        pytest.raises(ValueError, match="before any"),
    ):
        metric.compute()
