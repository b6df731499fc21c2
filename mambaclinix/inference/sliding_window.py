"""Gaussian-weighted sliding-window inference with optional mirror test-time augmentation.

Paper §3 ("inference"): sliding window with 50% overlap, Gaussian importance weighting with
σ = patch/8, optional mirroring on all axes — the nnU-Net recipe the MambaClinix authors' code uses
(Bian et al., arXiv:2409.12533). This module depends on torch only.

How a volume is stitched:

1. Axes shorter than the ROI are padded to the ROI (symmetrically, ``padding_mode``/``cval``).
2. Window positions are chosen per axis as nnU-Net does (:func:`window_slices`): with
   ``step = roi * (1 - overlap)``, ``n = ceil((size - roi) / step) + 1`` windows whose starts are
   spread evenly (rounded) from ``0`` to ``size - roi``, so the first window touches the start, the last
   touches the end and every voxel is covered.
3. Windows are predicted ``sw_batch_size`` at a time (windows of all batch items are pooled). Each
   prediction is multiplied by the importance map (:func:`gaussian_importance_map`, or ones for
   ``mode="constant"``) and added into an accumulator; the map itself is added into a weight map.
4. The result is ``accumulator / weight map``, cropped back to the input's size.

Since every voxel is divided by the sum of the weights it received, a predictor that is a pointwise
function of its input (identity, ``x + 1``, a 1×1×1 convolution, softmax) gives exactly that function
applied to the whole volume, whatever the weights.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["gaussian_importance_map", "sliding_window_inference", "window_slices"]

logger = logging.getLogger(__name__)

MODES = ("gaussian", "constant")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")

# Tolerance for ceil() of the step count: a quotient (size - roi) / step that is an integer in exact
# arithmetic but not in binary (roi 4, overlap 0.55, size 13: 9 / 1.8 = 5.000000000000001) must not add a
# window. nnU-Net has no such tolerance and makes one window more in these cases.
_STEP_EPS = 1e-9


def _as_int_tuple(value: int | Sequence[int], name: str, ndim: int | None = None) -> tuple[int, ...]:
    """Validate a size argument: an int (broadcast to ``ndim`` axes) or a sequence of positive ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        if ndim is None:
            raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}.")
        value = (value,) * ndim
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {value!r}.") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        # Accept integral values that are not Python ints (numpy ints, torch.Size entries are ints).
        try:
            converted = tuple(int(v) for v in out)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must contain ints, got {value!r}.") from None
        if converted != out:
            raise ValueError(f"{name} must contain ints, got {value!r}.")
        out = converted
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"{name} must have {ndim} entries (one per spatial axis), got {len(out)}: {out}.")
    if not out or any(v < 1 for v in out):
        raise ValueError(f"{name} must contain positive ints, got {out}.")
    return out


