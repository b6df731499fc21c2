"""Whole-volume prediction as nnU-Net v2 does it: the Gaussian-weighted average of the windows' logits (not
of per-window probabilities), and the logits (not probabilities) resampled to the original grid before the
argmax. Checked against hand computations."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mambaclinix.training import SegmentationModule


class WindowMean(nn.Module):
    """Logits ``m · (0, 1, −1)`` constant over a window, ``m`` the window's mean intensity: a predictor
    whose output depends on where the window lies, so that stitching is visible."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        return torch.cat([0 * m, m, -m], dim=1).expand(-1, -1, *x.shape[2:])


class Pointwise(nn.Module):
    """Logits ``(0, 10·x, 1.5·(1 − x))`` per voxel: x = 1 gives (0, 10, 0), x = −1 gives (0, −10, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0 * x, 10 * x, 1.5 * (1 - x)], dim=1)


def test_sliding_window_averages_logits_with_gaussian_weights():
    module = SegmentationModule(WindowMean(), num_classes=3, patch_size=(5, 4, 4), channels_last=False)
    module.eval()
    image = (torch.arange(9.0) - 4).reshape(1, 1, 9, 1, 1).expand(1, 1, 9, 4, 4).contiguous()
    with torch.no_grad():
        logits = module.predict_logits(image, ["case"])
        probs = module.predict_volume(image, ["case"])
    # by hand: with overlap 0.5 nnU-Net's rule gives ceil((9 − 5) / 2.5) + 1 = 3 windows along the first
    # axis, spread evenly: starts 0, 2, 4. Each covers the whole of the other axes, whose Gaussian factor is
    # common to all windows and cancels. Along the first axis the weight of voxel i in the window at s is
    # exp(−(i − s − 2)² / (2σ²)), σ = 5/8, and the window's logits are m · (0, 1, −1) with m = s − 2 (its
    # mean intensity).
    sigma = 0.125 * 5
    expected = np.zeros((3, 9))
    averaged_probs = np.zeros((3, 9))
    for i in range(9):
        starts = [s for s in (0, 2, 4) if s <= i < s + 5]
        weights = np.array([math.exp(-((i - s - 2) ** 2) / (2 * sigma**2)) for s in starts])
        window_logits = np.array([[0.0, s - 2.0, 2.0 - s] for s in starts])
        expected[:, i] = weights @ window_logits / weights.sum()
        window_probs = np.exp(window_logits) / np.exp(window_logits).sum(1, keepdims=True)
        averaged_probs[:, i] = weights @ window_probs / weights.sum()
    assert np.allclose(expected[:, 3], [0.0, -1.0, 1.0])  # halfway between the windows at 0 and 2
    np.testing.assert_allclose(logits[0, :, :, 0, 0].double().numpy(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits[:, :, :, :1, :1].expand_as(logits))
    softmax = np.exp(expected) / np.exp(expected).sum(0, keepdims=True)
    np.testing.assert_allclose(probs[0, :, :, 0, 0].double().numpy(), softmax, rtol=1e-5, atol=1e-6)
    # averaging the windows' probabilities instead would give another result
    assert np.abs(averaged_probs - softmax).max() > 0.05


def test_predict_resamples_logits_to_the_original_grid_then_takes_the_argmax(tmp_path):
    # original image 10 × 4 × 4 (1 mm); the crop keeps voxels 1..8 of the first axis; the preprocessed grid
    # has 2 mm along it: cropped voxel j lies at preprocessed coordinate j / 2
    reference = tmp_path / "case_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 4, 4), np.float32), np.eye(4)), reference)
    pre_affine = np.diag([2.0, 1.0, 1.0, 1.0])
    pre_affine[0, 3] = 1.0
    crop_affine = np.eye(4)
    crop_affine[0, 3] = 1.0
    meta = {
        "name": "case",
        "image_paths": [str(reference)],
        "preprocessed_shape": (4, 4, 4),
        "preprocessed_affine": pre_affine,
        "cropped_shape": (8, 4, 4),
        "cropped_affine": crop_affine,
        "original_shape": (10, 4, 4),
        "crop_bbox": ((1, 9), (0, 4), (0, 4)),
    }
    x = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 4, 1, 1).expand(1, 1, 4, 4, 4).contiguous()
    module = SegmentationModule(
        Pointwise(),
        num_classes=3,
        patch_size=(4, 4, 4),
        channels_last=False,
        output_dir=str(tmp_path / "out"),
    ).eval()
    with torch.no_grad():
        (path,) = module.predict_step({"image": x, "name": ["case"], "meta": [meta]}, 0)
    written = np.asarray(nib.load(path).dataobj)
    assert written.shape == (10, 4, 4)
    # by hand: a = (0, 10, 0) at even preprocessed voxels, b = (0, −10, 3) at odd ones; cropped voxel j is
    # at j / 2: odd j lie halfway between an a and a b voxel: logits (0, 0, 1.5) → class 2 (averaging the
    # probabilities instead, (0.02, 0.5, 0.48), would give class 1); even j sit on a voxel; j = 7 lies past
    # the last voxel (b, clamped). Outside the crop: background.
    la, lb = torch.tensor([0.0, 10.0, 0.0]), torch.tensor([0.0, -10.0, 3.0])
    assert int(((la + lb) / 2).argmax()) == 2
    assert int(((la.softmax(0) + lb.softmax(0)) / 2).argmax()) == 1
    a, b = 1, 2
    expected = [0] + [a, 2, b, 2, a, 2, b, b] + [0]
    assert written[:, 0, 0].tolist() == expected
    assert (written == written[:, :1, :1]).all()


def test_thick_axis_is_nnunets_separate_z_axis():
    from mambaclinix.inference.geometry import thick_axis

    assert thick_axis((3.0, 0.8, 0.8), (3.0, 0.8, 0.8)) == 0  # 3.75 > 3
    assert thick_axis((1.0, 1.0, 1.0), (0.7, 0.7, 5.0)) == 2  # the current grid is isotropic: the new one
    assert thick_axis((2.4, 0.8, 0.8), (2.4, 0.8, 0.8)) is None  # exactly 3: not above
    assert thick_axis((0.24, 1.25, 1.25), (0.24, 1.25, 1.25)) is None  # two coarse axes: no separate axis
    assert thick_axis((1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) is None


def test_logits_are_resampled_with_order0_along_a_thick_axis():
    from mambaclinix.inference import invert_to_original

    # preprocessed 4 mm × 1 × 1 (anisotropic: 4 > 3) onto 1 mm: cropped voxel j lies at coordinate j / 4
    pre_affine = np.diag([4.0, 1.0, 1.0, 1.0])
    meta = {
        "name": "case",
        "preprocessed_shape": (3, 2, 2),
        "preprocessed_affine": pre_affine,
        "cropped_shape": (9, 2, 2),
        "cropped_affine": np.eye(4),
        "original_shape": (9, 2, 2),
        "crop_bbox": ((0, 9), (0, 2), (0, 2)),
    }
    logits = torch.tensor([0.0, 4.0, 8.0]).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    nearest = invert_to_original(logits, meta)[0, :, 0, 0].tolist()
    # by hand: coordinates 0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2 → nearest voxel (halves round up)
    assert nearest == [0.0, 0.0, 4.0, 4.0, 4.0, 4.0, 8.0, 8.0, 8.0]
    linear = invert_to_original(logits, meta, anisotropy_threshold=None)[0, :, 0, 0].tolist()
    assert linear == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
