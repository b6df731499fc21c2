"""Tests of mambaclinix.losses: hand-computed values, independent references, validation, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mambaclinix.losses import (
    CrossEntropyLoss,
    DeepSupervisionLoss,
    DiceCELoss,
    DiceCETverskyLoss,
    MambaClinixLoss,
    RegionSpecificTverskyLoss,
    SoftDiceLoss,
    TverskyLoss,
    deep_supervision_weights,
    downsample_labels,
    grid_from_patch_size,
)

EPS = 1e-5
DT = torch.float64


# --------------------------------------------------------------------------------------------------------
# the hand-built 1×2×2×1×1 case used by several tests
#   voxel 0: logits (0, 0)      → p = (1/2, 1/2), label 0
#   voxel 1: logits (0, ln 3)   → p = (1/4, 3/4), label 1
# foreground class 1: p = [1/2, 3/4], g = [0, 1]
# --------------------------------------------------------------------------------------------------------
def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]], dtype=DT)  # (voxel, class)
    x = logits.T.reshape(1, 2, 2, 1, 1).clone()
    y = torch.tensor([0, 1]).reshape(1, 1, 2, 1, 1)
    return x, y


def test_hand_case_softmax_is_what_the_comments_say():
    x, _ = hand_case()
    p = torch.softmax(x, 1)[0, :, :, 0, 0]
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.25], [0.5, 0.75]], dtype=DT))


def test_tversky_known_value():
    # probabilities given directly (no activation), both classes kept, smooth 0
    p = torch.tensor([[0.8, 0.3], [0.2, 0.7]], dtype=DT).reshape(1, 2, 2, 1, 1)
    y = torch.tensor([0, 1]).reshape(1, 1, 2, 1, 1)
    loss = TverskyLoss(to_onehot_y=True, alpha=0.3, beta=0.7, smooth_nr=0.0, smooth_dr=0.0)
    # class 0: g = [1, 0]: tp 0.8, fp 0.3, fn 0.2 ; class 1: g = [0, 1]: tp 0.7, fp 0.2, fn 0.3
    ti0 = 0.8 / (0.8 + 0.3 * 0.3 + 0.7 * 0.2)
    ti1 = 0.7 / (0.7 + 0.3 * 0.2 + 0.7 * 0.3)
    assert loss(p, y).item() == pytest.approx(1 - (ti0 + ti1) / 2, abs=1e-12)
    per_item = TverskyLoss(to_onehot_y=True, alpha=0.3, beta=0.7, smooth_nr=0, smooth_dr=0, reduction="none")
    torch.testing.assert_close(per_item(p, y), torch.tensor([[1 - ti0, 1 - ti1]], dtype=DT))


def test_soft_dice_known_value():
    x, y = hand_case()
    # class 1: tp = 3/4, Σp = 5/4, Σg = 1
    dice = (2 * 0.75 + EPS) / (1.25 + 1.0 + EPS)
    assert SoftDiceLoss()(x, y).item() == pytest.approx(-dice, abs=1e-12)
    assert SoftDiceLoss(convention="monai")(x, y).item() == pytest.approx(1 - dice, abs=1e-12)
    # with background: class 0: p = [1/2, 1/4], g = [1, 0]: tp 1/2, Σp 3/4, Σg 1
    dice0 = (2 * 0.5 + EPS) / (0.75 + 1.0 + EPS)
    assert SoftDiceLoss(include_background=True)(x, y).item() == pytest.approx(-(dice0 + dice) / 2, abs=1e-12)


def test_cross_entropy_known_value():
    x, y = hand_case()
    assert CrossEntropyLoss()(x, y).item() == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, abs=1e-12)
    # weights: (1·ln 2 + 3·ln 4/3) / (1 + 3)
    w = CrossEntropyLoss(weight=[1.0, 3.0])(x, y).item()
    assert w == pytest.approx((math.log(2) + 3 * math.log(4 / 3)) / 4, abs=1e-12)
    # voxel 0 ignored → only -ln(3/4)
    y_ign = torch.tensor([5, 1]).reshape(1, 1, 2, 1, 1)
    assert CrossEntropyLoss(ignore_index=5)(x, y_ign).item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    none = CrossEntropyLoss(ignore_index=5, reduction="none")(x, y_ign)
    torch.testing.assert_close(none, torch.tensor([0.0, math.log(4 / 3)], dtype=DT).reshape(1, 2, 1, 1))


def _hand_trs_whole_patch() -> float:
    # one cell: means over the 2 voxels
    tp, fp, fn = 0.75 / 2, 0.5 / 2, 0.25 / 2
    alpha = 0.3 + 0.4 * (fp + EPS) / (fp + fn + EPS)
    beta = 0.3 + 0.4 * (fn + EPS) / (fp + fn + EPS)
    return (tp + EPS) / (tp + alpha * fp + beta * fn + EPS)


def test_region_tversky_known_value_one_cell():
    x, y = hand_case()
    loss = RegionSpecificTverskyLoss(num_regions=(1, 1, 1))
    assert loss(x, y).item() == pytest.approx(-_hand_trs_whole_patch(), abs=1e-12)


def test_region_tversky_known_value_two_cells():
    x, y = hand_case()
    # cell 0 = voxel 0: p 1/2, g 0 → TP 0, FP 1/2, FN 0 → α = 0.7, TI = ε / (0.7·0.5 + ε)
    beta0 = 0.3 + 0.4 * EPS / (0.5 + EPS)
    ti0 = EPS / (0.7 * 0.5 + beta0 * 0 + EPS)
    # cell 1 = voxel 1: p 3/4, g 1 → TP 3/4, FP 0, FN 1/4 → β = 0.7, TI = (3/4 + ε) / (3/4 + 0.7/4 + ε)
    ti1 = (0.75 + EPS) / (0.75 + 0.7 * 0.25 + EPS)
    loss = RegionSpecificTverskyLoss(num_regions=(2, 1, 1))
    assert loss(x, y).item() == pytest.approx(-(ti0 + ti1) / 2, abs=1e-12)


def test_compound_known_value():
    x, y = hand_case()
    ce = (math.log(2) + math.log(4 / 3)) / 2
    dice = (2 * 0.75 + EPS) / (2.25 + EPS)
    expected = 1.0 * ce - 1.0 * dice - 0.8 * _hand_trs_whole_patch()
    assert DiceCETverskyLoss(num_regions=(1, 1, 1))(x, y).item() == pytest.approx(expected, abs=1e-12)
    assert MambaClinixLoss is DiceCETverskyLoss
    custom = DiceCETverskyLoss(lambda_ce=0.5, lambda_dice=2.0, lambda_trs=0.0, num_regions=(1, 1, 1))
    assert custom(x, y).item() == pytest.approx(0.5 * ce - 2.0 * dice, abs=1e-12)


# --------------------------------------------------------------------------------------------------------
# equivalences and independent references
# --------------------------------------------------------------------------------------------------------
def _random_case(b=2, k=3, spatial=(5, 6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, k, *spatial, generator=g, dtype=DT) * 2
    y = torch.randint(0, k, (b, 1, *spatial), generator=g)
    return x, y


@pytest.mark.parametrize("batch", [False, True])
def test_tversky_half_half_equals_soft_dice(batch):
    x, y = _random_case()
    s = 1e-3
    tv = TverskyLoss(
        softmax=True, to_onehot_y=True, alpha=0.5, beta=0.5, smooth_nr=s, smooth_dr=s, batch=batch
    )
    # TI(½, ½) = (tp + s) / (tp + ½fp + ½fn + s) = (2tp + 2s) / (Σp + Σg + 2s)
    dice = SoftDiceLoss(
        include_background=True, convention="monai", smooth_nr=2 * s, smooth_dr=2 * s, batch=batch
    )
    torch.testing.assert_close(tv(x, y), dice(x, y), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", [False, True])
def test_region_tversky_one_cell_half_half_equals_soft_dice(batch):
    x, y = _random_case(spatial=(4, 3, 5))
    n_vox = 4 * 3 * 5
    eps = 1e-4
    trs = RegionSpecificTverskyLoss(num_regions=(1, 1, 1), A=0.5, B=0.0, smooth=eps, batch=batch)
    # cell means = sums / N, so TI = (Σtp/N + ε)/(... + ε) equals soft Dice with smooth = 2·N·ε
    dice = SoftDiceLoss(smooth_nr=2 * n_vox * eps, smooth_dr=2 * n_vox * eps, batch=batch)
    torch.testing.assert_close(trs(x, y), dice(x, y), rtol=0, atol=1e-12)


def _cell_bounds(length: int, n: int) -> list[tuple[int, int]]:
    # AdaptiveAvgPool boundaries: start = floor(i·L/n), end = ceil((i+1)·L/n)
    return [(math.floor(i * length / n), math.ceil((i + 1) * length / n)) for i in range(n)]


def reference_region_tversky(x, y, grid, A=0.3, B=0.4, eps=1e-5, batch=False, detach=False):
    """Straightforward loop over samples, classes and cells (explicit slicing); −mean TI, no background."""
    p = torch.softmax(x, dim=1)
    k = x.shape[1]
    g = F.one_hot(y[:, 0], k).movedim(-1, 1).to(x.dtype)
    b_n, spatial = x.shape[0], x.shape[2:]
    cells = [
        (slice(*bz), slice(*by), slice(*bx))
        for bz in _cell_bounds(spatial[0], grid[0])
        for by in _cell_bounds(spatial[1], grid[1])
        for bx in _cell_bounds(spatial[2], grid[2])
    ]

    def stats(b, c, cell):
        cp, cg = p[(b, c, *cell)], g[(b, c, *cell)]
        return (cp * cg).mean(), (cp * (1 - cg)).mean(), ((1 - cp) * cg).mean()

    def ti(tp, fp, fn):
        wfp, wfn = (fp.detach(), fn.detach()) if detach else (fp, fn)
        alpha = A + B * (wfp + eps) / (wfp + wfn + eps)
        beta = A + B * (wfn + eps) / (wfp + wfn + eps)
        return (tp + eps) / (tp + alpha * fp + beta * fn + eps)

    values = []
    for c in range(1, k):
        if batch:
            per_cell = []
            for cell in cells:
                s = [stats(b, c, cell) for b in range(b_n)]
                per_cell.append(ti(*(sum(v[i] for v in s) for i in range(3))))
            values.append(torch.stack(per_cell).mean())
        else:
            for b in range(b_n):
                values.append(torch.stack([ti(*stats(b, c, cell)) for cell in cells]).mean())
    return -torch.stack(values).mean()


@pytest.mark.parametrize(
    "spatial, grid, batch, detach",
    [
        ((5, 7, 6), (2, 3, 4), False, False),  # uneven cells
        ((5, 7, 6), (2, 3, 4), True, False),  # batch dice
        ((6, 4, 5), (3, 2, 2), False, True),  # detached α, β
        ((3, 2, 5), (4, 3, 2), False, False),  # grid larger than the input: overlapping 1-voxel cells
    ],
)
def test_region_tversky_matches_loop_reference_values_and_grads(spatial, grid, batch, detach):
    x, y = _random_case(b=2, k=3, spatial=spatial, seed=1)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    ours = RegionSpecificTverskyLoss(num_regions=grid, batch=batch, detach_weights=detach)(x1, y)
    ref = reference_region_tversky(x2, y, grid, batch=batch, detach=detach)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (g1,) = torch.autograd.grad(ours, x1)
    (g2,) = torch.autograd.grad(ref, x2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert g1.abs().sum() > 0


def test_region_tversky_detach_changes_gradient_not_value():
    x, y = _random_case(seed=3)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    la = RegionSpecificTverskyLoss(num_regions=(2, 2, 2))(xa, y)
    lb = RegionSpecificTverskyLoss(num_regions=(2, 2, 2), detach_weights=True)(xb, y)
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-15)
    (ga,) = torch.autograd.grad(la, xa)
    (gb,) = torch.autograd.grad(lb, xb)
    assert (ga - gb).abs().max() > 1e-8


def test_region_tversky_clamp_grid_and_defaults():
    x, y = _random_case(spatial=(2, 6, 5))
    clamped = RegionSpecificTverskyLoss(num_regions=(4, 3, 2), clamp_grid=True)(x, y)
    explicit = RegionSpecificTverskyLoss(num_regions=(2, 3, 2))(x, y)
    torch.testing.assert_close(clamped, explicit, rtol=0, atol=1e-15)
    overlapping = RegionSpecificTverskyLoss(num_regions=(4, 3, 2))(x, y)
    assert torch.isfinite(overlapping)
    assert RegionSpecificTverskyLoss().num_regions == (8, 8, 14)
    assert grid_from_patch_size((128, 128, 224)) == (8, 8, 14)
    assert grid_from_patch_size((40, 10, 7), region_size=(16, 16, 4)) == (2, 1, 1)
    assert RegionSpecificTverskyLoss(patch_size=(64, 96, 32), region_size=16).num_regions == (4, 6, 2)


def test_region_tversky_2d_and_none_reduction():
    x, y = _random_case(b=2, k=3, spatial=(6, 5))
    loss = RegionSpecificTverskyLoss(num_regions=(2, 2), reduction="none")
    out = loss(x, y)
    assert out.shape == (2, 2)
    mean = RegionSpecificTverskyLoss(num_regions=(2, 2))(x, y)
    total = RegionSpecificTverskyLoss(num_regions=(2, 2), reduction="sum")(x, y)
    torch.testing.assert_close(out.mean(), mean)
    torch.testing.assert_close(out.sum(), total)
    assert RegionSpecificTverskyLoss(num_regions=(2, 2), batch=True, reduction="none")(x, y).shape == (2,)


def test_cross_entropy_matches_torch_and_all_ignored_is_zero():
    x, y = _random_case(k=4)
    y = y.clone()
    y[0, 0, 0] = 9
    w = torch.tensor([0.5, 1.0, 2.0, 0.1])
    ours = CrossEntropyLoss(weight=w, ignore_index=9)(x, y)
    ref = F.cross_entropy(x, y[:, 0], weight=w.to(DT), ignore_index=9)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    onehot = F.one_hot(torch.randint(0, 4, (2, 5, 6, 4)), 4).movedim(-1, 1).to(DT)
    torch.testing.assert_close(CrossEntropyLoss()(x, onehot), F.cross_entropy(x, onehot), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    all_ignored = CrossEntropyLoss(ignore_index=9)(xr, torch.full_like(y, 9))
    assert all_ignored.item() == 0.0
    (grad,) = torch.autograd.grad(all_ignored, xr)
    assert torch.isfinite(grad).all() and grad.abs().sum() == 0


def test_ignore_index_equals_dropping_the_voxels():
    x, y = _random_case(spatial=(4, 5, 6))
    y_ign = y.clone()
    y_ign[..., -1] = -1  # ignore the last slice
    for cls, kw in ((SoftDiceLoss, {}), (CrossEntropyLoss, {})):
        ignored = cls(ignore_index=-1, **kw)(x, y_ign)
        cropped = cls(**kw)(x[..., :-1], y[..., :-1])
        torch.testing.assert_close(ignored, cropped, rtol=0, atol=1e-12)
    # L_TRS: the logits at ignored voxels do not matter
    x_changed = x.clone()
    x_changed[..., -1] = torch.randn_like(x_changed[..., -1]) * 5
    trs = RegionSpecificTverskyLoss(num_regions=(2, 2, 3), ignore_index=-1)
    torch.testing.assert_close(trs(x, y_ign), trs(x_changed, y_ign), rtol=0, atol=1e-12)
    compound = DiceCETverskyLoss(num_regions=(2, 2, 3), ignore_index=-1)
    torch.testing.assert_close(compound(x, y_ign), compound(x_changed, y_ign), rtol=0, atol=1e-12)


def test_compound_equals_sum_of_its_terms():
    x, y = _random_case(spatial=(6, 4, 8))
    kw = {"num_regions": (3, 2, 4), "batch": True}
    total = DiceCETverskyLoss(lambda_ce=1.0, lambda_dice=1.0, lambda_trs=0.8, **kw)(x, y)
    parts = (
        CrossEntropyLoss()(x, y)
        + SoftDiceLoss(batch=True)(x, y)
        + 0.8 * RegionSpecificTverskyLoss(num_regions=(3, 2, 4), batch=True)(x, y)
    )
    torch.testing.assert_close(total, parts, rtol=0, atol=1e-12)


def test_target_formats_are_equivalent():
    x, y = _random_case()
    onehot = F.one_hot(y[:, 0], 3).movedim(-1, 1)
    for loss in (SoftDiceLoss(), CrossEntropyLoss(), RegionSpecificTverskyLoss(num_regions=(2, 2, 2))):
        a = loss(x, y)
        torch.testing.assert_close(loss(x, y[:, 0]), a, rtol=0, atol=1e-12)
        torch.testing.assert_close(loss(x, onehot.float()), a, rtol=0, atol=1e-12)
        torch.testing.assert_close(loss(x, y.double()), a, rtol=0, atol=1e-12)


def test_autocast_half_input_is_computed_in_fp32():
    x, y = _random_case(spatial=(4, 4, 4))
    xb = x.to(torch.bfloat16)
    for loss in (
        DiceCETverskyLoss(num_regions=(2, 2, 2)),
        TverskyLoss(softmax=True, to_onehot_y=True),
        CrossEntropyLoss(),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(xb, y)
        assert out.dtype == torch.float32
        ref = loss(xb.float(), y)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------
# deep supervision
# --------------------------------------------------------------------------------------------------------
def test_deep_supervision_default_weights():
    w = deep_supervision_weights(5)
    assert w == pytest.approx((8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0), abs=1e-15)
    assert deep_supervision_weights(1) == (1.0,)
    assert deep_supervision_weights(2) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((8, 12, 6), (4, 6, 3)), ((8, 12, 6), (2, 3, 3)), ((8, 12, 6), (3, 5, 4)), ((7, 9, 11), (3, 4, 5))],
)
def test_downsample_labels_is_an_order0_resize_as_scipy_zoom(shape, size):
    """nnU-Net's deep-supervision targets: skimage's order-0 resize, i.e. scipy's zoom with grid_mode."""
    from scipy import ndimage

    y = torch.randint(0, 5, (2, 1, *shape))
    zoom = [s / n for s, n in zip(size, shape, strict=True)]
    ref = np.stack(
        [ndimage.zoom(v[0].numpy(), zoom, order=0, grid_mode=True, mode="grid-constant") for v in y]
    )
    assert ref.shape[1:] == size
    np.testing.assert_array_equal(downsample_labels(y, size)[:, 0].numpy(), ref)
    np.testing.assert_array_equal(downsample_labels(y[:, 0], size).numpy(), ref)
    assert downsample_labels(y.bool(), size).dtype == torch.bool


