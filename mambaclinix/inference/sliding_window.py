"""Sliding-window inference with MONAI's signature, nnU-Net's window placement and mirror TTA.

:func:`sliding_window_inference` takes MONAI's arguments in MONAI's order and with MONAI's defaults
(``monai.inferers.sliding_window_inference``: ``inputs, roi_size, sw_batch_size, predictor, overlap=0.25,
mode="constant", sigma_scale=0.125, padding_mode="constant", cval=0.0, sw_device=None, device=None,
progress=False``), so a call written for MONAI runs unchanged and stitches comparably. The windows are
placed as nnU-Net places them, and mirror test-time augmentation is a keyword-only option. The
MambaClinix recipe (Bian et al., arXiv:2409.12533, which evaluates as nnU-Net does) is
``overlap=0.5, mode="gaussian", sigma_scale=0.125`` and optionally ``mirror_axes=(0, 1, 2)``; the library's
own callers (:meth:`~mambaclinix.training.SegmentationModule.predict_volume`) pass it explicitly. This
module depends on torch only.

How a volume is stitched:

1. Axes shorter than the ROI are padded to the ROI (half before, half after; ``padding_mode``/``cval``).
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
applied to the whole volume, whatever the weights and window positions.
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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _per_axis(value: object, ndim: int, name: str, scalar: Callable[[object], bool]) -> tuple:
    """``value`` repeated for every axis if ``scalar(value)``, else its ``ndim`` entries."""
    if scalar(value):
        return (value,) * ndim
    try:
        values = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be one value or one value per axis, got {value!r}.") from None
    if len(values) != ndim:
        raise ValueError(f"{name} must be one value or {ndim} values (one per spatial axis), got {value!r}.")
    return values


def _check_overlap(overlap: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    """One overlap for every axis, or one per axis (as MONAI accepts), each in ``[0, 1)``."""
    values = _per_axis(overlap, ndim, "overlap", _is_number)
    if not all(_is_number(o) and 0.0 <= o < 1.0 for o in values):
        raise ValueError(f"overlap must be in [0, 1) on every axis, got {overlap!r}.")
    return tuple(float(o) for o in values)


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
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float] = 0.5
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
        overlap: fraction of the ROI shared by neighbouring windows, in ``[0, 1)``; one value or one per
            axis.

    Returns:
        List of tuples of ``slice`` objects, one slice per spatial axis.

    Raises:
        ValueError: on mismatched lengths, non-positive sizes, an image smaller than the ROI, or an
            overlap outside ``[0, 1)``.
    """
    size = _as_int_tuple(image_size, "image_size")
    roi = _as_int_tuple(roi_size, "roi_size", len(size))
    overlaps = _check_overlap(overlap, len(size))
    if any(r > s for r, s in zip(roi, size, strict=True)):
        raise ValueError(
            f"roi_size {roi} is larger than image_size {size} on some axis; pad the image to the ROI "
            "first (sliding_window_inference does this)."
        )
    per_axis = [_axis_starts(s, r, o) for s, r, o in zip(size, roi, overlaps, strict=True)]
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


