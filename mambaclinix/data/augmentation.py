"""nnU-Net's default training augmentation as TorchIO transforms, for whole-volume pipelines of your own.

:class:`~mambaclinix.data.datamodule.SegmentationDataModule` does not use this module: it augments every
patch on its own (:class:`~mambaclinix.data.patch_augmentation.PatchAugmentation`, as nnU-Net does).

:func:`nnunet_augmentation` composes, in nnU-Net v2's order (each line: probability per subject load):

=====================================  ==========  ===============================================
rotation ±30° per axis, and/or          0.2 / 0.2   :class:`RandomRotateScale` → ``tio.Affine``
isotropic scaling ×U(0.7, 1.4)                      (one resampling; linear images, nearest labels,
                                                    zero padding)
Gaussian noise, variance U(0, 0.1)      0.1         :class:`RandomGaussianNoise` → ``tio.Noise``
Gaussian blur, σ U(0.5, 1) voxels/axis  0.2         :class:`RandomVoxelBlur` → ``tio.Blur``
brightness ×[0.75, 1.25] per channel    0.15        :class:`RandomBrightness` → :class:`Brightness`
contrast ×[0.75, 1.25] per channel      0.15        :class:`RandomContrast` → :class:`Contrast`
simulated low resolution ×U(0.5, 1)     0.25        :class:`RandomLowResolution` → :class:`LowResolution`
inverted gamma [0.7, 1.5]               0.1         :class:`RandomIntensityGamma` → :class:`IntensityGamma`
gamma [0.7, 1.5]                        0.3         :class:`RandomIntensityGamma` → :class:`IntensityGamma`
mirroring, each axis                    0.5         ``tio.RandomFlip``
=====================================  ==========  ===============================================

Every random transform only samples parameters (from torch's global RNG, like TorchIO, so
``torch.manual_seed`` makes it reproducible) and delegates to a deterministic transform that can be
applied or inspected on its own. Where TorchIO has no equivalent (multiplicative brightness, nnU-Net's
range-preserving contrast, low-resolution simulation, gamma with retained statistics) the deterministic
transform is defined here.

Choices and deviations, spelled out:

* Rotation and scaling are one transform with nnU-Net's two independent probabilities (0.2 each), so
  that when both fire the volume is resampled once. Angles are drawn per axis in ±30°; the scale factor
  is the same on all axes (nnU-Net's default). Images are interpolated linearly (``image_interpolation``
  chooses; nnU-Net uses 3rd order), labels nearest; the padding value is 0 for images and labels.
* ``[a, b]`` ranges marked "[ ]" use nnU-Net's ``BGContrast`` sampling: with probability 1/2 a value in
  ``[a, 1)``, else in ``[1, b]`` (so shrinking and stretching are equally likely).
* Brightness, contrast and gamma draw one value per channel (nnU-Net's ``synchronize_channels=False``);
  low resolution acts on each channel with probability 1/2 (``p_per_channel``); noise uses one variance
  for all channels. Blur uses one σ per axis for all channels (nnU-Net blurs each channel with
  probability 1/2 and its own σ): TorchIO's ``Blur`` takes one σ triplet per image. Its σ is drawn in
  voxels, as in nnU-Net, and converted to the millimetres ``tio.Blur`` expects with the image spacing.
* Low resolution: nearest-exact downsampling to ``round(shape · zoom)`` then trilinear upsampling
  (nnU-Net v2's ``SimulateLowResolutionTransform``).
* Used with a ``tio.Queue``, the whole (preprocessed) volume is augmented once per load, before the
  sampler cuts ``samples_per_volume`` patches from it (nnU-Net augments each patch, with the patch's
  statistics: :mod:`mambaclinix.data.patch_augmentation`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform

__all__ = [
    "Brightness",
    "Contrast",
    "IntensityGamma",
    "LowResolution",
    "RandomBrightness",
    "RandomContrast",
    "RandomGaussianNoise",
    "RandomIntensityGamma",
    "RandomLowResolution",
    "RandomRotateScale",
    "RandomVoxelBlur",
    "nnunet_augmentation",
]

PerChannel = float | Sequence[float]


def _per_channel(value: PerChannel, num_channels: int, what: str) -> torch.Tensor:
    values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if values.numel() == 1:
        return values.expand(num_channels).clone()
    if values.numel() != num_channels:
        raise ValueError(f"{what}: {values.numel()} values for an image with {num_channels} channels")
    return values


def _sample_bg(low: float, high: float) -> float:
    """nnU-Net's ``BGContrast``: half the time in ``[low, 1)``, otherwise in ``[max(low, 1), high]``."""
    if low < 1 and torch.rand(1).item() < 0.5:
        return RandomTransform.sample_uniform(low, min(high, 1.0))
    return RandomTransform.sample_uniform(max(low, 1.0), high)


