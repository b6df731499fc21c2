"""Inference: Gaussian sliding-window prediction, mapping it back to the input's grid, and writing label
maps with the input's geometry.

The MambaClinix recipe (Bian et al., arXiv:2409.12533), nnU-Net's: sliding window with 50% overlap,
Gaussian weighting (σ = patch/8), optional mirror test-time augmentation; predictions keep the input
image's geometry. :func:`sliding_window_inference` has MONAI's signature and defaults (overlap 0.25,
constant weights), so the recipe is passed explicitly.

:mod:`mambaclinix.inference.sliding_window` and :mod:`mambaclinix.inference.geometry` depend on torch and
numpy only, as does :mod:`mambaclinix.inference.segment` (sliding window → original grid → argmax, the
path shared by the training module's ``predict`` and the model package's ``Predictor``);
:mod:`mambaclinix.inference.writer` imports nibabel / SimpleITK lazily, when a file is read or
written.
"""

from mambaclinix.inference.geometry import invert_to_original
from mambaclinix.inference.segment import (
    ensemble_probabilities,
    ensemble_scores,
    label_dtype,
    labels_on_original_grid,
)
from mambaclinix.inference.sliding_window import (
    gaussian_importance_map,
    sliding_window_inference,
    window_slices,
)
from mambaclinix.inference.writer import (
    OUTPUT_EXTENSIONS,
    SUPPORTED_EXTENSIONS,
    ImageGeometry,
    output_extension,
    read_image_geometry,
    write_segmentation,
)

__all__ = [
    "OUTPUT_EXTENSIONS",
    "SUPPORTED_EXTENSIONS",
    "ImageGeometry",
    "ensemble_probabilities",
    "ensemble_scores",
    "gaussian_importance_map",
    "invert_to_original",
    "label_dtype",
    "labels_on_original_grid",
    "output_extension",
    "read_image_geometry",
    "sliding_window_inference",
    "window_slices",
    "write_segmentation",
]
