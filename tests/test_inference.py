"""Sliding-window inference and the label-map writer (mambaclinix.inference).

Stitching is checked against predictors whose whole-volume answer is known in closed form (identity,
``x + 1``, a constant, a 1×1×1 convolution, softmax), window positions against hand-computed starts, and
the writer against geometry read back by nibabel, SimpleITK and TorchIO.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambaclinix.inference import (
    OUTPUT_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    gaussian_importance_map,
    output_extension,
    read_image_geometry,
    sliding_window_inference,
    window_slices,
    write_segmentation,
)
from mambaclinix.inference import writer as writer_module

REPO_ROOT = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-6, "rtol": 1e-6}
MODES = ("gaussian", "constant")


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Counting:
    """Predictor wrapper recording how many windows it saw, and on which device."""

    def __init__(self, fn=identity):
        self.fn = fn
        self.calls: list[int] = []
        self.devices: list[torch.device] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        self.devices.append(x.device)
        return self.fn(x)


# --------------------------------------------------------------------------------------------------------
# window_slices
# --------------------------------------------------------------------------------------------------------


def _covered(size, slices):
    count = torch.zeros(size, dtype=torch.int64)
    for sl in slices:
        count[sl] += 1
    return count


def test_window_slices_hand_computed():
    # (37 - 16) / 8 -> ceil 3 -> 4 windows, step 21/3 = 7; (23 - 16) / 8 -> 1 -> 2 windows: 0, 7;
    # (50 - 16) / 8 = 4.25 -> 5 -> 6 windows, step 34/5 = 6.8 -> 0, 6.8, 13.6, 20.4, 27.2, 34 rounded.
    slices = window_slices((37, 23, 50), (16, 16, 16), 0.5)
    assert len(slices) == 4 * 2 * 6
    starts = [sorted({sl[a].start for sl in slices}) for a in range(3)]
    assert starts == [[0, 7, 14, 21], [0, 7], [0, 7, 14, 20, 27, 34]]
    assert all(sl[a].stop - sl[a].start == 16 for sl in slices for a in range(3))
    assert (_covered((37, 23, 50), slices) > 0).all()


@pytest.mark.parametrize(
    ("size", "roi", "overlap", "expected"),
    [
        (37, 16, 0.0, [0, 10, 21]),  # ceil(21 / 16) + 1 = 3 windows, step 21 / 2 = 10.5 -> 10 (half to even)
        (37, 16, 0.25, [0, 10, 21]),  # step 12: ceil(21 / 12) + 1 = 3
        (32, 16, 0.5, [0, 8, 16]),  # 16 / 8 = 2 exactly -> 3 windows
        (16, 16, 0.5, [0]),
        (30, 10, 0.0, [0, 10, 20]),  # tiles without overlap
        (20, 10, 0.1, [0, 5, 10]),  # step 9: ceil(10 / 9) + 1 = 3, spread 10 / 2 = 5
        (30, 10, 0.1, [0, 7, 13, 20]),  # ceil(20 / 9) + 1 = 4, spread 20 / 3 = 6.67 -> 0, 7, 13, 20
    ],
)
def test_window_slices_1d(size, roi, overlap, expected):
    slices = window_slices((size,), (roi,), overlap)
    assert [sl[0].start for sl in slices] == expected
    assert all(sl[0].stop == sl[0].start + roi for sl in slices)


def test_window_slices_float_step_does_not_add_a_window():
    # step = 4 * (1 - 0.55) = 1.8 and (13 - 4) / 1.8 = 5 exactly, but 5.000000000000001 in binary: a plain
    # ceil() would make 7 windows. 6 windows, spread 9 / 5 = 1.8: 0, 1.8, 3.6, 5.4, 7.2, 9 rounded.
    starts = [sl[0].start for sl in window_slices((13,), (4,), 0.55)]
    assert starts == [0, 2, 4, 5, 7, 9]


def test_window_slices_errors():
    with pytest.raises(ValueError, match="roi_size"):
        window_slices((10, 10), (4,), 0.5)
    with pytest.raises(ValueError, match="larger than image_size"):
        window_slices((10, 3), (4, 4), 0.5)
    with pytest.raises(ValueError, match="overlap"):
        window_slices((10,), (4,), 1.0)


@settings(max_examples=25, deadline=None)
@given(
    size=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    data=st.data(),
    overlap=st.floats(0.0, 0.95),
)
def test_window_slices_cover_every_voxel(size, data, overlap):
    roi = [data.draw(st.integers(1, s)) for s in size]
    slices = window_slices(size, roi, overlap)
    for a, (s, r) in enumerate(zip(size, roi, strict=True)):
        starts = sorted({sl[a].start for sl in slices})
        assert starts[0] == 0 and starts[-1] + r == s
        # Neighbouring windows are never further apart than the nominal step (rounded up).
        assert all(b - a_ <= math.ceil(r * (1 - overlap)) for a_, b in itertools.pairwise(starts))
    assert (_covered(tuple(size), slices) > 0).all()


# --------------------------------------------------------------------------------------------------------
# gaussian_importance_map
# --------------------------------------------------------------------------------------------------------


def test_gaussian_map_shape_max_symmetry_no_zeros():
    g = gaussian_importance_map((9, 8, 11))
    assert g.shape == (9, 8, 11) and g.dtype == torch.float32
    assert g.max() == 1.0
    assert g[4, 3, 5] == 1.0 and g[4, 4, 5] == 1.0  # even axis: the two central voxels share the maximum
    for dims in [(0,), (1,), (2,), (0, 1, 2)]:
        torch.testing.assert_close(g, torch.flip(g, dims), atol=0, rtol=0)
    assert (g > 0).all()


def test_gaussian_map_sigma_value_at_one_sigma():
    # Odd roi 17 with sigma = 4 voxels: one sigma from the centre the weight is exp(-1/2).
    g = gaussian_importance_map((17, 17, 17), sigma_scale=4 / 17, dtype=torch.float64)
    c = 8
    assert g[c, c, c] == 1.0
    for idx in [(c + 4, c, c), (c, c - 4, c), (c, c, c + 4)]:
        assert g[idx].item() == pytest.approx(math.exp(-0.5), rel=1e-12)
    assert g[c + 4, c + 4, c].item() == pytest.approx(math.exp(-1.0), rel=1e-12)


def test_gaussian_map_default_sigma_is_roi_over_8():
    roi = 33
    g = gaussian_importance_map((roi,), dtype=torch.float64)
    sigma = roi / 8
    d = torch.arange(roi, dtype=torch.float64) - 16
    torch.testing.assert_close(g, torch.exp(-0.5 * (d / sigma) ** 2), atol=1e-15, rtol=1e-12)


def test_gaussian_map_underflow_replaced_by_smallest_nonzero():
    roi, scale = 64, 0.01  # exp(-0.5 * (31.5 / 0.64)^2) underflows to 0, also in float64
    d = torch.arange(roi, dtype=torch.float64) - 31.5
    analytic = torch.exp(-0.5 * (d / (scale * roi)) ** 2)
    analytic = (analytic / analytic.max()).float()
    zero = analytic == 0
    assert zero.any() and not zero.all()  # the case under test really occurs
    g = gaussian_importance_map((roi,), sigma_scale=scale)
    assert (g > 0).all()
    torch.testing.assert_close(g[~zero], analytic[~zero], atol=0, rtol=1e-6)
    assert (g[zero] == analytic[~zero].min()).all()


def test_gaussian_map_errors():
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance_map((8, 8), sigma_scale=0.0)
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance_map((8, 8), sigma_scale=(0.1, 0.1, 0.1))
    with pytest.raises(ValueError, match="roi_size"):
        gaussian_importance_map((8, 0))


# --------------------------------------------------------------------------------------------------------
# sliding_window_inference: exact stitching
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("overlap", [0.5, 0.25, 0.0])
def test_identity_exact_on_shape_not_divisible_by_step(mode, overlap):
    x = torch.rand(1, 2, 37, 23, 50)
    y = sliding_window_inference(x, (16, 16, 16), 4, identity, overlap=overlap, mode=mode)
    assert y.shape == x.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, x, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_plus_one(mode):
    x = torch.rand(2, 1, 20, 17, 9)
    y = sliding_window_inference(x, (8, 8, 8), 3, lambda t: t + 1, mode=mode)
    torch.testing.assert_close(y, x + 1, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_constant_per_window_prediction(mode):
    x = torch.rand(1, 1, 19, 10, 13)
    y = sliding_window_inference(
        x, (8, 6, 8), 4, lambda t: torch.full((t.shape[0], 2, 8, 6, 8), 7.0), mode=mode
    )
    assert y.shape == (1, 2, 19, 10, 13)
    torch.testing.assert_close(y, torch.full_like(y, 7.0), **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_linear_2_to_3_channels_equals_whole_volume(mode):
    conv = torch.nn.Conv3d(2, 3, kernel_size=1)
    x = torch.rand(2, 2, 21, 12, 18)
    with torch.no_grad():
        expected = conv(x)
        y = sliding_window_inference(x, (8, 8, 8), 5, conv, overlap=0.5, mode=mode)
    assert y.shape == (2, 3, 21, 12, 18)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("shape", "roi"),
    [((10, 23, 20), (16, 8, 8)), ((5, 6, 7), (8, 8, 8)), ((5, 16, 3), (16, 16, 16)), ((1, 1, 1), (4, 4, 4))],
)
def test_volume_smaller_than_roi(mode, shape, roi):
    x = torch.rand(1, 2, *shape)
    counting = Counting(lambda t: t + 1)
    y = sliding_window_inference(x, roi, 4, counting, mode=mode)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x + 1, **TOL)
    assert all(c >= 1 for c in counting.calls)


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_modes_are_cropped_away(padding_mode):
    x = torch.rand(1, 1, 6, 12, 5)
    seen = []

    def predictor(t):
        seen.append(t.clone())
        return t * 2

    y = sliding_window_inference(x, (8, 8, 8), 4, predictor, padding_mode=padding_mode, cval=-3.0)
    torch.testing.assert_close(y, 2 * x, **TOL)
    assert seen[0].shape[2:] == (8, 8, 8)
    if padding_mode == "constant":  # axis 0 padded 1 before, 1 after
        assert (seen[0][0, 0, 0] == -3.0).all()


def test_sw_batch_size_one_and_larger_than_window_count():
    x = torch.rand(1, 1, 20, 20, 12)
    n_windows = len(window_slices((20, 20, 12), (8, 8, 8), 0.5))
    one, big = Counting(), Counting()
    y1 = sliding_window_inference(x, 8, 1, one, overlap=0.5)
    y2 = sliding_window_inference(x, 8, 10 * n_windows, big, overlap=0.5)
    assert one.calls == [1] * n_windows
    assert big.calls == [n_windows]
    torch.testing.assert_close(y1, x, **TOL)
    torch.testing.assert_close(y2, y1, **TOL)


def test_windows_of_all_batch_items_are_pooled():
    x = torch.rand(3, 1, 8, 8, 12)  # 2 windows per item -> 6 windows
    counting = Counting()
    y = sliding_window_inference(x, (8, 8, 8), 4, counting)
    assert counting.calls == [4, 2]
    torch.testing.assert_close(y, x, **TOL)


def test_2d_inputs():
    x = torch.rand(2, 3, 30, 17)
    y = sliding_window_inference(x, (8, 8), 4, lambda t: t[:, :2] * 3)
    torch.testing.assert_close(y, x[:, :2] * 3, **TOL)


def test_half_precision_predictor_accumulates_in_float32():
    x = torch.rand(1, 1, 20, 11, 9)
    y = sliding_window_inference(x, 8, 4, lambda t: t.half())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.half().float(), atol=1e-6, rtol=1e-6)


def test_float64_predictor_keeps_float64():
    x = torch.rand(1, 1, 12, 9, 9, dtype=torch.float64)
    y = sliding_window_inference(x, 8, 4, identity)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x, atol=1e-12, rtol=1e-12)


def test_deep_supervision_output_uses_the_first_element():
    x = torch.rand(1, 1, 12, 12, 12)

    def predictor(t):
        return [t + 5, t[:, :, ::2, ::2, ::2]]

    y = sliding_window_inference(x, 8, 4, predictor)
    torch.testing.assert_close(y, x + 5, **TOL)


def test_softmax_in_the_predictor_stitches_probabilities():
    x = torch.randn(1, 4, 14, 9, 10)
    y = sliding_window_inference(x, 8, 4, lambda t: torch.softmax(t, 1), mode="gaussian", mirror_axes=(0, 2))
    torch.testing.assert_close(y, torch.softmax(x, 1), **TOL)


def test_sw_device_moves_windows_and_device_holds_the_result():
    x = torch.rand(1, 1, 12, 12, 12)
    counting = Counting()
    y = sliding_window_inference(x, 8, 4, counting, sw_device="cpu", device=torch.device("cpu"))
    assert all(d == torch.device("cpu") for d in counting.devices)
    assert y.device == torch.device("cpu")
    torch.testing.assert_close(y, x, **TOL)


@pytest.mark.cuda
def test_gpu_predictor_cpu_accumulator():
    x = torch.rand(1, 1, 20, 20, 20)
    counting = Counting()
    y = sliding_window_inference(x, 8, 4, counting, mode="gaussian", sw_device="cuda")
    assert all(d.type == "cuda" for d in counting.devices)
    assert y.device == x.device
    torch.testing.assert_close(y, x, **TOL)


@pytest.mark.cuda
def test_cuda_inputs_cpu_result():
    x = torch.rand(1, 1, 20, 20, 20, device="cuda")
    counting = Counting()
    y = sliding_window_inference(x, 8, 4, counting, mode="gaussian", device="cpu")
    assert all(d.type == "cuda" for d in counting.devices)
    assert y.device == torch.device("cpu")
    torch.testing.assert_close(y, x.cpu(), **TOL)


def test_progress_flag_gives_same_result():
    x = torch.rand(1, 1, 12, 12, 12)
    torch.testing.assert_close(sliding_window_inference(x, 8, 4, identity, progress=True), x, **TOL)


# --------------------------------------------------------------------------------------------------------
# Mirror test-time augmentation
# --------------------------------------------------------------------------------------------------------


def test_mirror_identity_gives_input_back_and_calls_8_times():
    x = torch.rand(1, 2, 13, 10, 9)
    counting = Counting()
    y = sliding_window_inference(x, (8, 8, 8), 100, counting, mirror_axes=(0, 1, 2))
    assert len(counting.calls) == 8  # one window batch, 8 flip combinations
    torch.testing.assert_close(y, x, **TOL)


def _asymmetric(t: torch.Tensor) -> torch.Tensor:
    """Not flip-equivariant: a causal cumulative sum along each axis, plus a squared term."""
    return t.cumsum(2) * 0.5 + t.cumsum(3) * 0.25 - t.cumsum(4) * 0.125 + t**2


def test_mirror_equals_hand_written_average_over_8_flips():
    x = torch.rand(1, 2, 8, 6, 7)  # roi = volume: one window, so stitching is the identity
    expected = torch.zeros_like(x)
    for fx, fy, fz in itertools.product([False, True], repeat=3):
        dims = [d for d, f in zip((2, 3, 4), (fx, fy, fz), strict=True) if f]
        expected += torch.flip(_asymmetric(torch.flip(x, dims)), dims) if dims else _asymmetric(x)
    expected /= 8
    for mode in MODES:
        y = sliding_window_inference(x, (8, 6, 7), 4, _asymmetric, mode=mode, mirror_axes=(0, 1, 2))
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    no_tta = sliding_window_inference(x, (8, 6, 7), 4, _asymmetric)
    assert not torch.allclose(no_tta, expected, atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_mirror_cancels_window_position_dependent_term_across_windows(mode):
    # f(x) = x + ramp, ramp antisymmetric under the flip of axis 0 within each window: mirroring axis 0
    # averages ramp and flip(ramp) = -ramp to 0, so the stitched result is x on every window layout.
    roi = (8, 6, 6)
    ramp = (torch.arange(8, dtype=torch.float32) - 3.5).view(1, 1, 8, 1, 1)
    x = torch.rand(1, 1, 21, 13, 10)
    y = sliding_window_inference(x, roi, 4, lambda t: t + ramp, mode=mode, mirror_axes=(0,))
    torch.testing.assert_close(y, x, **TOL)
    y_no = sliding_window_inference(x, roi, 4, lambda t: t + ramp, mode=mode)
    assert (y_no - x).abs().max() > 0.1


# --------------------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 14), min_size=3, max_size=3),
    roi=st.lists(st.integers(1, 7), min_size=3, max_size=3),
    overlap=st.floats(0.0, 0.9),
    mode=st.sampled_from(MODES),
    sw_batch_size=st.integers(1, 9),
)
def test_property_identity_exact(shape, roi, overlap, mode, sw_batch_size):
    x = torch.rand(1, 1, *shape)
    y = sliding_window_inference(x, roi, sw_batch_size, identity, overlap=overlap, mode=mode)
    torch.testing.assert_close(y, x, **TOL)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=2, max_size=3),
    data=st.data(),
    overlap=st.sampled_from([0.0, 0.25, 0.5, 0.75]),
)
def test_property_pointwise_affine_map(shape, data, overlap):
    roi = data.draw(st.lists(st.integers(1, 6), min_size=len(shape), max_size=len(shape)))
    x = torch.rand(2, 1, *shape)
    y = sliding_window_inference(x, roi, 4, lambda t: torch.cat([2 * t - 1, t + 3], 1), overlap=overlap)
    torch.testing.assert_close(y, torch.cat([2 * x - 1, x + 3], 1), **TOL)


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"roi_size": (8, 8)}, "roi_size"),
        ({"roi_size": (8, 8, 2.5)}, "roi_size"),
        ({"roi_size": "888"}, "roi_size"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"overlap": (0.5, 0.5)}, "overlap"),
        ({"sw_batch_size": 0}, "sw_batch_size"),
        ({"mode": "linear"}, "mode"),
        ({"padding_mode": "wrap"}, "padding_mode"),
        ({"mirror_axes": (3,)}, "mirror_axes"),
        ({"mirror_axes": (0, 0)}, "mirror_axes"),
        ({"mode": "gaussian", "sigma_scale": -1.0}, "sigma_scale"),
        ({"mode": "gaussian", "sigma_scale": (0.1, 0.1)}, "sigma_scale"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, match):
    args = {"roi_size": (8, 8, 8), "sw_batch_size": 4, "predictor": identity, **kwargs}
    with pytest.raises(ValueError, match=match):
        sliding_window_inference(torch.rand(1, 1, 10, 10, 10), **args)


def test_validation_inputs_and_predictor():
    with pytest.raises(ValueError, match="inputs"):
        sliding_window_inference(torch.rand(10, 10), (8,), 4, identity)
    with pytest.raises(TypeError, match="inputs"):
        sliding_window_inference(np.zeros((1, 1, 8, 8, 8)), 8, 4, identity)
    with pytest.raises(TypeError, match=r"\(inputs, roi_size, sw_batch_size, predictor, \.\.\.\)"):
        sliding_window_inference(torch.rand(1, 1, 8, 8, 8), 8, identity, 4)  # the order before MONAI's
    with pytest.raises(TypeError, match="predictor must be callable"):
        sliding_window_inference(torch.rand(1, 1, 8, 8, 8), 8, 4, "model")
    with pytest.raises(ValueError, match="predictor output"):
        sliding_window_inference(torch.rand(1, 1, 10, 10, 10), 8, 4, lambda t: t[:, :, :4])
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        sliding_window_inference(torch.rand(1, 1, 2, 10, 10), 8, 4, identity, padding_mode="reflect")
    with pytest.raises(TypeError):  # mirror_axes is keyword-only: a 13th positional argument is refused
        sliding_window_inference(torch.rand(1, 1, 8, 8, 8), 8, 4, identity, 0.5, "gaussian", 0.125,
                                 "constant", 0.0, None, None, False, (0, 1, 2))  # fmt: skip


def test_non_positive_roi_entries_take_the_input_size():
    # MONAI's rule: roi (None, -1, 4) on a 5x6x9 input is (5, 6, 4); the windows show it.
    x = torch.rand(1, 1, 5, 6, 9)
    counting = Counting(lambda t: t * 0 + torch.tensor(t.shape[2:], dtype=t.dtype).prod())
    y = sliding_window_inference(x, (None, -1, 4), 1, counting)
    torch.testing.assert_close(y, torch.full_like(x, 5 * 6 * 4))
    assert len(counting.calls) == 3  # axis of 9 with roi 4, overlap 0.25: ceil(5 / 3) + 1 windows


def test_per_axis_overlap():
    x = torch.rand(1, 1, 20, 20, 8)
    counting = Counting()
    y = sliding_window_inference(x, 8, 1, counting, overlap=(0.5, 0.0, 0.0))
    # axis 0: step 4, ceil(12 / 4) + 1 = 4 windows; axis 1: step 8, ceil(12 / 8) + 1 = 3; axis 2: 1
    assert len(counting.calls) == 4 * 3 * 1
    torch.testing.assert_close(y, x, **TOL)


def test_sliding_window_module_imports_torch_only():
    code = textwrap.dedent(
        """
        import sys
        import mambaclinix.inference
        heavy = ("torchio", "nibabel", "SimpleITK", "lightning", "monai")
        loaded = sorted(m for m in heavy if m in sys.modules)
        assert not loaded, loaded
        """
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------

SHAPE = (7, 5, 4)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def nifti_ref(tmp_path):
    affine = np.eye(4)
    affine[:3, :3] = _rotation(0.3, -0.6, 0.9) @ np.diag([0.7, 1.3, 2.9])  # rotated, anisotropic
    affine[:3, 3] = [-103.25, 57.5, 12.75]
    path = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(SHAPE, dtype=np.float32), affine), path)
    return path


@pytest.fixture
def nrrd_ref(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(1).random(SHAPE[::-1]).astype(np.float32))
    image.SetSpacing((0.8, 1.1, 3.0))
    image.SetOrigin((10.5, -20.25, 33.0))
    image.SetDirection(tuple(_rotation(-0.4, 0.2, 1.1).ravel()))
    path = tmp_path / "ref.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _labels(max_label: int = 3, dtype=np.int64) -> np.ndarray:
    return np.random.default_rng(2).integers(0, max_label + 1, SHAPE).astype(dtype)


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_write_nifti_round_trip(nifti_ref, tmp_path, ext):
    labels = _labels()
    out = write_segmentation(labels, nifti_ref, tmp_path / f"seg{ext}")
    ref, img = nib.load(nifti_ref), nib.load(out)
    assert img.shape == SHAPE
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6, rtol=0)
    assert img.get_data_dtype() == np.uint8
    data = np.asanyarray(img.dataobj)
    assert np.issubdtype(data.dtype, np.integer)
    np.testing.assert_array_equal(data, labels)
    assert _no_temp_files(tmp_path)


def test_write_nrrd_round_trip(nrrd_ref, tmp_path):
    labels = _labels()
    out = write_segmentation(torch.from_numpy(labels), nrrd_ref, tmp_path / "seg.nrrd")
    ref, img = sitk.ReadImage(str(nrrd_ref)), sitk.ReadImage(str(out))
    assert img.GetSize() == SHAPE
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6, rtol=0)
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).T, labels)


@pytest.mark.parametrize(
    ("ref_name", "out_name"), [("nifti", "seg.nrrd"), ("nifti", "seg.mha"), ("nrrd", "seg.nii.gz")]
)
def test_write_across_formats_keeps_geometry(nifti_ref, nrrd_ref, tmp_path, ref_name, out_name):
    ref = nifti_ref if ref_name == "nifti" else nrrd_ref
    labels = _labels()
    out = write_segmentation(labels[None], ref, tmp_path / out_name)  # (1, W, H, D) is accepted too
    g_ref, g_out = read_image_geometry(ref), read_image_geometry(out)
    assert g_out.shape == g_ref.shape == SHAPE
    np.testing.assert_allclose(g_out.affine, g_ref.affine, atol=1e-6, rtol=0)
    np.testing.assert_allclose(g_out.spacing, g_ref.spacing, atol=1e-6, rtol=0)
    np.testing.assert_allclose(g_out.origin, g_ref.origin, atol=1e-6, rtol=0)
    np.testing.assert_allclose(g_out.direction, g_ref.direction, atol=1e-6, rtol=0)
    # The world position of every voxel is the same as seen by SimpleITK on both files.
    s_ref, s_out = sitk.ReadImage(str(ref)), sitk.ReadImage(str(out))
    for idx in [(0, 0, 0), (6, 4, 3), (3, 1, 2)]:
        np.testing.assert_allclose(
            s_out.TransformIndexToPhysicalPoint(idx), s_ref.TransformIndexToPhysicalPoint(idx), atol=1e-5
        )
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s_out).T, labels)


def test_axis_convention_matches_torchio(nifti_ref, tmp_path):
    tio = pytest.importorskip("torchio")
    image = tio.ScalarImage(nifti_ref)
    assert tuple(image.data.shape[1:]) == SHAPE
    labels = (image.data[0] > 0.5).to(torch.int64) + 2 * (torch.arange(SHAPE[0]) == 1).view(-1, 1, 1)
    out = write_segmentation(labels, nifti_ref, tmp_path / "seg.nii.gz")
    label_map = tio.LabelMap(out)
    np.testing.assert_allclose(label_map.affine, image.affine, atol=1e-6, rtol=0)
    torch.testing.assert_close(label_map.data[0].to(torch.int64), labels)


@pytest.mark.parametrize(
    ("max_label", "negative", "expected"),
    [(255, False, np.uint8), (256, False, np.uint16), (70000, False, np.uint32), (5, True, np.int16)],
)
def test_write_integer_dtype_from_label_range(nifti_ref, tmp_path, max_label, negative, expected):
    labels = _labels(max_label=max_label)
    labels[0, 0, 0] = max_label
    if negative:
        labels[1, 1, 1] = -1
    out = write_segmentation(labels, nifti_ref, tmp_path / "seg.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == expected
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)


def test_write_bool_mask(nrrd_ref, tmp_path):
    mask = _labels(1).astype(bool)
    out = write_segmentation(mask, nrrd_ref, tmp_path / "seg.mha")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).T, mask.astype(np.uint8))


def test_writer_errors(nifti_ref, tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        write_segmentation(_labels(), missing, tmp_path / "seg.nii.gz")
    with pytest.raises(ValueError, match=r"\.nii\.gz, \.nii, \.nrrd, \.mha") as info:
        write_segmentation(_labels(), nifti_ref, tmp_path / "seg.png")
    assert all(ext in str(info.value) for ext in SUPPORTED_EXTENSIONS)
    with pytest.raises(ValueError, match=r"\(7, 5, 3\).*\(7, 5, 4\)"):
        write_segmentation(np.zeros((7, 5, 3), np.uint8), nifti_ref, tmp_path / "seg.nii.gz")
    with pytest.raises(ValueError, match="integer"):
        write_segmentation(np.zeros(SHAPE, np.float32), nifti_ref, tmp_path / "seg.nii.gz")
    with pytest.raises(ValueError, match="reference image itself"):
        write_segmentation(_labels(), nifti_ref, nifti_ref)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz"]


def test_output_extension_of_each_input_format():
    """A prediction keeps its input's format; detached-header formats become their single-file form."""
    table = {
        "c_0000.nii.gz": ".nii.gz", "c.nii": ".nii", "c.nrrd": ".nrrd", "c.nhdr": ".nrrd", "c.mha": ".mha",
        "c.mhd": ".mha", "C.NII.GZ": ".nii.gz", "c.MHD": ".mha", "c.hdr": ".nii.gz", "c.png": ".nii.gz",
    }  # fmt: skip
    assert {name: output_extension(Path("in") / name) for name in table} == table
    assert set(table.values()) <= set(OUTPUT_EXTENSIONS) and SUPPORTED_EXTENSIONS == OUTPUT_EXTENSIONS