def _check_range(value: tuple[float, float], name: str, minimum: float = 0.0) -> tuple[float, float]:
    low, high = float(value[0]), float(value[1])
    if not minimum <= low <= high:
        raise ValueError(f"{name} must be a range ({minimum} <= low <= high), got {value}")
    return low, high


class _PerChannelIntensity(IntensityTransform):
    """Deterministic intensity transform with one parameter per channel (or a dict by image name)."""

    def __init__(self, value: PerChannel | Mapping[str, PerChannel], **kwargs):
        super().__init__(**kwargs)
        self.value = value
        self.args_names = ["value"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for name, image in self.get_images_dict(subject).items():
            values = _per_channel(self.get_parameter(self.value, name), image.num_channels, self.name)
            data = image.data.float()
            out = torch.stack([self.apply_channel(data[c], float(values[c])) for c in range(data.shape[0])])
            image.set_data(out)
        return subject

    @abstractmethod
    def apply_channel(self, x: torch.Tensor, value: float) -> torch.Tensor:
        """Transform one channel ``(W, H, D)`` with its parameter."""


class Brightness(_PerChannelIntensity):
    """Multiply intensities by ``value`` (one factor, or one per channel)."""

    def apply_channel(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return x * value


class Contrast(_PerChannelIntensity):
    """nnU-Net contrast: ``(x − mean) · value + mean``, then clipped to the channel's original
    ``[min, max]`` (``preserve_range``). A constant channel is unchanged."""

    def apply_channel(self, x: torch.Tensor, value: float) -> torch.Tensor:
        mean = x.mean()
        return ((x - mean) * value + mean).clamp(x.min(), x.max())


class LowResolution(_PerChannelIntensity):
    """Downsample each channel by ``value`` (zoom ≤ 1; 1 leaves the channel untouched) with
    nearest-exact interpolation and upsample it back trilinearly."""

    def apply_channel(self, x: torch.Tensor, value: float) -> torch.Tensor:
        if value >= 1:
            return x
        shape = x.shape
        small = [max(1, round(n * value)) for n in shape]
        down = F.interpolate(x[None, None], size=small, mode="nearest-exact")
        return F.interpolate(down, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


class IntensityGamma(_PerChannelIntensity):
    """nnU-Net gamma: rescale to [0, 1], raise to ``value``, rescale back, restore mean and std.

    Args:
        value: γ, one or one per channel.
        invert: negate the image before and after (nnU-Net's ``p_invert_image``).
        retain_stats: restore the channel's mean and standard deviation afterwards.
    """

    def __init__(
        self,
        value: PerChannel | Mapping[str, PerChannel],
        invert: bool = False,
        retain_stats: bool = True,
        **kwargs,
    ):
        super().__init__(value, **kwargs)
        self.invert = invert
        self.retain_stats = retain_stats
        self.args_names = ["value", "invert", "retain_stats"]

    def apply_channel(self, x: torch.Tensor, value: float) -> torch.Tensor:
        if self.invert:
            x = -x
        mean, std = x.mean(), x.std()
        low = x.min()
        span = (x.max() - low).clamp_min(1e-7)
        y = ((x - low) / span).pow(value) * span + low
        if self.retain_stats:
            y = (y - y.mean()) * (std / y.std().clamp_min(1e-7)) + mean
        return -y if self.invert else y


class RandomBrightness(RandomTransform, IntensityTransform):
    """Multiplicative brightness, factor in ``multiplier`` per channel (BGContrast sampling).

    Args:
        multiplier: range of the factor.
        **kwargs: TorchIO ``Transform`` arguments (``p``, ``include``, …).
    """

    def __init__(self, multiplier: tuple[float, float] = (0.75, 1.25), **kwargs):
        super().__init__(**kwargs)
        self.multiplier = _check_range(multiplier, "multiplier")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        params = {
            name: [_sample_bg(*self.multiplier) for _ in range(image.num_channels)]
            for name, image in self.get_images_dict(subject).items()
        }
        return Brightness(params, **self._get_base_args())(subject)


class RandomContrast(RandomTransform, IntensityTransform):
    """nnU-Net contrast augmentation, factor in ``factor`` per channel (BGContrast sampling).

    Args:
        factor: range of the contrast factor.
        **kwargs: TorchIO ``Transform`` arguments.
    """

    def __init__(self, factor: tuple[float, float] = (0.75, 1.25), **kwargs):
        super().__init__(**kwargs)
        self.factor = _check_range(factor, "factor")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        params = {
            name: [_sample_bg(*self.factor) for _ in range(image.num_channels)]
            for name, image in self.get_images_dict(subject).items()
        }
        return Contrast(params, **self._get_base_args())(subject)


class RandomLowResolution(RandomTransform, IntensityTransform):
    """Simulated low resolution: each channel, with probability ``p_per_channel``, zoomed by U(zoom).

    Args:
        zoom: range of the downsampling factor (≤ 1).
        p_per_channel: probability that a channel is affected.
        **kwargs: TorchIO ``Transform`` arguments.
    """

    def __init__(self, zoom: tuple[float, float] = (0.5, 1.0), p_per_channel: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.zoom = _check_range(zoom, "zoom", minimum=1e-3)
        if self.zoom[1] > 1:
            raise ValueError(f"zoom must not exceed 1, got {zoom}")
        self.p_per_channel = float(p_per_channel)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        params = {}
        for name, image in self.get_images_dict(subject).items():
            params[name] = [
                self.sample_uniform(*self.zoom) if torch.rand(1).item() < self.p_per_channel else 1.0
                for _ in range(image.num_channels)
            ]
        return LowResolution(params, **self._get_base_args())(subject)


class RandomIntensityGamma(RandomTransform, IntensityTransform):
    """nnU-Net gamma augmentation with retained statistics, γ per channel (BGContrast sampling).

    Args:
        gamma: range of γ.
        invert: apply to the negated image (nnU-Net's inverted-gamma variant).
        **kwargs: TorchIO ``Transform`` arguments.
    """

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.5), invert: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.gamma = _check_range(gamma, "gamma", minimum=1e-3)
        self.invert = bool(invert)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        params = {
            name: [_sample_bg(*self.gamma) for _ in range(image.num_channels)]
            for name, image in self.get_images_dict(subject).items()
        }
        return IntensityGamma(params, invert=self.invert, **self._get_base_args())(subject)


class RandomGaussianNoise(RandomTransform, IntensityTransform):
    """Additive zero-mean Gaussian noise whose *variance* is U(variance) (nnU-Net), via ``tio.Noise``.

    Args:
        variance: range of the noise variance.
        **kwargs: TorchIO ``Transform`` arguments.
    """

    def __init__(self, variance: tuple[float, float] = (0.0, 0.1), **kwargs):
        super().__init__(**kwargs)
        self.variance = _check_range(variance, "variance")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        names = list(self.get_images_dict(subject))
        std = {name: self.sample_uniform(*self.variance) ** 0.5 for name in names}
        seed = {name: self._get_random_seed() for name in names}
        mean = dict.fromkeys(names, 0.0)
        return tio.Noise(mean=mean, std=std, seed=seed, **self._get_base_args())(subject)


class RandomVoxelBlur(RandomTransform, IntensityTransform):
    """Gaussian blur with σ drawn per axis in *voxels* (nnU-Net), applied through ``tio.Blur`` (mm).

    Args:
        std: range of σ in voxels.
        **kwargs: TorchIO ``Transform`` arguments.
    """

    def __init__(self, std: tuple[float, float] = (0.5, 1.0), **kwargs):
        super().__init__(**kwargs)
        self.std = _check_range(std, "std")

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        stds = {}
        for name, image in self.get_images_dict(subject).items():
            spacing = image.spacing
            stds[name] = tuple(self.sample_uniform(*self.std) * spacing[a] for a in range(3))
        return tio.Blur(std=stds, **self._get_base_args())(subject)


class RandomRotateScale(RandomTransform):
    """Rotation (per axis U(±degrees), probability ``p_rotation``) and isotropic scaling (U(scales),
    probability ``p_scale``) drawn independently, applied in one ``tio.Affine`` about the image centre;
    nothing is resampled when neither is drawn.

    Args:
        degrees: maximum absolute angle per axis.
        scales: range of the isotropic scale factor passed to ``tio.Affine``.
        p_rotation: probability of a rotation.
        p_scale: probability of a scaling.
        image_interpolation: TorchIO interpolation for images (``"linear"``, ``"bspline"``, …).
        **kwargs: TorchIO ``Transform`` arguments.
    """

    def __init__(
        self,
        degrees: float = 30.0,
        scales: tuple[float, float] = (0.7, 1.4),
        p_rotation: float = 0.2,
        p_scale: float = 0.2,
        image_interpolation: str = "linear",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.degrees = abs(float(degrees))
        self.scales = _check_range(scales, "scales", minimum=1e-3)
        self.p_rotation = float(p_rotation)
        self.p_scale = float(p_scale)
        self.image_interpolation = image_interpolation

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        rotate = torch.rand(1).item() < self.p_rotation
        scale = torch.rand(1).item() < self.p_scale
        if not (rotate or scale):
            return subject
        angles = tuple(self.sample_uniform(-self.degrees, self.degrees) if rotate else 0.0 for _ in range(3))
        factor = self.sample_uniform(*self.scales) if scale else 1.0
        transform = tio.Affine(
            scales=(factor, factor, factor),
            degrees=angles,
            translation=(0.0, 0.0, 0.0),
            center="image",
            default_pad_value=0.0,
            default_pad_label=0,
            image_interpolation=self.image_interpolation,
            label_interpolation="nearest",
            **self._get_base_args(),
        )
        return transform(subject)


def nnunet_augmentation(p_scale: float = 1.0, image_interpolation: str = "linear") -> tio.Compose:
    """nnU-Net's default augmentation pipeline (see the module docstring for the table).

    Args:
        p_scale: multiplies every application probability (clipped to 1; 0 disables all but nothing
            else changes). Mirroring's per-axis 0.5 is scaled too.
        image_interpolation: interpolation of images in the rotation/scaling.

    Returns:
        A ``tio.Compose`` that copies its input once; its members work in place on that copy.
    """
    if p_scale < 0:
        raise ValueError(f"p_scale must be >= 0, got {p_scale}")

    def p(value: float) -> float:
        return min(1.0, value * p_scale)

    inner = {"copy": False}
    transforms = [
        RandomRotateScale(
            p_rotation=p(0.2), p_scale=p(0.2), image_interpolation=image_interpolation, **inner
        ),
        RandomGaussianNoise((0.0, 0.1), p=p(0.1), **inner),
        RandomVoxelBlur((0.5, 1.0), p=p(0.2), **inner),
        RandomBrightness((0.75, 1.25), p=p(0.15), **inner),
        RandomContrast((0.75, 1.25), p=p(0.15), **inner),
        RandomLowResolution((0.5, 1.0), p=p(0.25), **inner),
        RandomIntensityGamma((0.7, 1.5), invert=True, p=p(0.1), **inner),
        RandomIntensityGamma((0.7, 1.5), invert=False, p=p(0.3), **inner),
        tio.RandomFlip(axes=(0, 1, 2), flip_probability=p(0.5), **inner),
    ]
    return tio.Compose(transforms)
