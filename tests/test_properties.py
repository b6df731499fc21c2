"""Property-based tests (hypothesis) of the losses, the sliding window and the surface metrics.

Each property is checked against an independent statement (a bound, an invariance, a closed form or
``torch.nn.functional``), never against an earlier output. Example counts are small so the file runs in
seconds; shapes stay tiny.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mambaclinix.inference import sliding_window_inference
from mambaclinix.losses import (
    CrossEntropyLoss,
    DiceCETverskyLoss,
    RegionSpecificTverskyLoss,
    SoftDiceLoss,
    TverskyLoss,
)
from mambaclinix.metrics.functional import dice_score, hausdorff_distance_95, normalized_surface_dice

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logits_and_labels(draw, min_classes=2, max_classes=4):
    """Float64 logits ``(B, K, *S)`` and integer labels ``(B, 1, *S)``, 1 to 3 spatial dims."""
    ndim = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    b = draw(st.integers(1, 3))
    k = draw(st.integers(min_classes, max_classes))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    logits = torch.randn(b, k, *spatial, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, k, (b, 1, *spatial), generator=g)
    return logits, labels


def _onehot(labels: torch.Tensor, k: int) -> torch.Tensor:
    return F.one_hot(labels[:, 0], k).movedim(-1, 1).to(torch.float64)


# ------------------------------------------------------------------------------------------------ losses


@FAST
@given(logits_and_labels(), st.booleans(), st.booleans())
def test_soft_dice_is_bounded_and_batch_permutation_invariant(data, include_background, batch):
    logits, labels = data
    loss = SoftDiceLoss(include_background=include_background, batch=batch)
    value = loss(logits, labels)
    assert -1.0 - 1e-9 <= float(value) <= 0.0
    perm = torch.randperm(logits.shape[0])
    torch.testing.assert_close(loss(logits[perm], labels[perm]), value, rtol=1e-12, atol=1e-12)


@FAST
@given(logits_and_labels(), st.floats(0.0, 1.0))
def test_tversky_with_alpha_equal_beta_one_half_is_dice(data, smooth):
    # TI(α=β=½) = (TP + s/2) / (TP + ½FP + ½FN + s/2) = (2TP + s) / (2TP + FP + FN + s) = Dice(s)
    logits, labels = data
    tversky = TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.5, beta=0.5, smooth_nr=smooth / 2,
                          smooth_dr=smooth / 2 + 1e-12)  # fmt: skip
    dice = SoftDiceLoss(
        include_background=True, convention="monai", smooth_nr=smooth, smooth_dr=smooth + 2e-12
    )
    torch.testing.assert_close(tversky(logits, labels), dice(logits, labels), rtol=1e-9, atol=1e-9)


@FAST
@given(logits_and_labels(), st.sampled_from(["dice", "tversky", "region", "compound"]))
def test_perfect_prediction_reaches_the_best_value(data, which):
    _, labels = data
    k = int(labels.max()) + 2  # every class present in the target, plus one absent class
    logits = 60.0 * _onehot(labels, k)  # softmax ≈ one-hot of the target (error ~ e^-60)
    if which == "dice":  # −Dice: −1 for every present class, and for the absent class (smoothing: 0/0 → 1)
        value, best = SoftDiceLoss(include_background=True)(logits, labels), -1.0
    elif which == "tversky":
        value, best = TverskyLoss(softmax=True, to_onehot_y=True, alpha=0.3, beta=0.7)(logits, labels), 0.0
    elif which == "region":
        spatial = labels.shape[2:]
        grid = tuple(min(2, s) for s in spatial)
        value, best = RegionSpecificTverskyLoss(num_regions=grid)(logits, labels), -1.0
    else:  # 1·CE + 1·(−Dice) + 0.8·(−TI): the CE is ~0
        spatial = labels.shape[2:]
        value = DiceCETverskyLoss(num_regions=tuple(min(2, s) for s in spatial))(logits, labels)
        best = -1.8
    assert abs(float(value) - best) < 1e-6, (which, float(value))


@FAST
@given(logits_and_labels(), st.booleans())
def test_region_tversky_is_bounded(data, batch):
    logits, labels = data
    grid = tuple(min(2, s) for s in labels.shape[2:])
    value = RegionSpecificTverskyLoss(num_regions=grid, batch=batch)(logits, labels)
    assert -1.0 - 1e-9 <= float(value) <= 0.0


@FAST
@given(logits_and_labels())
def test_cross_entropy_matches_torch_and_is_permutation_invariant(data):
    logits, labels = data
    ce = CrossEntropyLoss()
    reference = F.cross_entropy(logits, labels[:, 0])
    torch.testing.assert_close(ce(logits, labels), reference, rtol=1e-10, atol=1e-12)
    perm = torch.randperm(logits.shape[0])
    torch.testing.assert_close(ce(logits[perm], labels[perm]), reference, rtol=1e-10, atol=1e-12)
    assert float(reference) >= 0.0


# --------------------------------------------------------------------------------------- sliding window


@st.composite
def windows(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 13), min_size=ndim, max_size=ndim)))
    roi = tuple(draw(st.lists(st.integers(1, 8), min_size=ndim, max_size=ndim)))  # may exceed the image
    overlap = draw(st.sampled_from([0.0, 0.25, 0.5, 0.55, 0.75, 0.9]))
    mode = draw(st.sampled_from(["gaussian", "constant"]))
    mirror = draw(st.sampled_from([None, (0,), tuple(range(ndim))]))
    padding = draw(st.sampled_from(["constant", "replicate"]))
    batch = draw(st.integers(1, 2))
    sw_batch = draw(st.integers(1, 5))
    return shape, roi, overlap, mode, mirror, padding, batch, sw_batch


@settings(max_examples=40, deadline=None)
@given(windows(), st.integers(0, 2**31 - 1))
def test_pointwise_predictors_are_reproduced_exactly(params, seed):
    shape, roi, overlap, mode, mirror, padding, batch, sw_batch = params
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, *shape, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 2, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)

    def linear(t):  # a 1×1×1 convolution with bias: pointwise, so the stitching must give it back
        return torch.einsum("kc,bc...->bk...", weight, t) + bias.reshape(1, 3, *([1] * (t.ndim - 2)))

    kwargs = dict(overlap=overlap, mode=mode, mirror_axes=mirror, padding_mode=padding)
    identity = sliding_window_inference(x, roi, sw_batch, lambda t: t, **kwargs)
    assert identity.shape == x.shape
    torch.testing.assert_close(identity, x, rtol=1e-12, atol=1e-12)
    out = sliding_window_inference(x, roi, sw_batch, linear, **kwargs)
    assert out.shape == (batch, 3, *shape)
    torch.testing.assert_close(out, linear(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ metrics


@st.composite
def masks_and_spacing(draw):
    shape = tuple(draw(st.lists(st.integers(2, 9), min_size=3, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    fill = draw(st.floats(0.05, 0.6))
    a = rng.random(shape) < fill
    b = rng.random(shape) < fill
    spacing = tuple(draw(st.lists(st.floats(0.25, 4.0), min_size=3, max_size=3)))
    return a, b, spacing


@FAST
@given(masks_and_spacing(), st.floats(0.5, 3.0))
def test_surface_metrics_under_random_spacings(data, factor):
    a, b, spacing = data
    if not a.any() or not b.any():
        return
    assert hausdorff_distance_95(a, a, spacing) == 0.0
    assert normalized_surface_dice(a, a, tolerance=0.0, spacing=spacing) == pytest.approx(1.0)
    hd = hausdorff_distance_95(a, b, spacing)
    assert hd == pytest.approx(hausdorff_distance_95(b, a, spacing))  # symmetric
    scaled = tuple(s * factor for s in spacing)  # distances are lengths: they scale with the grid
    assert hausdorff_distance_95(a, b, scaled) == pytest.approx(factor * hd, rel=1e-9, abs=1e-9)
    nsd = normalized_surface_dice(a, b, tolerance=1.0, spacing=spacing)
    assert 0.0 <= nsd <= 1.0
    # NSD depends on spacing and tolerance only through their ratio
    assert normalized_surface_dice(a, b, tolerance=factor, spacing=scaled) == pytest.approx(nsd)
    # the largest distance between two masks inside the grid is the image diagonal
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(a.shape, spacing, strict=True))))
    assert hd <= diagonal + 1e-9
    # Dice is a voxel count: the spacing plays no part; it is in [0, 1] and symmetric
    d = dice_score(a, b)
    assert 0.0 <= d <= 1.0 and d == dice_score(b, a)
    assert d == pytest.approx(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