def test_downsample_labels_takes_the_voxel_nearest_each_coarse_centre():
    # factor 2: coarse voxel i is centred between fine voxels 2i and 2i + 1; the centre-right one is taken
    y = torch.arange(8).reshape(1, 8, 1, 1).expand(1, 8, 2, 2)
    assert downsample_labels(y, (4, 1, 1)).flatten().tolist() == [1, 3, 5, 7]
    # factor 3: the middle voxel of each triple
    y = torch.arange(9).reshape(1, 9, 1, 1)
    assert downsample_labels(y, (3, 1, 1)).flatten().tolist() == [1, 4, 7]


class _CountingLoss(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.shapes = []

    def forward(self, x, y):
        self.shapes.append((tuple(x.shape), tuple(y.shape)))
        return self.inner(x, y)


def test_deep_supervision_weighted_sum_and_skips_zero_weights():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (2, 1, 16, 8, 8), generator=g)
    outs = [torch.randn(2, 3, 16 // 2**i, 8 // 2**i, 8 // 2**i, generator=g, dtype=DT) for i in range(4)]
    inner = DiceCETverskyLoss(num_regions=(2, 2, 2))
    counting = _CountingLoss(inner)
    ds = DeepSupervisionLoss(counting)
    total = ds(outs, y)
    w = (4 / 7, 2 / 7, 1 / 7)
    # order-0 targets: of each 2**i block the voxel nearest the block's centre (index 2**i // 2 in it)
    expected = sum(
        wi * inner(o, y[..., 2**i // 2 :: 2**i, 2**i // 2 :: 2**i, 2**i // 2 :: 2**i])
        for i, (wi, o) in enumerate(zip(w, outs[:3], strict=True))
    )
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-12)
    assert [s[0][2:] for s in counting.shapes] == [(16, 8, 8), (8, 4, 4), (4, 2, 2)]  # coarsest skipped
    assert [s[1][2:] for s in counting.shapes] == [(16, 8, 8), (8, 4, 4), (4, 2, 2)]
    # explicit weights and pre-downsampled targets
    targets = [y[..., :: 2**i, :: 2**i, :: 2**i] for i in range(4)]
    explicit = DeepSupervisionLoss(inner, weights=[0.0, 1.0, 0.0, 0.5])(outs, targets)
    torch.testing.assert_close(explicit, inner(outs[1], targets[1]) + 0.5 * inner(outs[3], targets[3]))
    single = DeepSupervisionLoss(inner)(outs[0], y)
    torch.testing.assert_close(single, inner(outs[0], y))


# --------------------------------------------------------------------------------------------------------
# validation: each bad input gives a ValueError that says what was expected
# --------------------------------------------------------------------------------------------------------
ALL_LOSSES = [
    pytest.param(lambda: SoftDiceLoss(), id="SoftDiceLoss"),
    pytest.param(lambda: CrossEntropyLoss(), id="CrossEntropyLoss"),
    pytest.param(lambda: RegionSpecificTverskyLoss(num_regions=(2, 2, 2)), id="RegionSpecificTverskyLoss"),
    pytest.param(lambda: DiceCETverskyLoss(num_regions=(2, 2, 2)), id="DiceCETverskyLoss"),
    pytest.param(lambda: TverskyLoss(softmax=True, to_onehot_y=True), id="TverskyLoss"),
    pytest.param(lambda: DiceCELoss(softmax=True, to_onehot_y=True), id="DiceCELoss"),
]


@pytest.mark.parametrize("make", ALL_LOSSES)
def test_bad_forward_inputs_raise_value_error(make):
    loss = make()
    x, y = _random_case(b=2, k=3, spatial=(4, 4, 4))
    with pytest.raises(
        ValueError, match=r"target has shape \(2, 1, 4, 4, 3\).*input has shape \(2, 3, 4, 4, 4\)"
    ):
        loss(x, y[..., :3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*found value\(s\) \[3\]"):
        loss(x, torch.where(y == 1, 3, y))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*\[-1\]"):
        loss(x, torch.where(y == 1, -1, y))
    with pytest.raises(ValueError, match="integer values"):
        loss(x, y.double() + 0.5)
    x_nan = x.clone()
    x_nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"input.*must be finite, found 1 NaN"):
        loss(x_nan, y)
    with pytest.raises(ValueError, match=r"input must have shape \(B, K, \*spatial\)"):
        loss(x[0, 0, 0], y)
    with pytest.raises(ValueError, match="floating-point"):
        loss(y.expand(2, 3, 4, 4, 4), y)


def test_huge_but_finite_logits_pass_the_finiteness_check():
    # the fast screen sums the logits; an overflowing sum must fall back to the exact per-element check
    x = torch.full((1, 2, 2, 2, 2), 3e38)
    x[:, 1] = -3e38
    y = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    assert CrossEntropyLoss()(x, y).item() == 0.0
    x_inf = x.clone()
    x_inf[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="found 0 NaN and 1 inf"):
        CrossEntropyLoss()(x_inf, y)


def test_one_hot_target_validation_and_to_onehot_y_mismatch():
    x, y = _random_case(k=3, spatial=(4, 4, 4))
    bad = F.one_hot(y[:, 0], 3).movedim(-1, 1).double() * 2
    with pytest.raises(ValueError, match=r"one-hot target.*\[0, 1\]"):
        SoftDiceLoss()(x, bad)
    with pytest.raises(ValueError, match="set to_onehot_y=True"):
        TverskyLoss(softmax=True)(x, y)
    with pytest.raises(ValueError, match="to_onehot_y=True expects integer labels"):
        DiceCELoss(to_onehot_y=True)(x, bad / 2)
    with pytest.raises(ValueError, match="ignore_index=4 needs an integer-label target"):
        CrossEntropyLoss(ignore_index=4)(x, bad / 2)


def test_label_equal_to_ignore_index_is_allowed_only_when_set():
    x, y = _random_case(k=3, spatial=(4, 4, 4))
    y = y.clone()
    y[0, 0, 0, 0, 0] = 3  # nnU-Net's ignore label = K
    assert torch.isfinite(CrossEntropyLoss(ignore_index=3)(x, y))
    assert torch.isfinite(DiceCETverskyLoss(num_regions=(2, 2, 2), ignore_index=3)(x, y))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        CrossEntropyLoss()(x, y)


def test_forward_config_mismatches_raise_value_error():
    x, y = _random_case(k=3, spatial=(4, 4, 4))
    with pytest.raises(ValueError, match=r"grid num_regions=\(2, 2\) has 2 axes.*3 spatial dims"):
        RegionSpecificTverskyLoss(num_regions=(2, 2))(x, y)
    with pytest.raises(ValueError, match="weight has 2 entries but input has K = 3"):
        CrossEntropyLoss(weight=[1.0, 2.0])(x, y)
    with pytest.raises(ValueError, match="at least 2 channel"):
        RegionSpecificTverskyLoss(num_regions=(2, 2, 2))(x[:, :1], y.clamp(max=0))
    ds = DeepSupervisionLoss(SoftDiceLoss(), weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="got 3 outputs but 2 weights"):
        ds([x, x[..., ::2, ::2, ::2], x[..., ::4, ::4, ::4]], y)
    with pytest.raises(ValueError, match="same \\(B, K\\)"):
        DeepSupervisionLoss(SoftDiceLoss())([x, x[:, :2, ::2, ::2, ::2]], y)
    with pytest.raises(ValueError, match="got 2 outputs but 1 targets"):
        DeepSupervisionLoss(SoftDiceLoss())([x, x[..., ::2, ::2, ::2]], [y])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SoftDiceLoss(reduction="avg"), "reduction must be one of"),
        (lambda: SoftDiceLoss(convention="other"), "convention must be one of"),
        (lambda: SoftDiceLoss(smooth_nr=-1.0), "smooth_nr must be a finite number >= 0"),
        (lambda: TverskyLoss(alpha=-0.1), "alpha must be a finite number >= 0"),
        (lambda: TverskyLoss(sigmoid=True, softmax=True), "at most one of sigmoid"),
        (lambda: TverskyLoss(other_act="relu"), "other_act must be None or a callable"),
        (lambda: DiceCELoss(reduction="none"), "reduction must be one of \\('mean', 'sum'\\)"),
        (lambda: DiceCELoss(lambda_ce=-1.0), "lambda_ce"),
        (lambda: CrossEntropyLoss(weight=[1.0, -1.0]), "weight must be finite, >= 0"),
        (lambda: CrossEntropyLoss(ignore_index=1.5), "ignore_index must be None or an int"),
        (
            lambda: RegionSpecificTverskyLoss(num_regions=(0, 2, 2)),
            "num_regions must hold 1 to 3 positive ints",
        ),
        (lambda: RegionSpecificTverskyLoss(num_regions=(2, 2), patch_size=(8, 8)), "not both"),
        (lambda: RegionSpecificTverskyLoss(patch_size=(8, 8, 8, 8)), "patch_size must hold 1 to 3"),
        (lambda: RegionSpecificTverskyLoss(A=0.0, B=0.0), "A \\+ B must be > 0"),
        (lambda: RegionSpecificTverskyLoss(smooth=0.0), "smooth"),
        (lambda: DiceCETverskyLoss(lambda_ce=0, lambda_dice=0, lambda_trs=0), "at least one of"),
        (lambda: DiceCETverskyLoss(reduction="none"), "reduction must be one of"),
        (lambda: DeepSupervisionLoss(SoftDiceLoss(), weights=[0.0, 0.0]), "not all 0"),
        (lambda: DeepSupervisionLoss(SoftDiceLoss(), weights=[1.0, -1.0]), ">= 0"),
        (lambda: DeepSupervisionLoss("loss"), "loss must be a callable"),
    ],
)
def test_bad_init_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------------------------------
# reductions and property tests
# --------------------------------------------------------------------------------------------------------
def test_reduction_shapes_and_consistency():
    x, y = _random_case(b=2, k=4)
    for cls, kw in (
        (SoftDiceLoss, {}),
        (TverskyLoss, {"softmax": True, "to_onehot_y": True}),
        (RegionSpecificTverskyLoss, {"num_regions": (2, 2, 2)}),
    ):
        none = cls(reduction="none", **kw)(x, y)
        c = 4 if cls is TverskyLoss else 3
        assert none.shape == (2, c)
        torch.testing.assert_close(cls(reduction="sum", **kw)(x, y), none.sum())
        torch.testing.assert_close(cls(reduction="mean", **kw)(x, y), none.mean())
        assert cls(reduction="none", batch=True, **kw)(x, y).shape == (c,)
    assert CrossEntropyLoss(reduction="none")(x, y).shape == (2, 5, 6, 4)


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 2),
    k=st.integers(2, 4),
    d=st.integers(1, 5),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    scale=st.floats(0.0, 30.0),
    batch=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_losses_in_range_and_gradients_finite(b, k, d, h, w, scale, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, k, d, h, w, generator=g) * scale).requires_grad_(True)
    y = torch.randint(0, k, (b, 1, d, h, w), generator=g)
    checks = [
        (SoftDiceLoss(batch=batch), -1.0, 0.0),
        (RegionSpecificTverskyLoss(num_regions=(2, 3, 4), batch=batch), -1.0, 0.0),
        (TverskyLoss(softmax=True, to_onehot_y=True, batch=batch, alpha=0.3, beta=0.7), 0.0, 1.0),
        (CrossEntropyLoss(), 0.0, math.inf),
        (DiceCETverskyLoss(num_regions=(2, 3, 4), batch=batch), -1.8, math.inf),
    ]
    for loss, lo, hi in checks:
        out = loss(x, y)
        assert torch.isfinite(out)
        assert lo - 1e-6 <= out.item() <= hi + 1e-6
        (grad,) = torch.autograd.grad(out, x)
        assert torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------------
# import hygiene: the losses depend on torch only (STYLE.md habit 1)
# --------------------------------------------------------------------------------------------------------
def test_losses_import_only_torch_and_the_stdlib():
    import ast
    import sys
    from pathlib import Path

    import mambaclinix.losses as losses_pkg

    allowed = {"torch", "mambaclinix"} | set(sys.stdlib_module_names)
    for path in Path(losses_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("mambaclinix"):
                    assert name.startswith("mambaclinix.losses"), f"{path.name} imports {name}"


def test_importing_losses_does_not_load_metrics_dependencies():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, mambaclinix.losses; "
        "bad = [m for m in ('torchmetrics', 'scipy', 'monai', 'lightning') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
