"""Share and deploy a trained model: model packages, prediction from a package, ONNX export.

* :func:`~mambaclinix.deploy.package.export_package` (``mambaclinix export``) writes a model package from
  training checkpoints: safetensors weights and ``model.json`` (:mod:`mambaclinix.deploy.metadata`).
* :func:`~mambaclinix.deploy.package.read_package` opens one safely (nothing is unpickled);
  :func:`~mambaclinix.deploy.predictor.load_model` returns its network and
  :class:`~mambaclinix.deploy.predictor.Predictor` segments images with it (``mambaclinix predict -i -o -m``).
* :func:`~mambaclinix.deploy.onnx.export_onnx` writes the whole network, Mamba layers included, as
  standard ONNX operators (the selective scan in the closed form of
  :func:`~mambaclinix.deploy.scan.selective_scan_chunked_closed_form`);
  :class:`~mambaclinix.deploy.onnx.OnnxNetwork` runs the file with onnxruntime as a drop-in predictor for
  :func:`mambaclinix.inference.sliding_window_inference`. onnx, onnxruntime and onnxscript are imported
  on first use (``pip install "mambaclinix[onnx]"``).

The names are loaded on first access, so that the training module can import
:mod:`mambaclinix.deploy.checkpoint` without the rest.
"""

from mambaclinix.utils.lazy import lazy_attributes

_LAZY = {
    "ModelPackage": "mambaclinix.deploy.package",
    "PackageError": "mambaclinix.deploy.metadata",
    "Predictor": "mambaclinix.deploy.predictor",
    "build_network": "mambaclinix.deploy.package",
    "export_package": "mambaclinix.deploy.package",
    "load_model": "mambaclinix.deploy.predictor",
    "read_package": "mambaclinix.deploy.package",
    "OnnxNetwork": "mambaclinix.deploy.onnx",
    "export_onnx": "mambaclinix.deploy.onnx",
    "onnx_export_mode": "mambaclinix.deploy.onnx",
    "selective_scan_chunked_closed_form": "mambaclinix.deploy.scan",
}

__all__ = [*_LAZY]

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
