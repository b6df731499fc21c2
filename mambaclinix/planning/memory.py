"""Peak memory of a training step as a function of patch, batch and topology, fitted to measurements.

The model is linear in five terms computed from the network's configuration (:func:`memory_terms`)::

    peak ≈ c_const
         + c_params · P                          P: trainable parameters (weights, grads, Adam moments)
         + c_hgcn   · B · Σ_{s HGCN} C_s · V_s    feature maps of the HGCN stages (encoder, skip, decoder)
         + c_mamba  · B · Σ_{s Mamba} C_s · V_s   the same for the Mamba stages (scan, conv1d included)
         + c_logits · B · K · Σ_t V_t            logits and loss terms of the deep-supervision outputs

with ``B`` the batch size, ``C_s`` the channels and ``V_s`` the voxels of stage ``s``, ``K`` the classes
and ``t`` running over the decoder outputs. (A term for all stages together would be the sum of the
HGCN and Mamba terms, so it is left out; stages without a stage layer count with the HGCN ones.)

The coefficients (bytes per unit) are fitted by non-negative
least squares on the *relative* error to peak memories measured by ``benchmarks/memory_model.py``, one set
per device and precision (the CPU's numba scan and the GPU's Triton scan keep different intermediates;
bf16 autocast halves most activations). The peak fitted is, over two training steps of a fresh model
(weights, gradients, Adam state and activations):

* ``cuda``: ``torch.cuda.max_memory_reserved``, starting from an empty caching allocator: what the
  allocator took from the GPU, its slack included. The CUDA context and libraries are not included; the
  planner takes them off the budget first (``reserve_gb``, see :mod:`mambaclinix.planning.planner`).
* ``cpu``: each point in a fresh process (with ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors
  return to the OS); after torch and mambaclinix are imported and the scan kernel compiled, the peak
  resident set size is reset (``/proc/self/clear_refs``) and the peak is ``VmHWM − VmRSS``
  (``/proc/self/status``) at the end.

The fitted coefficients are package data, ``mambaclinix/planning/memory_coefficients.json`` (written by
``python benchmarks/memory_model.py --fit MEASUREMENTS.json ... --write``; see ``docs/planning.md``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from importlib import resources

import numpy as np

__all__ = [
    "TERMS",
    "count_parameters",
    "fit_coefficients",
    "load_coefficients",
    "memory_terms",
    "predict_peak",
]

TERMS = ("const", "params", "hgcn", "mamba", "logits")
COEFFICIENTS_FILE = "memory_coefficients.json"
"""The fitted coefficients, package data of :mod:`mambaclinix.planning`."""


@functools.lru_cache(maxsize=256)
def _count_parameters(net_kwargs_items: tuple) -> int:
    import torch

    from mambaclinix.models import MambaClinixUNet

    with torch.device("meta"):
        net = MambaClinixUNet(**dict(net_kwargs_items))
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def count_parameters(net_kwargs: Mapping) -> int:
    """Trainable parameters of ``MambaClinixUNet(**net_kwargs)`` (built on the meta device, no memory)."""
    return _count_parameters(tuple(sorted((k, _freeze(v)) for k, v in net_kwargs.items())))


def memory_terms(
    patch_size: Sequence[int],
    batch_size: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    layer_types: Sequence[str],
    num_classes: int,
    num_params: int,
) -> dict[str, float]:
    """The model's terms (module docstring) for one configuration.

    Args:
        patch_size: spatial patch ``(D, H, W)`` (any axis order matching ``strides``).
        batch_size: patches per batch.
        features: channels per stage.
        strides: per stage, per axis.
        layer_types: ``"hgcn"``, ``"mamba"`` or ``"none"`` per stage.
        num_classes: output classes (background included).
        num_params: trainable parameters (:func:`count_parameters`).
    """
    shape = np.asarray(patch_size, dtype=np.float64)
    voxels = []
    for st in strides:
        shape = np.floor(shape / np.asarray(st, dtype=np.float64))
        voxels.append(float(np.prod(shape)))
    b = float(batch_size)
    hgcn = b * sum(c * v for c, v, t in zip(features, voxels, layer_types, strict=True) if t != "mamba")
    mamba = b * sum(c * v for c, v, t in zip(features, voxels, layer_types, strict=True) if t == "mamba")
    logits = b * num_classes * sum(voxels[:-1]) if len(voxels) > 1 else b * num_classes * voxels[0]
    return {
        "const": 1.0,
        "params": float(num_params),
        "hgcn": hgcn,
        "mamba": mamba,
        "logits": logits,
    }


def predict_peak(terms: Mapping[str, float], coefficients: Mapping[str, float]) -> float:
    """Predicted peak (bytes): ``Σ coefficients[k] · terms[k]``."""
    return float(sum(coefficients[k] * terms[k] for k in TERMS))


def fit_coefficients(
    terms: Sequence[Mapping[str, float]], peaks: Sequence[float]
) -> tuple[dict[str, float], np.ndarray]:
    """Non-negative least squares on the relative error ``(predicted − measured) / measured``.

    Args:
        terms: :func:`memory_terms` of each measured configuration.
        peaks: measured peak (bytes) of each.

    Returns:
        ``(coefficients, relative_errors)`` on the given points.
    """
    from scipy.optimize import nnls

    if len(terms) != len(peaks) or len(peaks) < len(TERMS):
        raise ValueError(f"need at least {len(TERMS)} measurements with terms, got {len(peaks)}")
    x = np.asarray([[t[k] for k in TERMS] for t in terms], dtype=np.float64)
    y = np.asarray(peaks, dtype=np.float64)
    if (y <= 0).any():
        raise ValueError("measured peaks must be positive")
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    a = x / scale / y[:, None]
    coef, _ = nnls(a, np.ones_like(y))
    coef = coef / scale
    rel = (x @ coef - y) / y
    return {k: float(c) for k, c in zip(TERMS, coef, strict=True)}, rel


def load_coefficients(device: str, precision: str) -> dict[str, float]:
    """The fitted coefficients for ``device`` (``"cuda"``/``"cpu"``) and ``precision`` (``"32-true"``,
    ``"bf16-mixed"``, ``"16-mixed"``).

    ``"16-mixed"`` uses the ``bf16-mixed`` fit (same activation sizes). Another precision without its
    own fit uses the device's ``32-true`` fit (conservative for lower precisions), with the fallback
    recorded in the returned dict's ``"source"``.

    Raises:
        KeyError: no fit at all for the device.
    """
    fitted = _fitted_coefficients()
    prec = "bf16-mixed" if precision == "16-mixed" else precision
    key = f"{device}/{prec}"
    if key in fitted:
        return dict(fitted[key])
    fallback = f"{device}/32-true"
    if fallback in fitted:
        out = dict(fitted[fallback])
        out["source"] = f"{out.get('source', '')} (no fit for {key}; using {fallback})"
        return out
    raise KeyError(f"no memory-model coefficients for {key}; fitted: {sorted(fitted)}")


@functools.lru_cache(maxsize=1)
def _fitted_coefficients() -> dict[str, dict]:
    """``device/precision`` → coefficients, read once from :data:`COEFFICIENTS_FILE`."""
    text = resources.files("mambaclinix.planning").joinpath(COEFFICIENTS_FILE).read_text(encoding="utf-8")
    return json.loads(text)["coefficients"]
