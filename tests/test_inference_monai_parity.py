"""``mambaclinix.inference.sliding_window_inference`` against MONAI's (needs the ``dev`` extra's monai).

The same call goes to both functions, MONAI's signature being ours. Two linear predictors are used:

* ``pointwise``: a 1×1×1 convolution with bias. Its stitched result does not depend on where the windows
  are or how they are weighted, so both functions must return it exactly, whatever their placement.
* ``contextual``: a 3×3×3 convolution with zero padding at the window's border plus a term that depends
  on the position inside the window. Its stitched result depends on every window's position and weight,
  so it checks padding, window placement, pooling of windows into batches, weighting and normalisation.

The two definitions differ in window placement (nnU-Net's even spread against MONAI's integer step with
the last window shifted back) and in MONAI's 1e-3 floor on Gaussian weights; see the docstring of
:func:`~mambaclinix.inference.sliding_window_inference`. The contextual predictor is compared where the
placements coincide (checked here from the windows MONAI reports with ``with_coord=True``), and with
Gaussian weights either with a σ whose weights stay above the floor or with our map given to MONAI.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

monai_inferers = pytest.importorskip("monai.inferers")
monai_data_utils = pytest.importorskip("monai.data.utils")

from mambaclinix.inference import gaussian_importance_map, sliding_window_inference, window_slices  # noqa: E402

EXACT = {"rtol": 1e-12, "atol": 1e-12}
# MONAI computes its Gaussian map in float32 also for float64 inputs, so Gaussian results agree to that.
GAUSS = {"rtol": 1e-6, "atol": 1e-6}

_g = torch.Generator().manual_seed(20240912)
W_POINT = torch.randn(3, 2, generator=_g, dtype=torch.float64)
B_POINT = torch.randn(3, generator=_g, dtype=torch.float64)
W_CONV = torch.randn(3, 2, 3, 3, 3, generator=_g, dtype=torch.float64)


def pointwise(t: torch.Tensor) -> torch.Tensor:
    w, b = W_POINT.to(t), B_POINT.to(t)
    return torch.einsum("kc,bc...->bk...", w, t) + b.reshape(1, 3, *([1] * (t.ndim - 2)))


def contextual(t: torch.Tensor) -> torch.Tensor:
    """Linear in ``t``, but neither pointwise nor translation-equivariant: zero padding at the window's
    border and a ramp over the window's own coordinates."""
    d, h, w = t.shape[2:]
    ramp = (
        torch.linspace(-1, 1, d, dtype=t.dtype).view(d, 1, 1)
        + 0.5 * torch.linspace(0, 1, h, dtype=t.dtype).view(1, h, 1)
        - 0.25 * torch.linspace(-1, 0, w, dtype=t.dtype).view(1, 1, w)
    )
    return F.conv3d(t, W_CONV.to(t), padding=1) + ramp


def _monai(*args, **kwargs) -> torch.Tensor:
    return monai_inferers.sliding_window_inference(*args, **kwargs)


def _monai_windows(x: torch.Tensor, roi, overlap) -> list[tuple[slice, ...]]:
    """The windows MONAI predicts (spatial slices in the padded volume), read from ``with_coord``."""
    seen: list[tuple[slice, ...]] = []

    def record(t, coords):
        seen.extend(tuple(c[2:]) for c in coords)
        return t

    _monai(x[:1, :1], roi, 1, record, overlap=overlap, with_coord=True)
    return seen


def _padded(shape, roi):
    return tuple(max(s, r) for s, r in zip(shape, roi, strict=True))


# (spatial shape, roi, overlap) where MONAI's and nnU-Net's windows coincide: roi * (1 - overlap) is a whole
# number dividing size - roi on every axis, or the roi covers the axis (also after padding).
AGREE = [
    ((16, 12, 20), (8, 8, 8), 0.5),  # the roi divides no axis but 16; steps of 4 divide size - roi
    ((14, 20, 8), (8, 8, 8), 0.25),  # step 6
    ((12, 10, 8), (8, 4, 8), 0.75),  # steps 2 and 1
    ((16, 24, 8), (8, 8, 8), 0.0),  # tiling
    ((5, 16, 12), (8, 8, 8), 0.5),  # axis 0 padded from 5 to 8
    ((12, 12, 12), (6, 6, 6), (0.5, 0.0, 0.5)),  # one overlap per axis
]
# ... and where they do not (roi * (1 - overlap) not whole, or not dividing size - roi).
DIFFER = [
    ((19, 13, 10), (8, 8, 8), 0.5),
    ((20, 20, 20), (8, 8, 8), 0.0),
    ((17, 11, 9), (8, 6, 4), 0.25),
    ((11, 9, 7), (5, 5, 5), 0.3),
]


