"""Per-patch augmentation and the patch stream, against hand computations and independent references
(``scipy.ndimage.affine_transform`` / ``gaussian_filter1d`` on the whole volume, ``scipy.stats``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchio as tio
from scipy import ndimage, optimize, stats

from mambaclinix.data import intensity
from mambaclinix.data.patch_augmentation import PatchAugmentation, coarse_axis
from mambaclinix.data.patches import PatchStream, collate_patches, forced_foreground
from mambaclinix.data.spatial import crop_padded, rotation_matrix, spatial_patch

OFF = PatchAugmentation().scaled(0.0)


def only(**probabilities) -> PatchAugmentation:
    """Every transform off except the given probabilities."""
    return replace(OFF, **probabilities)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------ spatial


def test_identity_through_the_enlarged_crop_equals_the_plain_crop():
    volume = _rng().normal(size=(2, 20, 18, 16)).astype(np.float32)
    label = _rng(1).integers(0, 3, size=(1, 20, 18, 16)).astype(np.uint8)
    start, size = np.array([3, -2, 5]), (8, 8, 8)  # reaches beyond the volume on axis 1: zeros
    centre = start + (np.array(size) - 1) / 2
    for order in (1, 3):
        image, lab = spatial_patch(volume, label, centre, size, np.eye(3), image_order=order)
        np.testing.assert_allclose(image, crop_padded(volume, start, size), atol=1e-5)
        assert np.array_equal(lab, crop_padded(label, start, size))
    plain = crop_padded(volume, start, size)
    assert np.all(plain[:, :, :2] == 0) and np.array_equal(plain[:, :, 2:], volume[:, 3:11, 0:6, 5:13])
    # nothing drawn: PatchAugmentation cuts exactly the window
    image, lab = OFF.patch(volume, label, start, size, _rng())
    assert np.array_equal(image, plain) and np.array_equal(lab, crop_padded(label, start, size))


@pytest.mark.parametrize("order,atol", [(1, 1e-5), (3, 2e-3)])
def test_rotated_scaled_patch_equals_the_transformed_whole_volume(order, atol):
    """The enlarged crop + centre cut gives what transforming the whole volume and cutting gives."""
    grid = np.meshgrid(*[np.linspace(0, 3, n) for n in (40, 36, 32)], indexing="ij")
    volume = (np.sin(grid[0]) * np.cos(grid[1]) + grid[2])[None].astype(np.float32)
    matrix = rotation_matrix(np.deg2rad([20.0, -25.0, 10.0])) * 1.3
    size = np.array([12, 10, 8])
    centre = np.array([19.0, 17.5, 15.0])
    patch, _ = spatial_patch(volume, None, centre, size, matrix, image_order=order)
    offset = centre - matrix @ ((size - 1) / 2)
    reference = ndimage.affine_transform(
        volume[0].astype(np.float64), matrix, offset, output_shape=tuple(size), order=order, mode="constant"
    )
    np.testing.assert_allclose(patch[0], reference, atol=atol)


def test_rotation_matrix_is_a_rotation():
    r = rotation_matrix([0.3, -1.1, 2.0])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(r), 1.0)
    # about axis 0 only: axis 0 is left alone
    r0 = rotation_matrix([0.7, 0.0, 0.0])
    np.testing.assert_allclose(r0[0], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(r0[:, 0], [1, 0, 0], atol=1e-12)


def test_label_interpolation_keeps_label_values():
    label = np.zeros((1, 24, 24, 24), dtype=np.uint8)
    label[0, 6:18, 6:18, 6:18] = 2
    label[0, 10:14, 10:14, 10:14] = 5
    matrix = rotation_matrix(np.deg2rad([30.0, 0.0, 0.0]))
    for order in (0, 1):
        _, out = spatial_patch(
            np.zeros((1, 24, 24, 24), np.float32), label, (11.5,) * 3, (16,) * 3, matrix, 1, order
        )
        assert set(np.unique(out).tolist()) == {0, 2, 5}
        assert out[0, 8, 8, 8] == 5  # the centre stays in the inner cube


def test_scaling_draws_half_below_and_half_above_one():
    aug = only(p_scaling=1.0)
    factors = np.array([aug.draw_spatial(_rng(s), (16, 16, 16))[0, 0] for s in range(2000)])
    below, above = factors[factors < 1], factors[factors >= 1]
    assert abs(len(below) / len(factors) - 0.5) < 0.05  # uniform on [0.7, 1.4] would give 3/7 = 0.43
    assert below.min() >= 0.7 and above.max() <= 1.4
    assert stats.kstest((below - 0.7) / 0.3, "uniform").pvalue > 1e-3
    assert stats.kstest((above - 1.0) / 0.4, "uniform").pvalue > 1e-3
    assert aug.draw_spatial(_rng(), (16, 16, 16)) is not None
    assert OFF.draw_spatial(_rng(), (16, 16, 16)) is None


def test_dummy_2d_rotation_leaves_the_coarse_axis_untouched():
    size = (4, 20, 20)
    assert (
        coarse_axis(size) == 0
        and coarse_axis((16, 16, 16)) is None
        and coarse_axis((20, 20, 8)) is None
        and coarse_axis((20, 20, 6)) == 2
    )
    aug = only(p_rotation=1.0, p_scaling=1.0)
    angles = []
    volume = np.broadcast_to(np.arange(1, 13, dtype=np.float32)[None, :, None, None], (1, 12, 64, 64)).copy()
    label = np.broadcast_to(np.arange(1, 13, dtype=np.uint8)[None, :, None, None], (1, 12, 64, 64)).copy()
    for seed in range(40):
        matrix = aug.draw_spatial(_rng(seed), size)
        np.testing.assert_allclose(matrix[0], [1, 0, 0], atol=1e-12)  # the coarse axis maps to itself
        np.testing.assert_allclose(matrix[:, 0], [1, 0, 0], atol=1e-12)
        angles.append(np.degrees(np.arctan2(matrix[2, 1], matrix[1, 1])))
        image, lab = aug.patch(volume, label, (4, 22, 22), size, _rng(seed))
        for k in range(4):  # slice k of the patch is slice 4 + k of the volume (value 5 + k): no mixing
            # (the rotated, scaled in-plane square stays 12 voxels inside the 64 × 64 slices)
            np.testing.assert_allclose(image[0, k], 5.0 + k, atol=1e-4)
            assert np.all(lab[0, k] == 5 + k)
    assert max(np.abs(angles)) > 90  # in-plane rotation over ±180°, not ±30°


def test_full_3d_rotation_draws_three_angles_within_30_degrees():
    aug = only(p_rotation=1.0)
    for seed in range(50):
        matrix = aug.draw_spatial(_rng(seed), (16, 16, 16))
        # the rotation of axis 0 by at most 3 × 30° compositions; each elementary angle within ±30°:
        # cos of the angle between axis 0 and its image is >= cos(30°)^2 for Rx·Ry·Rz with |angles| <= 30°
        assert matrix[0, 0] >= np.cos(np.deg2rad(30)) ** 2 - 1e-9


# ---------------------------------------------------------------------------------------- intensity


def test_noise_std_is_uniform_0_to_0_1_and_shared_by_channels():
    aug = only(p_noise=1.0)
    measured = []
    for seed in range(400):
        patch = np.zeros((2, 24, 24, 24), np.float32)
        out, _ = aug.intensity(patch, None, _rng(seed))
        per_channel = out.reshape(2, -1).std(axis=1)
        assert abs(per_channel[0] - per_channel[1]) < 0.04 * per_channel.max() + 1e-6  # one std
        measured.append(per_channel.mean())
    measured = np.array(measured)
    assert measured.max() <= 0.1 * 1.03 and abs(measured.mean() - 0.05) < 0.005
    assert stats.kstest(measured / 0.1, "uniform").pvalue > 1e-3  # √U(0, 0.1) would fail this


def _impulse(channels: int, n: int = 15) -> np.ndarray:
    x = np.zeros((channels, n, n, n), np.float32)
    x[:, n // 2, n // 2, n // 2] = 1.0
    return x


def _fit_sigma(profile: np.ndarray) -> float:
    """The σ of ``gaussian_filter1d`` (reflect, truncate 4) that reproduces a 1-D impulse response."""
    impulse = np.zeros_like(profile)
    impulse[len(profile) // 2] = 1.0

    def error(sigma: float) -> float:
        return float(np.square(ndimage.gaussian_filter1d(impulse, sigma, truncate=4.0) - profile).sum())

    return float(
        optimize.minimize_scalar(error, bounds=(0.3, 1.2), method="bounded", options={"xatol": 1e-7}).x
    )


def test_blur_one_isotropic_sigma_per_channel_with_channel_probability():
    aug = only(p_blur=1.0)
    blurred_channels, sigmas_seen = 0, []
    for seed in range(60):
        out, _ = aug.intensity(_impulse(3), None, _rng(seed))
        for c in range(3):
            if out[c, 7, 7, 7] == 1.0:
                continue  # this channel was not drawn
            blurred_channels += 1
            total = out[c].sum()
            profiles = [out[c].sum(axis=tuple(a for a in range(3) if a != axis)) / total for axis in range(3)]
            sigmas = [_fit_sigma(p) for p in profiles]
            assert max(sigmas) - min(sigmas) < 1e-4  # isotropic: one σ for the three axes
            assert 0.5 - 1e-4 <= sigmas[0] <= 1.0 + 1e-4
            expected = ndimage.gaussian_filter(_impulse(1)[0], sigmas[0], truncate=4.0)
            np.testing.assert_allclose(out[c], expected, atol=1e-5)
            sigmas_seen.append(sigmas[0])
    assert abs(blurred_channels / 180 - 0.5) < 0.1  # channel probability 1/2
    assert np.std(sigmas_seen) > 0.05  # channels get their own σ


def test_brightness_contrast_and_gamma_by_hand():
    patch = np.array([0.0, 1.0, 2.0, 5.0], np.float32).reshape(1, 4, 1, 1)
    out = intensity.brightness(patch.copy(), [1.2])
    np.testing.assert_allclose(out.ravel(), [0.0, 1.2, 2.4, 6.0], rtol=1e-6)
    out = intensity.contrast(patch.copy(), [0.5])  # patch mean 2: (x − 2)·0.5 + 2, range kept
    np.testing.assert_allclose(out.ravel(), [1.0, 1.5, 2.0, 3.5])
    out = intensity.contrast(patch.copy(), [2.0])  # (x − 2)·2 + 2 = [-2, 0, 2, 8] clipped to [0, 5]
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 2.0, 5.0])
    x = patch.astype(np.float64).ravel()
    span = 5.0 + 1e-7
    powered = (x / span) ** 2 * span
    expected = (powered - powered.mean()) / (powered.std() + 1e-8) * x.std() + x.mean()
    np.testing.assert_allclose(intensity.gamma(patch.copy(), [2.0]).ravel(), expected, rtol=1e-5)
    inv = -(((-x - (-5.0)) / span) ** 2 * span + (-5.0))
    np.testing.assert_allclose(
        intensity.gamma(patch.copy(), [2.0], invert=True, retain_stats=False).ravel(), inv, rtol=1e-5
    )
    # brightness draws a plain U(0.75, 1.25) per channel (nnU-Net v2.1)
    aug = only(p_brightness=1.0)
    ones = [
        aug.intensity(np.ones((2, 2, 2, 2), np.float32), None, _rng(s))[0][:, 0, 0, 0] for s in range(400)
    ]
    factors = np.concatenate(ones)
    assert factors.min() >= 0.75 and factors.max() <= 1.25
    assert stats.kstest((factors - 0.75) / 0.5, "uniform").pvalue > 1e-3
    assert np.mean([f[0] != f[1] for f in ones]) > 0.99


def test_low_resolution_by_hand_and_skipping_the_coarse_axis():
    # 4 → 2 voxels, nearest with pixel centres aligned, picks voxels 1 and 3 (centres 0.5·2 − 0.5 + …):
    x = np.array([0.0, 1.0, 2.0, 3.0], np.float32).reshape(1, 4, 1, 1)
    small = ndimage.zoom(x[0].astype(np.float64), (0.5, 1, 1), order=0, mode="nearest", grid_mode=True)
    assert small.ravel().tolist() in ([1.0, 3.0], [0.0, 2.0])  # scipy's own rounding of x.5
    out = intensity.low_resolution(x.copy(), [0.5])
    assert out.shape == x.shape and not np.allclose(out, x)
    # a patch that varies only along the coarse axis is unchanged when that axis is skipped
    profile = _rng().normal(size=4).astype(np.float32)
    patch = np.broadcast_to(profile[None, :, None, None], (1, 4, 16, 16)).copy()
    kept = intensity.low_resolution(patch.copy(), [0.5], ignore_axes=(0,))
    np.testing.assert_allclose(kept, patch, atol=1e-6)
    assert not np.allclose(intensity.low_resolution(patch.copy(), [0.5]), patch, atol=1e-3)
    aug = only(p_low_resolution=1.0, low_resolution_p_per_channel=1.0)
    for seed in range(5):  # PatchAugmentation passes the coarse axis of an anisotropic patch
        out, _ = aug.intensity(patch.copy(), None, _rng(seed))
        np.testing.assert_allclose(out, patch, atol=1e-6)


def test_mirroring_flips_image_and_label_together():
    image = _rng().normal(size=(1, 6, 5, 4)).astype(np.float32)
    label = (image > 0).astype(np.uint8)
    flips = []
    for seed in range(200):
        out, lab = only(p_mirror=0.5).intensity(image.copy(), label.copy(), _rng(seed))
        assert np.array_equal(lab, (out > 0).astype(np.uint8))
        combos = [[a for a in range(3) if k >> a & 1] for k in range(8)]
        matches = [axes for axes in combos if np.array_equal(out, intensity.mirror([image], axes)[0])]
        assert len(matches) == 1
        flips.append([a in matches[0] for a in range(3)])
    assert np.all(np.abs(np.mean(flips, axis=0) - 0.5) < 0.1)


def test_patch_augmentation_rejects_bad_values():
    with pytest.raises(ValueError, match="p_noise"):
        PatchAugmentation(p_noise=1.5)
    with pytest.raises(ValueError, match="low_resolution_zoom"):
        PatchAugmentation(low_resolution_zoom=(0.5, 2.0))
    with pytest.raises(ValueError, match="label_order"):
        PatchAugmentation(label_order=3)


# ------------------------------------------------------------------------------------- patch stream


def _subjects(n: int = 3, shape=(32, 32, 32)) -> list[tio.Subject]:
    out = []
    for i in range(n):
        label = torch.zeros(1, *shape, dtype=torch.uint8)
        label[0, 2:4, 3:5, -4:-2] = 1  # a small blob, rarely hit by a uniform 8³ patch
        image = torch.from_numpy(_rng(i).normal(size=(1, *shape)).astype(np.float32))
        out.append(
            tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label), name=f"s{i}")
        )
    return out


def test_forced_foreground_positions_by_hand():
    table = {1: [False], 2: [False, True], 3: [False, False, True], 4: [False, False, False, True],
             6: [False] * 4 + [True] * 2}  # fmt: skip
    for batch, expected in table.items():
        assert [forced_foreground(i, batch, 1 / 3) for i in range(batch)] == expected
        assert [forced_foreground(i, batch, 0.33) for i in range(batch)] == expected  # nnU-Net's 0.33
    assert forced_foreground(5, 2, 1 / 3) and not forced_foreground(4, 2, 1 / 3)


@pytest.mark.parametrize("batch_size", [2, 3])
def test_batch_oversampling_puts_foreground_in_the_last_positions(batch_size):
    stream = PatchStream(_subjects(), patch_size=(8, 8, 8), batch_size=batch_size, samples_per_volume=4,
                         seed=0, augmentation=None)  # fmt: skip
    hits = np.array([bool((stream[i]["label"] > 0).any()) for i in range(batch_size * 20)])
    by_position = hits.reshape(20, batch_size).mean(axis=0)
    assert by_position[-1] == 1.0 and np.all(by_position[:-1] < 0.2)


def test_patch_oversampling_is_a_coin_per_patch():
    stream = PatchStream(_subjects(), patch_size=(8, 8, 8), batch_size=2, samples_per_volume=100,
                         seed=0, augmentation=None, oversampling="patch")  # fmt: skip
    hits = np.array([bool((stream[i]["label"] > 0).any()) for i in range(300)])
    assert 0.25 < hits.mean() < 0.45 and 0.2 < hits[0::2].mean() < 0.5  # both positions, about 1/3
    with pytest.raises(ValueError, match="oversampling"):
        PatchStream(_subjects(), patch_size=(8, 8, 8), batch_size=2, samples_per_volume=1, seed=0,
                    augmentation=None, oversampling="queue")  # fmt: skip


def test_stream_is_a_function_of_seed_epoch_and_index_only():
    kwargs = dict(
        patch_size=(8, 8, 8), batch_size=2, samples_per_volume=2, seed=3, augmentation=PatchAugmentation()
    )
    a, b = PatchStream(_subjects(), **kwargs), PatchStream(_subjects(), **kwargs)
    keys = [5, 0, 1 << 40, (2 << 40) + 7, 3]
    first = [a[k] for k in keys]
    again = [b[k] for k in reversed(keys)][::-1]  # another order, another object
    for x, y in zip(first, again, strict=True):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], a[1 << 40]["image"])  # epochs differ
    # each pass gives every subject samples_per_volume patches
    names = [a[i]["name"] for i in range(a.patches_per_pass)]
    assert sorted(names) == sorted(["s0", "s1", "s2"] * 2)
    batch = collate_patches([a[0], a[1]])
    assert batch["image"].shape == (2, 1, 8, 8, 8) and batch["label"].dtype == torch.int64


def test_small_volumes_are_centred_with_zeros():
    subject = _subjects(1, shape=(6, 20, 5))[0]
    stream = PatchStream([subject], patch_size=(8, 8, 8), batch_size=2, samples_per_volume=4, seed=0,
                         augmentation=None)  # fmt: skip
    for i in range(6):
        item = stream[i]
        assert item["image"].shape == (1, 8, 8, 8)
        start = item["location"][:3]
        assert start[0] == -1 and start[2] == -1  # deficits 2 and 3: 1 voxel of zeros before
        assert np.all(item["image"][:, 0] == 0) and np.all(item["image"][:, :, :, 0] == 0)
        if i % 2:
            assert (item["label"] > 0).any()