def _resolve_roi(roi_size: int | Sequence[int | None] | None, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """MONAI's reading of ``roi_size``: one int for every axis, or one entry per axis; ``None`` or a
    non-positive entry takes the input's size on that axis."""
    entries = _per_axis(roi_size, len(spatial), "roi_size", lambda v: v is None or _is_int(v))
    roi = []
    for r, s in zip(entries, spatial, strict=True):
        if r is not None and not _is_int(r):
            try:
                integral = int(r) == r
            except (TypeError, ValueError):
                integral = False
            if not integral:
                raise ValueError(f"roi_size must contain ints (or None), got {roi_size!r}.")
            r = int(r)
        roi.append(s if r is None or r <= 0 else r)
    return tuple(roi)


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: int | Sequence[int | None] | None,
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]],
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    *,
    mirror_axes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Predict a whole volume by stitching predictions of overlapping windows.

    The arguments up to ``progress`` are MONAI's (``monai.inferers.sliding_window_inference``), in its
    order, with its meanings and defaults: a MONAI call such as
    ``sliding_window_inference(x, (96, 96, 96), 4, model, overlap=0.5, mode="gaussian")`` works unchanged.
    The defaults are MONAI's (``overlap=0.25``, ``mode="constant"``), not the MambaClinix recipe, so that
    such a call also stitches as MONAI does; for the recipe (nnU-Net's) pass ``overlap=0.5,
    mode="gaussian"`` and optionally ``mirror_axes=(0, 1, 2)``, as
    :meth:`~mambaclinix.training.SegmentationModule.predict_volume` does.

    Where the result differs from MONAI's (the parity tests in ``tests/test_inference_monai_parity.py``
    check everything else to rounding):

    * **Window placement** is nnU-Net's: per axis the windows are spread evenly from the first voxel to
      the last (:func:`window_slices`), so neighbouring windows overlap by at least ``overlap`` everywhere.
      MONAI steps by ``int(roi * (1 - overlap))`` and shifts the last window back to the border, so the
      overlap piles up at the end of the axis. The windows are the same on an axis when
      ``roi * (1 - overlap)`` is a whole number that divides ``size - roi`` (or the ROI covers the axis);
      elsewhere a predictor that depends on a voxel's context gives different (equally valid) stitched
      values. Pointwise predictors give the same result with either placement.
    * **Gaussian weights** are nnU-Net's (:func:`gaussian_importance_map`): MONAI's Gaussian up to a
      constant factor, except that MONAI raises weights below 1e-3 to 1e-3 and nnU-Net does not. This
      matters only where a window's far corners overlap another window (small ``sigma_scale``).
    * **Precision**: predictions are accumulated in float32 at least (float64 when the inputs or the
      predictor's output are float64), also for half-precision inputs or outputs; MONAI accumulates and
      returns in the inputs' dtype.
    * **Outputs**: a list/tuple output (deep supervision) contributes its first element only; MONAI
      stitches every element (and dictionaries). MONAI's ``roi_weight_map``, ``process_fn``,
      ``buffer_steps``, ``buffer_dim``, ``with_coord`` and extra predictor arguments are not offered
      (wrap the predictor, e.g. with ``functools.partial``).
    * **Mirror test-time augmentation** (``mirror_axes``), which MONAI does not have.

    Softmax is *not* applied inside: raw outputs (logits) are mirror-averaged and stitched. To average
    and stitch probabilities instead (nnU-Net v1 stitches probabilities, v2 logits), put the softmax in
    the predictor: ``predictor=lambda t: torch.softmax(model(t), 1)``. The function does not switch off
    autograd: call it under ``torch.inference_mode()`` (or ``torch.no_grad()``) with the model in
    ``eval()`` mode.

    Args:
        inputs: image batch ``(B, C, D, H, W)``; 2D ``(B, C, H, W)`` and 1D inputs work the same way.
        roi_size: window size ``(D, H, W)``, or one int for every axis; an entry that is ``None`` or not
            positive takes the input's size on that axis (as in MONAI). Axes of ``inputs`` shorter than the
            ROI are padded to it (half before, half after) and cropped back at the end.
        sw_batch_size: number of windows per predictor call (windows of all batch items are pooled).
        predictor: maps windows ``(n, C, *roi_size)`` to ``(n, K, *roi_size)`` with ``n ≤ sw_batch_size``.
            If it returns a list or tuple (deep supervision), the first element — the full-resolution
            output — is used.
        overlap: fraction of the ROI shared by neighbouring windows, in ``[0, 1)``, one value or one per
            axis (MONAI's default 0.25; the paper uses 0.5).
        mode: ``"constant"`` (uniform weights, MONAI's default) or ``"gaussian"`` (weights from
            :func:`gaussian_importance_map`, the paper's choice).
        sigma_scale: σ of the Gaussian as a fraction of the ROI, one value or one per axis (1/8, as in
            MONAI, nnU-Net and the paper).
        padding_mode: ``torch.nn.functional.pad`` mode for axes shorter than the ROI: ``"constant"``
            (with ``cval``), ``"reflect"``, ``"replicate"`` or ``"circular"``.
        cval: fill value of ``padding_mode="constant"``.
        sw_device: device the windows are moved to for the predictor (e.g. ``"cuda"``, where the model
            is); ``None``: ``inputs.device``.
        device: device of the accumulators and of the result (e.g. ``"cpu"``, so that a large volume's
            prediction does not occupy GPU memory); ``None``: ``inputs.device``.
        progress: show a tqdm progress bar over the window batches if tqdm is installed, else log
            progress at INFO level.
        mirror_axes: (keyword only) spatial axes (0 = first spatial axis) for mirror test-time
            augmentation: the prediction of each window is the mean over all ``2**len(mirror_axes)``
            combinations of flips of these axes (input flipped, output flipped back); ``(0, 1, 2)`` gives
            8 predictions per window. ``None`` or ``()``: no mirroring.

    Returns:
        Tensor ``(B, K, *spatial)`` on ``device`` with the spatial size of ``inputs``, in float32 (float64
        if the inputs or the predictor's output are float64).

    Raises:
        TypeError: if ``inputs`` is not a tensor or ``predictor`` is not callable (also when
            ``predictor`` and ``sw_batch_size`` are swapped).
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
    if callable(sw_batch_size) and not callable(predictor):
        raise TypeError(
            "sliding_window_inference takes (inputs, roi_size, sw_batch_size, predictor, ...), in MONAI's "
            f"order; got a callable as sw_batch_size and {type(predictor).__name__} as predictor."
        )
    if not callable(predictor):
        raise TypeError(f"predictor must be callable, got {type(predictor)}.")
    spatial = tuple(inputs.shape[2:])
    nd = len(spatial)
    roi = _resolve_roi(roi_size, spatial)
    overlaps = _check_overlap(overlap, nd)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be an int >= 1, got {sw_batch_size!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
    if mode == "gaussian":  # validate sigma_scale before any prediction is made
        gaussian_importance_map((1,) * nd, sigma_scale)
    axes = _check_mirror_axes(mirror_axes, nd)
    run_device = inputs.device if sw_device is None else torch.device(sw_device)
    out_device = inputs.device if device is None else torch.device(device)
    floor = torch.promote_types(inputs.dtype, torch.float32) if inputs.is_floating_point() else torch.float32

    # 1. Pad axes shorter than the ROI, half before and half after.
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

    # 2. Windows of every batch item.
    slices = window_slices(padded, roi, overlaps)
    items = [(b, sl) for b in range(x.shape[0]) for sl in slices]
    batches = [items[i : i + sw_batch_size] for i in range(0, len(items), sw_batch_size)]
    flips = [
        tuple(a + 2 for a in combo) for k in range(len(axes) + 1) for combo in itertools.combinations(axes, k)
    ]

    acc: torch.Tensor | None = None
    importance: torch.Tensor | None = None  # on run_device, in the accumulator's dtype
    # 3. Predict (on sw_device), weight and accumulate (on device).
    for batch in _progress(batches, progress):
        windows = torch.cat([x[(slice(b, b + 1), slice(None), *sl)] for b, sl in batch]).to(run_device)
        pred: torch.Tensor | None = None
        for dims in flips:
            out = _first_output(predictor(torch.flip(windows, dims) if dims else windows))
            if out.ndim != windows.ndim or out.shape[0] != windows.shape[0] or tuple(out.shape[2:]) != roi:
                raise ValueError(
                    f"predictor output must have shape (n, K, *roi_size) = ({windows.shape[0]}, K, "
                    f"{', '.join(map(str, roi))}) for windows of shape {tuple(windows.shape)}, "
                    f"got {tuple(out.shape)}."
                )
            if dims:
                out = torch.flip(out, dims)
            out = out.to(torch.promote_types(out.dtype, floor))
            pred = out if pred is None else pred + out
        assert pred is not None  # flips always holds the identity
        if len(flips) > 1:
            pred = pred / len(flips)
        if acc is None:
            acc = torch.zeros((x.shape[0], pred.shape[1], *padded), dtype=pred.dtype, device=out_device)
            if mode == "gaussian":
                importance = gaussian_importance_map(roi, sigma_scale, dtype=acc.dtype, device=run_device)
            else:
                importance = torch.ones(roi, dtype=acc.dtype, device=run_device)
        elif pred.shape[1] != acc.shape[1]:
            raise ValueError(
                f"predictor returned {pred.shape[1]} channels for one window batch and {acc.shape[1]} "
                "for an earlier one."
            )
        pred = (pred.to(acc.dtype) * importance).to(out_device)
        for i, (b, sl) in enumerate(batch):
            acc[(slice(b, b + 1), slice(None), *sl)] += pred[i : i + 1]
    assert acc is not None and importance is not None  # there is at least one window

    # 4. Normalise by the summed weights (same dtype as the accumulator) and crop the padding away.
    weights = torch.zeros((1, 1, *padded), dtype=acc.dtype, device=out_device)
    importance = importance.to(out_device)
    for sl in slices:
        weights[(..., *sl)] += importance
    result = acc / weights
    if any(before or after for before, after in pads):
        crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial, strict=True))
        result = result[(slice(None), slice(None), *crop)]
    return result
