"""The demo: brain-MRI tissue segmentation on a dataset built offline from the MNI ICBM152 template.

* :mod:`mambaclinix.demo.cases`: one case (:func:`make_case`) from the template shipped inside ``nilearn``
  (``pip install "mambaclinix[demo]"``), with the labelling rule (:func:`tissue_labels`);
* :mod:`mambaclinix.demo.dataset`: :func:`build_demo_dataset` writes the cases in the Medical Segmentation
  Decathlon / nnU-Net v2 raw layout, published atomically;
* :mod:`mambaclinix.demo.baseline`: :func:`kmeans_tissue_baseline`, the intensity-only baseline a trained
  network must beat, and its Dice per tissue (:func:`kmeans_baseline_dice`);
* :mod:`mambaclinix.demo.runner`: :func:`run_demo` (``mambaclinix demo``) trains, tests and compares.

See ``docs/demo_data.md`` and ``docs/quickstart.md``. Importing this package imports neither TorchIO,
nilearn nor Lightning: they are imported by the functions that use them.
"""

from mambaclinix.demo.baseline import kmeans_baseline_dice, kmeans_tissue_baseline
from mambaclinix.demo.cases import (
    DEMO_LABELS,
    class_fractions,
    make_case,
    subject_labels,
    template_subject,
    tissue_labels,
)
from mambaclinix.demo.dataset import build_demo_dataset
from mambaclinix.demo.runner import DemoResult, config_path, run_demo

__all__ = [
    "DEMO_LABELS",
    "DemoResult",
    "build_demo_dataset",
    "class_fractions",
    "config_path",
    "kmeans_baseline_dice",
    "kmeans_tissue_baseline",
    "make_case",
    "run_demo",
    "subject_labels",
    "template_subject",
    "tissue_labels",
]