def _ids(cases):
    return [f"{'x'.join(map(str, s))}-roi{'x'.join(map(str, r))}-ov{o}" for s, r, o in cases]


@pytest.mark.parametrize(("shape", "roi", "overlap"), AGREE, ids=_ids(AGREE))
def test_window_positions_coincide(shape, roi, overlap):
    x = torch.zeros(1, 1, *shape)
    assert sorted(_monai_windows(x, roi, overlap), key=str) == sorted(
        window_slices(_padded(shape, roi), roi, overlap), key=str
    )


@pytest.mark.parametrize(("shape", "roi", "overlap"), DIFFER, ids=_ids(DIFFER))
def test_window_positions_differ(shape, roi, overlap):
    x = torch.zeros(1, 1, *shape)
    assert sorted(_monai_windows(x, roi, overlap), key=str) != sorted(
        window_slices(_padded(shape, roi), roi, overlap), key=str
    )


def test_window_positions_hand_computed_difference():
    # size 20, roi 8, overlap 0: MONAI steps by 8 and shifts the last window back to 12, so windows 2 and
    # 3 share 4 voxels and windows 1 and 2 none; nnU-Net spreads 3 windows evenly: 0, 6, 12.
    x = torch.zeros(1, 1, 20, 8, 8)
    assert sorted({w[0].start for w in _monai_windows(x, (8, 8, 8), 0.0)}) == [0, 8, 12]
    assert sorted({w[0].start for w in window_slices((20, 8, 8), (8, 8, 8), 0.0)}) == [0, 6, 12]


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize(("shape", "roi", "overlap"), AGREE + DIFFER, ids=_ids(AGREE + DIFFER))
def test_pointwise_predictor_equal_for_any_placement(shape, roi, overlap, sw_batch_size, mode):
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    args = (x, roi, sw_batch_size, pointwise)
    ours = sliding_window_inference(*args, overlap=overlap, mode=mode)
    theirs = _monai(*args, overlap=overlap, mode=mode)
    assert ours.shape == theirs.shape == (2, 3, *shape) and ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, **EXACT)
    torch.testing.assert_close(ours, pointwise(x), **EXACT)


def test_pointwise_predictor_2d():
    x = torch.randn(2, 2, 20, 13, dtype=torch.float64)
    ours = sliding_window_inference(x, (8, 8), 4, pointwise, 0.5, "gaussian")
    torch.testing.assert_close(ours, _monai(x, (8, 8), 4, pointwise, 0.5, "gaussian"), **EXACT)


@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize(("shape", "roi", "overlap"), AGREE, ids=_ids(AGREE))
def test_contextual_predictor_constant_mode(shape, roi, overlap, sw_batch_size):
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    ours = sliding_window_inference(x, roi, sw_batch_size, contextual, overlap, "constant")
    theirs = _monai(x, roi, sw_batch_size, contextual, overlap, "constant")
    torch.testing.assert_close(ours, theirs, **EXACT)
    assert not torch.allclose(ours, pointwise(x))  # the windows really matter


@pytest.mark.parametrize("sw_batch_size", [1, 3])
@pytest.mark.parametrize(("shape", "roi", "overlap"), AGREE, ids=_ids(AGREE))
def test_contextual_predictor_gaussian_mode(shape, roi, overlap, sw_batch_size):
    # sigma_scale 0.5: the smallest weight of a window is exp(-3 / 8) > 1e-3, so MONAI's floor is inactive.
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    kwargs = {"overlap": overlap, "mode": "gaussian", "sigma_scale": 0.5}
    ours = sliding_window_inference(x, roi, sw_batch_size, contextual, **kwargs)
    theirs = _monai(x, roi, sw_batch_size, contextual, **kwargs)
    torch.testing.assert_close(ours, theirs, **GAUSS)
    constant = sliding_window_inference(x, roi, sw_batch_size, contextual, overlap=overlap)
    coverage = torch.zeros(_padded(shape, roi))
    for sl in window_slices(coverage.shape, roi, overlap):
        coverage[sl] += 1
    if coverage.max() > 1:  # windows overlap somewhere: the weights really matter
        assert not torch.allclose(ours, constant)


