"""Predict with a model package: :func:`load_model` and :class:`Predictor`.

The :class:`Predictor` runs the training run's own pipeline on new images, from nothing but the package:
the preprocessing of :mod:`mambaclinix.data.preprocessing` with the packaged plan (crop to the non-zero
region, normalise with the packaged statistics, resample to the target spacing), the Gaussian sliding
window of :func:`mambaclinix.inference.ensemble_scores` (one network's logits; probabilities averaged
over several folds), and :func:`mambaclinix.inference.labels_on_original_grid`, which maps them back to
the input's grid before the argmax. The label maps are the LightningCLI ``predict``'s, voxel for voxel.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mambaclinix.deploy._onnx import import_onnx_module
from mambaclinix.deploy.package import ModelPackage, read_package

__all__ = ["Predictor", "load_model"]


def load_model(path: str | os.PathLike, fold: int | None = None) -> nn.Module:
    """The network of a model package (folder or zip), with its weights, in eval mode.

    Args:
        path: the package.
        fold: which fold's weights (default: the first).
    """
    return read_package(path).network(fold)


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use device='cpu' or 'auto'")
    return device


class Predictor:
    """Segment images with a model package.

    Args:
        model: a package path (folder or zip), or a :class:`~mambaclinix.deploy.package.ModelPackage`.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        tta: mirror test-time augmentation; ``None``: as the model was trained to predict.
        folds: the folds to ensemble (default: all of the package's).
        engine: ``"torch"`` or ``"onnx"`` (onnxruntime on CPU; needs a package exported with ``--onnx``).
        sw_batch_size: windows per network call (default: the package's).
    """

    def __init__(
        self,
        model: str | os.PathLike | ModelPackage,
        device: str | torch.device = "auto",
        tta: bool | None = None,
        folds: Sequence[int] | None = None,
        engine: str = "torch",
        sw_batch_size: int | None = None,
    ) -> None:
        self.package = model if isinstance(model, ModelPackage) else read_package(model)
        meta = self.package.metadata
        self.metadata = meta
        self.folds = list(self.package.folds if folds is None else folds)
        if engine not in ("torch", "onnx"):
            raise ValueError(f"engine must be 'torch' or 'onnx', got {engine!r}")
        self.engine = engine
        self.device = torch.device("cpu") if engine == "onnx" else _device(device)
        self.tta = bool(meta["tta"] if tta is None else tta)
        self.sw_batch_size = int(sw_batch_size or meta["sliding_window"]["batch_size"])
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.networks = [self._network(f) for f in self.folds]
        from mambaclinix.data.preprocessing import PreprocessingPlan

        self.plan = PreprocessingPlan.from_json(meta["plan"])

    def _network(self, fold: int):
        if self.engine == "torch":
            return self.package.network(fold).to(self.device)
        OnnxNetwork = import_onnx_module().OnnxNetwork  # noqa: N806
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mambaclinix-onnx-")
        path = Path(self._tmp.name) / f"fold_{fold}.onnx"
        path.write_bytes(self.package.onnx_bytes(fold))
        return OnnxNetwork(path)

    @property
    def num_channels(self) -> int:
        return int(self.metadata["in_channels"])

    @property
    def class_names(self) -> list[str]:
        """Class names by label value, background first."""
        labels = self.metadata["labels"]
        return sorted(labels, key=labels.get)

    def _forward(self, net):
        # as the training module feeds it (channels_last_3d), so that the logits are the same numbers
        channels_last = self.engine == "torch"

        def run(x: torch.Tensor):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            return net(x)

        return run

    @torch.no_grad()
    def predict_case(self, case) -> tuple[torch.Tensor, dict[str, Any]]:
        """The label map of a :class:`~mambaclinix.data.Case` on its original grid (indexed like
        ``tio.ScalarImage(case.image_paths[0]).data[0]``) and the case's preprocessing metadata.

        Raises:
            mambaclinix.data.DatasetError: unreadable file, wrong channel count, NaN/inf intensities.
            ValueError: the predicted scores are not finite.
        """
        from mambaclinix.data.preprocessing import preprocess_case
        from mambaclinix.inference import ensemble_scores, labels_on_original_grid

        pre = preprocess_case(case, self.plan)
        image = torch.from_numpy(pre.image)[None].to(self.device)
        scores = ensemble_scores(
            image, [self._forward(n) for n in self.networks], self.metadata["patch_size"], self.sw_batch_size,
            self.metadata["sliding_window"]["overlap"],
            mirror_axes=self.metadata["mirror_axes"] if self.tta else None,
        )  # fmt: skip
        if not bool(torch.isfinite(scores.sum())):
            raise ValueError(f"case '{case.name}': the predicted logits are not finite")
        return labels_on_original_grid(scores[0].cpu(), pre.meta), pre.meta

    def predict(
        self,
        image: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray | torch.Tensor,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
    ) -> np.ndarray:
        """The label map of one image, on the image's own grid.

        Args:
            image: an image file, a list of channel files (channel order), or an array ``(C, X, Y, Z)``
                (or ``(X, Y, Z)`` for one channel) indexed like TorchIO's ``ScalarImage.data``.
            spacing: voxel spacing (mm) of an array, per axis; used when ``affine`` is not given.
            affine: ``(4, 4)`` voxel-to-RAS affine of an array (TorchIO's / nibabel's convention).

        Returns:
            Integer label values ``(X, Y, Z)``.
        """
        from mambaclinix.data import Case

        if isinstance(image, (str, os.PathLike)) or (
            isinstance(image, Sequence) and not isinstance(image, np.ndarray)
        ):
            paths = (image,) if isinstance(image, (str, os.PathLike)) else tuple(image)
            paths = tuple(Path(p) for p in paths)
            labels, _ = self.predict_case(Case(paths[0].name.split(".")[0], paths))
            return labels.numpy()
        return self._predict_array(image, spacing, affine)

    def _predict_array(self, image, spacing, affine) -> np.ndarray:
        import nibabel as nib

        from mambaclinix.data import Case

        array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[0] != self.num_channels:
            raise ValueError(
                f"image: expected an array (C, X, Y, Z) with C = {self.num_channels} channel(s) "
                f"({', '.join(self.metadata['channel_names'])}), got shape {array.shape}"
            )
        if affine is None:
            if spacing is None:
                raise ValueError("image: give the array's spacing (mm per axis) or its affine")
            if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
                raise ValueError(f"spacing: expected three positive numbers, got {spacing}")
            affine = np.diag([*(float(s) for s in spacing), 1.0])
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine: expected a (4, 4) matrix, got shape {affine.shape}")
        # The array goes through the same reader as files: one float32 NIfTI per channel.
        with tempfile.TemporaryDirectory(prefix="mambaclinix-predict-") as tmp:
            paths = []
            for c in range(array.shape[0]):
                path = Path(tmp) / f"image_{c:04d}.nii"
                nib.save(nib.Nifti1Image(np.asarray(array[c], dtype=np.float32), affine), path)
                paths.append(path)
            labels, _ = self.predict_case(Case("image", tuple(paths)))
        return labels.numpy()