def test_existing_output_survives_rejected_label_map(nifti_ref, tmp_path):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"previous prediction")
    with pytest.raises(ValueError, match="shape"):
        write_segmentation(np.zeros((2, 2, 2), np.uint8), nifti_ref, out)
    assert out.read_bytes() == b"previous prediction"
    assert _no_temp_files(tmp_path)


@pytest.mark.parametrize(("ext", "module", "name"), [(".nii.gz", nib, "save"), (".nrrd", sitk, "WriteImage")])
def test_failure_during_save_leaves_old_file_and_no_temp(nifti_ref, tmp_path, monkeypatch, ext, module, name):
    out = tmp_path / f"case_001{ext}"
    out.write_bytes(b"previous prediction")
    written: list[str] = []

    def failing_save(_image, path, *args, **kwargs):
        written.append(str(path))
        Path(path).write_bytes(b"partial")  # a half-written file, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(module, name, failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_segmentation(_labels(), nifti_ref, out)
    assert out.read_bytes() == b"previous prediction"
    assert _no_temp_files(tmp_path)
    # The temporary file sat next to the output, hidden, with the output's extension (format inference).
    tmp = Path(written[0])
    assert tmp.parent == tmp_path and tmp.name.startswith(f".case_001{ext}.tmp-") and tmp.name.endswith(ext)


def test_successful_write_replaces_existing_output(nifti_ref, tmp_path):
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"previous prediction")
    write_segmentation(_labels(), nifti_ref, out)
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), _labels())
    assert _no_temp_files(tmp_path)


def test_interrupt_during_save_removes_temp(nifti_ref, tmp_path, monkeypatch):
    def interrupted(array, reference, geometry, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_module, "_save_nifti", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_segmentation(_labels(), nifti_ref, tmp_path / "new" / "seg.nii.gz")
    assert list((tmp_path / "new").iterdir()) == []  # no output, no temporary file


def test_read_image_geometry_nifti_matches_itk_convention(nifti_ref):
    g = read_image_geometry(nifti_ref)
    s = sitk.ReadImage(str(nifti_ref))
    assert g.shape == SHAPE and g.reader == "nibabel"
    np.testing.assert_allclose(g.spacing, s.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(g.origin, s.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(g.direction, s.GetDirection(), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.nrrd"):
        read_image_geometry(nifti_ref.parent / "missing.nrrd")