@pytest.mark.parametrize(("shape", "roi", "overlap"), AGREE, ids=_ids(AGREE))
def test_contextual_predictor_default_sigma_with_our_weights(shape, roi, overlap):
    # With sigma_scale 1/8 MONAI raises the weights near a window's corners to 1e-3; given our map as its
    # roi_weight_map it stitches exactly as we do.
    x = torch.randn(1, 2, *shape, dtype=torch.float64)
    ours = sliding_window_inference(x, roi, 2, contextual, overlap, "gaussian")
    weights = gaussian_importance_map(roi, 0.125, dtype=torch.float64)
    theirs = _monai(x, roi, 2, contextual, overlap, "gaussian", roi_weight_map=weights)
    torch.testing.assert_close(ours, theirs, **EXACT)


@pytest.mark.parametrize("roi", [(8, 8, 8), (9, 6, 7), (16, 4, 5), (4, 4, 4)])
@pytest.mark.parametrize("sigma_scale", [0.125, 0.25, (0.5, 0.125, 1.0)])
def test_gaussian_map_is_monais_up_to_scale_and_floor(roi, sigma_scale):
    ours = gaussian_importance_map(roi, sigma_scale, dtype=torch.float64)
    theirs = monai_data_utils.compute_importance_map(roi, "gaussian", sigma_scale, "cpu", torch.float64)
    floored = theirs <= 1e-3 + 1e-9
    scale = theirs.max() / ours.max()  # < 1 on even axes, where MONAI's map peaks between two voxels
    torch.testing.assert_close(ours[~floored] * scale, theirs[~floored], rtol=1e-6, atol=0)
    assert (ours[floored] * scale <= 1e-3 + 1e-7).all()


def test_same_positional_call_with_defaults():
    # MONAI's defaults (overlap 0.25, constant weights): the plain four-argument call stitches the same.
    x = torch.randn(2, 2, 14, 20, 8, dtype=torch.float64)
    torch.testing.assert_close(
        sliding_window_inference(x, (8, 8, 8), 3, contextual), _monai(x, (8, 8, 8), 3, contextual), **EXACT
    )
    x = torch.randn(2, 2, 19, 13, 10, dtype=torch.float64)  # placements differ: pointwise still agrees
    torch.testing.assert_close(
        sliding_window_inference(x, 8, 3, pointwise), _monai(x, 8, 3, pointwise), **EXACT
    )


def test_same_full_positional_call():
    x = torch.randn(1, 2, 5, 16, 12, dtype=torch.float64)
    args = (x, (8, 8, 8), 2, contextual, 0.5, "gaussian", 0.5, "replicate", 0.0, "cpu", "cpu", False)
    ours, theirs = sliding_window_inference(*args), _monai(*args)
    assert ours.device == theirs.device == torch.device("cpu")
    torch.testing.assert_close(ours, theirs, **GAUSS)


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_modes(padding_mode):
    x = torch.randn(1, 2, 5, 16, 6, dtype=torch.float64)  # axes 0 and 2 padded to 8
    # torch.nn.functional.pad refuses a fill value for the other modes, which MONAI passes through.
    kwargs = {
        "overlap": 0.5,
        "padding_mode": padding_mode,
        "cval": -1.5 if padding_mode == "constant" else 0.0,
    }
    ours = sliding_window_inference(x, (8, 8, 8), 2, contextual, **kwargs)
    theirs = _monai(x, (8, 8, 8), 2, contextual, **kwargs)
    assert ours.shape == theirs.shape == (1, 3, 5, 16, 6)
    torch.testing.assert_close(ours, theirs, **EXACT)


def test_sw_device_and_device_on_cpu():
    x = torch.randn(2, 2, 16, 12, 20, dtype=torch.float64)
    seen: list[torch.device] = []

    def predictor(t):
        seen.append(t.device)
        return contextual(t)

    kwargs = {"overlap": 0.5, "sw_device": torch.device("cpu"), "device": "cpu"}
    ours = sliding_window_inference(x, (8, 8, 8), 4, predictor, **kwargs)
    theirs = _monai(x, (8, 8, 8), 4, predictor, **kwargs)
    assert set(seen) == {torch.device("cpu")}
    assert ours.device == theirs.device == torch.device("cpu")
    torch.testing.assert_close(ours, theirs, **EXACT)


def test_roi_entries_taken_from_the_input():
    x = torch.randn(1, 2, 16, 11, 20, dtype=torch.float64)
    for roi in [(8, -1, 8), (8, 0, 8), (8, None, 8)]:
        ours = sliding_window_inference(x, roi, 3, contextual, 0.5)
        torch.testing.assert_close(ours, _monai(x, roi, 3, contextual, 0.5), **EXACT)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_float32(mode):
    x = torch.randn(2, 2, 16, 12, 20)
    ours = sliding_window_inference(x, (8, 8, 8), 3, contextual, 0.5, mode, 0.5)
    theirs = _monai(x, (8, 8, 8), 3, contextual, 0.5, mode, 0.5)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