def _check_overlap(overlap: float) -> float:
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}.")
    return float(overlap)


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis (nnU-Net's ``compute_steps_for_sliding_window``), duplicates removed."""
    if size == roi:
        return [0]
    step = roi * (1.0 - overlap)
    n = math.ceil((size - roi) / step - _STEP_EPS) + 1
    actual = (size - roi) / (n - 1)
    starts = [int(round(actual * i)) for i in range(n)]
    # With step < 1 voxel (roi * (1 - overlap) < 1) rounding repeats positions; a repeated window adds the
    # same prediction twice with the same weight, which changes nothing but the run time.
    return sorted(set(starts))


def window_slices(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float = 0.5
) -> list[tuple[slice, ...]]:
    """Spatial slices of the sliding windows over an image, nnU-Net style.

    Per axis, with ``step = roi * (1 - overlap)``, there are ``ceil((size - roi) / step) + 1`` windows
    whose starts are evenly spaced from ``0`` to ``size - roi`` and rounded to the nearest voxel, so
    the first window starts at 0, the last one ends at ``size`` and every voxel is covered. The windows
    are the Cartesian product of the per-axis positions, the last axis varying fastest.

    Example: ``image_size=(37,), roi_size=(16,), overlap=0.5`` → step 8, ``ceil(21 / 8) + 1 = 4``
    windows starting at 0, 7, 14, 21.

    Args:
        image_size: spatial size of the (padded) image, e.g. ``(D, H, W)``.
        roi_size: window size, same length; every entry must be ≤ the image's
            (:func:`sliding_window_inference` pads smaller images to the ROI first).
        overlap: fraction of the ROI shared by neighbouring windows, in ``[0, 1)``.

    Returns:
        List of tuples of ``slice`` objects, one slice per spatial axis.

    Raises:
        ValueError: on mismatched lengths, non-positive sizes, an image smaller than the ROI, or an
            overlap outside ``[0, 1)``.
    """
    size = _as_int_tuple(image_size, "image_size")
    roi = _as_int_tuple(roi_size, "roi_size", len(size))
    overlap = _check_overlap(overlap)
    if any(r > s for r, s in zip(roi, size, strict=True)):
        raise ValueError(
            f"roi_size {roi} is larger than image_size {size} on some axis; pad the image to the ROI "
            "first (sliding_window_inference does this)."
        )
    per_axis = [_axis_starts(s, r, overlap) for s, r in zip(size, roi, strict=True)]
    return [
        tuple(slice(st, st + r) for st, r in zip(starts, roi, strict=True))
        for starts in itertools.product(*per_axis)
    ]


def gaussian_importance_map(
    roi_size: Sequence[int],
    sigma_scale: float | Sequence[float] = 0.125,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Gaussian importance map of a window (nnU-Net's ``compute_gaussian``).

    ``w(x) = Π_axes exp(-(x_a - c_a)² / (2 σ_a²))`` with the centre ``c_a = (roi_a - 1) / 2`` (the exact
    centre, so the map is symmetric under every flip, also for even sizes) and ``σ_a = sigma_scale ·
    roi_a``. The map is normalised to a maximum of 1, and values that are 0 in ``dtype`` (underflow far
    from the centre with a small ``sigma_scale``) are replaced by the smallest non-zero value, so every
    voxel of a window keeps a positive weight. nnU-Net instead filters a delta at ``roi // 2`` with
    ``scipy.ndimage.gaussian_filter`` (truncated at 4σ); the two agree up to the half-voxel shift of the
    centre on even sizes and the truncation, neither of which matters after the final normalisation.

    Args:
        roi_size: window size ``(D, H, W)`` (any number of axes).
        sigma_scale: σ as a fraction of the ROI, one value or one per axis (paper: 1/8).
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        Tensor of shape ``roi_size`` with values in ``(0, 1]``.

    Raises:
        ValueError: on non-positive sizes or a non-positive ``sigma_scale``.
    """
    roi = _as_int_tuple(roi_size, "roi_size")
    if isinstance(sigma_scale, (int, float)) and not isinstance(sigma_scale, bool):
        scales = (float(sigma_scale),) * len(roi)
    else:
        scales = tuple(float(s) for s in sigma_scale)
        if len(scales) != len(roi):
            raise ValueError(f"sigma_scale must be one value or {len(roi)} values, got {sigma_scale!r}.")
    if not all(s > 0 and math.isfinite(s) for s in scales):
        raise ValueError(f"sigma_scale must be positive, got {sigma_scale!r}.")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    gmap = torch.ones((), dtype=torch.float64)
    for r, s in zip(roi, scales, strict=True):
        coords = torch.arange(r, dtype=torch.float64) - (r - 1) / 2.0
        g = torch.exp(-0.5 * (coords / (s * r)) ** 2)
        gmap = gmap.unsqueeze(-1) * (g / g.max())
    gmap = gmap.to(dtype=dtype, device=device)
    zero = gmap == 0
    if zero.any():
        gmap = gmap.masked_fill(zero, gmap[~zero].min())
    return gmap


def _check_mirror_axes(mirror_axes: Iterable[int] | None, ndim: int) -> tuple[int, ...]:
    if mirror_axes is None:
        return ()
    try:
        axes = tuple(mirror_axes)
    except TypeError:
        raise ValueError(f"mirror_axes must be None or a sequence of ints, got {mirror_axes!r}.") from None
    if any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < ndim for a in axes):
        raise ValueError(
            f"mirror_axes must contain spatial axis indices in [0, {ndim}) (0 = first spatial axis), "
            f"got {axes}."
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"mirror_axes must not repeat an axis, got {axes}.")
    return axes


def _first_output(out: object) -> torch.Tensor:
    """Deep supervision: a list/tuple of outputs → its first (finest) element."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError("predictor returned an empty list/tuple.")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"predictor must return a tensor (or a list/tuple of tensors), got {type(out)}.")
    return out


def _progress(iterable: Sequence, enabled: bool) -> Iterator:
    """Wrap in tqdm when asked and available (optional, imported lazily), else log every ~10%."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        total = len(iterable)
        every = max(1, total // 10)
        for i, item in enumerate(iterable):
            if i % every == 0 or i == total - 1:
                logger.info("sliding window: batch %d/%d", i + 1, total)
            yield item
        return
    yield from tqdm(iterable, desc="sliding window", leave=False)


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: int | Sequence[int],
    predictor: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    mirror_axes: Sequence[int] | None = None,
    padding_mode: str = "constant",
    cval: float = 0.0,
    progress: bool = False,
    device: torch.device | str | None = None,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Predict a whole volume by stitching predictions of overlapping windows (paper §3).

    Note the argument order: ``predictor`` comes third, before ``sw_batch_size`` (MONAI has
    ``(inputs, roi_size, sw_batch_size, predictor, ...)``); pass the rest by keyword.

    Softmax is *not* applied inside. By default the predictor's raw outputs (logits) are mirror-averaged
    and stitched; pass ``postprocess=lambda t: torch.softmax(t, 1)`` to average and stitch probabilities
    instead (nnU-Net v1 stitches probabilities, v2 logits) — that choice belongs to the caller. The
    function does not switch off autograd: call it under ``torch.inference_mode()`` (or
    ``torch.no_grad()``) and put the model in ``eval()`` mode.

    Args:
        inputs: image batch ``(B, C, D, H, W)``; 2D ``(B, C, H, W)`` and 1D inputs work the same way.
        roi_size: window size ``(D, H, W)`` (one int is used for every axis). Axes of ``inputs`` shorter
            than the ROI are padded to it (half before, half after) and cropped back at the end.
        predictor: maps windows ``(n, C, *roi_size)`` to ``(n, K, *roi_size)`` with ``n ≤ sw_batch_size``.
            If it returns a list or tuple (deep supervision), the first element — the full-resolution
            output — is used.
        sw_batch_size: number of windows per predictor call (windows of all batch items are pooled).
        overlap: fraction of the ROI shared by neighbouring windows, in ``[0, 1)`` (paper: 0.5).
        mode: ``"gaussian"`` (weights from :func:`gaussian_importance_map`) or ``"constant"`` (uniform).
        sigma_scale: σ of the Gaussian as a fraction of the ROI, one value or one per axis (paper: 1/8).
        mirror_axes: spatial axes (0 = first spatial axis) for mirror test-time augmentation: the
            prediction of each window is the mean over all ``2**len(mirror_axes)`` combinations of flips
            of these axes (input flipped, output flipped back); ``(0, 1, 2)`` gives 8 predictions per
            window. ``None`` or ``()``: no mirroring.
        padding_mode: ``torch.nn.functional.pad`` mode for axes shorter than the ROI: ``"constant"``
            (with ``cval``), ``"reflect"``, ``"replicate"`` or ``"circular"``.
        cval: fill value of ``padding_mode="constant"``.
        progress: show a tqdm progress bar over the window batches if tqdm is installed, else log
            progress at INFO level.
        device: device the windows are moved to for the predictor (e.g. ``"cuda"``); the accumulators
            and the result stay on ``inputs.device``, so a large volume can live in CPU memory while the
            network runs on the GPU. ``None``: ``inputs.device``.
        postprocess: optional function applied to every predictor output ``(n, K, *roi_size)`` (each
            window batch and each mirror) before mirror averaging and stitching, e.g. a softmax over
            the channel axis.

    Returns:
        Tensor ``(B, K, *spatial)`` on ``inputs.device`` with the spatial size of ``inputs``, in float32
        (float64 if the predictor returns float64). Accumulation is done in that dtype also when the
        predictor returns half precision.

    Raises:
        TypeError: if ``inputs`` is not a tensor or ``predictor``/``postprocess`` is not callable.
        ValueError: on a ``roi_size`` whose length differs from the number of spatial axes, an overlap
            outside ``[0, 1)``, ``sw_batch_size < 1``, an unknown ``mode`` or ``padding_mode``, invalid
            ``mirror_axes``, or a predictor output of the wrong shape.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs)}.")
    if not 3 <= inputs.ndim <= 5:
        raise ValueError(
            f"inputs must have shape (B, C, *spatial) with 1 to 3 spatial axes, got {tuple(inputs.shape)}."
        )
    if not callable(predictor):
        raise TypeError(
            f"predictor must be callable, got {type(predictor)}; note the order "
            "(inputs, roi_size, predictor, sw_batch_size, ...), unlike MONAI's."
        )
    if postprocess is not None and not callable(postprocess):
        raise TypeError(f"postprocess must be None or callable, got {type(postprocess)}.")
    nd = inputs.ndim - 2
    roi = _as_int_tuple(roi_size, "roi_size", nd)
    overlap = _check_overlap(overlap)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
    axes = _check_mirror_axes(mirror_axes, nd)
    run_device = inputs.device if device is None else torch.device(device)
    acc_device = inputs.device

    # 1. Pad axes shorter than the ROI, half before and half after.
    spatial = tuple(inputs.shape[2:])
    deficits = [max(r - s, 0) for s, r in zip(spatial, roi, strict=True)]
    pads = [(d // 2, d - d // 2) for d in deficits]
    x = inputs
    if any(before or after for before, after in pads):
        if padding_mode == "reflect" and any(max(p) >= s for p, s in zip(pads, spatial, strict=True)):
            raise ValueError(
                f"padding_mode='reflect' needs padding smaller than the image on every axis; image "
                f"{spatial} padded to roi_size {roi}. Use 'replicate' or 'constant'."
            )
        if padding_mode == "circular" and any(max(p) > s for p, s in zip(pads, spatial, strict=True)):
            raise ValueError(
                f"padding_mode='circular' needs padding no larger than the image on every axis; image "
                f"{spatial} padded to roi_size {roi}. Use 'replicate' or 'constant'."
            )
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad takes the last axis first
        if padding_mode == "constant":
            x = F.pad(x, flat, mode="constant", value=cval)
        else:
            x = F.pad(x, flat, mode=padding_mode)
    padded = tuple(x.shape[2:])

    # 2. Windows of every batch item, and the weight of each voxel of a window.
    slices = window_slices(padded, roi, overlap)
    if mode == "gaussian":
        importance = gaussian_importance_map(roi, sigma_scale, dtype=torch.float32, device=acc_device)
    else:
        importance = torch.ones(roi, dtype=torch.float32, device=acc_device)
    items = [(b, sl) for b in range(x.shape[0]) for sl in slices]
    batches = [items[i : i + sw_batch_size] for i in range(0, len(items), sw_batch_size)]
    flips = [
        tuple(a + 2 for a in combo) for k in range(len(axes) + 1) for combo in itertools.combinations(axes, k)
    ]

    acc: torch.Tensor | None = None
    # 3. Predict, weight and accumulate.
    for batch in _progress(batches, progress):
        windows = torch.cat([x[(slice(b, b + 1), slice(None), *sl)] for b, sl in batch]).to(run_device)
        pred: torch.Tensor | None = None
        for dims in flips:
            out = _first_output(predictor(torch.flip(windows, dims) if dims else windows))
            if postprocess is not None:
                out = postprocess(out)
            if out.ndim != windows.ndim or out.shape[0] != windows.shape[0] or tuple(out.shape[2:]) != roi:
                raise ValueError(
                    f"predictor output must have shape (n, K, *roi_size) = ({windows.shape[0]}, K, "
                    f"{', '.join(map(str, roi))}) for windows of shape {tuple(windows.shape)}, "
                    f"got {tuple(out.shape)}."
                )
            if dims:
                out = torch.flip(out, dims)
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            pred = out if pred is None else pred + out
        assert pred is not None  # flips always holds the identity
        if len(flips) > 1:
            pred = pred / len(flips)
        pred = pred.to(acc_device)
        if acc is None:
            acc = torch.zeros((x.shape[0], pred.shape[1], *padded), dtype=pred.dtype, device=acc_device)
            importance = importance.to(pred.dtype)
        elif pred.shape[1] != acc.shape[1]:
            raise ValueError(
                f"predictor returned {pred.shape[1]} channels for one window batch and {acc.shape[1]} "
                "for an earlier one."
            )
        pred = pred * importance
        for i, (b, sl) in enumerate(batch):
            acc[(slice(b, b + 1), slice(None), *sl)] += pred[i : i + 1]
    assert acc is not None  # there is at least one window

    # 4. Normalise by the summed weights (same dtype as the accumulator) and crop the padding away.
    weights = torch.zeros((1, 1, *padded), dtype=acc.dtype, device=acc_device)
    for sl in slices:
        weights[(..., *sl)] += importance
    result = acc / weights
    if any(before or after for before, after in pads):
        crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial, strict=True))
        result = result[(slice(None), slice(None), *crop)]
    return result
