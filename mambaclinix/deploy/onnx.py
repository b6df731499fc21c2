"""Export a network to ONNX, Mamba layers included, and run the exported graph with onnxruntime.

:func:`export_onnx` traces the network with PyTorch's ONNX exporter (``torch.onnx.export(dynamo=True)``)
in eval mode, with deep supervision off, so the graph has one input ``image`` ``(B, in_channels, *roi)``
and one output ``logits`` ``(B, out_channels, *roi)``, the full-resolution logits; the batch axis is
dynamic, the spatial size is the ``roi_size`` it was exported for (sliding-window inference feeds
windows of exactly that size). The selective scan of every :class:`~mambaclinix.layers.Mamba` module is
replaced, for the duration of the export only (:func:`onnx_export_mode`), by
:func:`~mambaclinix.deploy.scan.selective_scan_chunked_closed_form`, which is made of standard ONNX
operators and stays finite for any ``Δ·|A|``; the network and its training path are left unchanged.

:class:`OnnxNetwork` wraps an ``onnxruntime.InferenceSession`` as a callable from a tensor to a tensor,
so it drops into :func:`mambaclinix.inference.sliding_window_inference` as the predictor.

Why not a ``torch.library`` custom op: a custom op exports as a node of a custom domain that
onnxruntime cannot run without a compiled kernel; writing the scan itself in ONNX operators keeps the
file runnable by any ONNX runtime.

onnx, onnxruntime and onnxscript are imported lazily: ``pip install "mambaclinix[onnx]"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mambaclinix.deploy.scan import selective_scan_chunked_closed_form
from mambaclinix.layers.mamba import Mamba, MambaLayer, _fp32_or_wider
from mambaclinix.ops.causal_conv1d import causal_conv1d
from mambaclinix.utils.atomic import write_bytes_atomic

__all__ = ["OnnxNetwork", "export_onnx", "onnx_export_mode"]

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
_PROTOBUF_LIMIT = 2**31 - 1  # one ONNX file holds at most 2 GiB


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(
            f"ONNX export and inference need {module}: pip install 'mambaclinix[onnx]'"
        ) from err


# --------------------------------------------------------------------------------------------------
# Export-time forward passes (bound to module instances by onnx_export_mode, never to the classes).


def _mamba_export_forward(self: Mamba, hidden_states: torch.Tensor) -> torch.Tensor:
    """:meth:`Mamba.forward` with the closed-form chunked scan and the PyTorch causal conv1d."""
    xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L)
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", "torch")
    x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
    dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
    dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, E, L)
    A = -torch.exp(_fp32_or_wider(self.A_log))
    y = selective_scan_chunked_closed_form(
        x, dt, A, B.transpose(1, 2), C.transpose(1, 2), _fp32_or_wider(self.D), z=z,
        delta_bias=_fp32_or_wider(self.dt_proj.bias), delta_softplus=True, chunk=self._onnx_scan_chunk,
    )  # fmt: skip
    return self.out_proj(y.transpose(1, 2))


def _mamba_layer_export_forward(self: MambaLayer, x: torch.Tensor) -> torch.Tensor:
    """:meth:`MambaLayer.forward` in float32, without its autocast guard (a graph has no autocast)."""
    return self.residual(_fp32_or_wider(x)).to(x.dtype)


_EXPORT_FORWARDS = ((Mamba, _mamba_export_forward), (MambaLayer, _mamba_layer_export_forward))


@contextlib.contextmanager
def onnx_export_mode(network: nn.Module, scan_chunk: int = 32) -> Iterator[nn.Module]:
    """Inside the ``with`` block, ``network`` is in eval mode, without deep supervision, and every
    :class:`~mambaclinix.layers.Mamba` in it computes its selective scan in the exportable closed form
    (chunks of ``scan_chunk`` steps). On exit the modules' own ``forward``, training flags and deep
    supervision are restored. The substitution is per module instance; other networks and the classes are
    untouched.

    Yields:
        ``network`` itself.
    """
    if not isinstance(scan_chunk, int) or scan_chunk < 1:
        raise ValueError(f"scan_chunk must be a positive int, got {scan_chunk!r}")
    modes = {m: m.training for m in network.modules()}
    had_ds = hasattr(network, "deep_supervision")
    ds = getattr(network, "deep_supervision", None)
    patched: list[nn.Module] = []
    try:
        network.eval()
        if had_ds:
            network.deep_supervision = False
        for m in network.modules():
            for cls, fwd in _EXPORT_FORWARDS:
                if isinstance(m, cls):
                    if "forward" in vars(m):
                        raise RuntimeError(f"{type(m).__name__} already has an instance-level forward")
                    m.forward = types.MethodType(fwd, m)
                    if cls is Mamba:
                        m._onnx_scan_chunk = scan_chunk
                    patched.append(m)
        yield network
    finally:
        for m in patched:
            del m.forward
            vars(m).pop("_onnx_scan_chunk", None)
        if had_ds:
            network.deep_supervision = ds
        network.train(modes[network])  # a network may set flags of modules it does not register
        for m, training in modes.items():
            m.training = training


class _FullResolutionLogits(nn.Module):
    """The network's full-resolution logits: the first output if it returns several (deep supervision)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, (list, tuple)) else out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes about operators of packages we do not use (torchvision's)."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_roi(roi_size: int | Sequence[int], network: nn.Module) -> tuple[int, ...]:
    dims = getattr(network, "spatial_dims", 3)
    roi = (roi_size,) * dims if isinstance(roi_size, int) else tuple(roi_size)
    if len(roi) != dims or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in roi):
        raise ValueError(f"roi_size must be {dims} positive ints (one per spatial axis), got {roi_size!r}")
    return roi


def export_onnx(
    network: nn.Module,
    path: str | os.PathLike,
    roi_size: int | Sequence[int],
    in_channels: int,
    opset: int = 18,
    scan_chunk: int = 32,
) -> Path:
    """Export ``network`` to an ONNX file that onnxruntime runs on any provider.

    Args:
        network: a segmentation network ``(B, in_channels, *roi) -> logits`` (a :class:`MambaClinixUNet`
            or any module; with several outputs the first is taken). Its weights are exported as they are;
            its mode and settings are restored afterwards.
        path: the ``.onnx`` file to write (atomically; its folder must exist).
        roi_size: the spatial input size the graph is specialised to (an int for a cube), normally the
            sliding-window patch size. It must suit the network (e.g. divisible by its ``size_divisor``).
        in_channels: input channels.
        opset: ONNX opset version (18 or later).
        scan_chunk: steps per chunk of the exported selective scan; memory per chunk grows as its
            square, the number of graph nodes as its inverse.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad ``roi_size``/``in_channels``/``opset``, a missing output folder, or a roi the
            network rejects.
        ImportError: onnx/onnxscript missing.
    """
    path = Path(path)
    roi = _check_roi(roi_size, network)
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    net_in = getattr(network, "in_channels", None)
    if isinstance(net_in, int) and net_in != in_channels:
        raise ValueError(f"in_channels={in_channels} but the network takes {net_in} input channels")
    if not isinstance(opset, int) or opset < 18:
        raise ValueError(f"opset must be an int >= 18 (the exporter's minimum), got {opset!r}")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {path.parent} does not exist")
    _require("onnx")
    _require("onnxscript")
    try:
        param = next(network.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    # Batch 2: the exporter would specialise a batch-1 example to the constant 1.
    example = torch.zeros(2, in_channels, *roi, device=device, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with onnx_export_mode(network, scan_chunk=scan_chunk), torch.no_grad(), _quiet_exporter():
        wrapper = _FullResolutionLogits(network).eval()
        program = torch.onnx.export(
            wrapper,
            (example,),
            None,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    proto.doc_string = (
        f"{type(network).__name__} logits, input {INPUT_NAME} (batch, {in_channels}, "
        f"{', '.join(map(str, roi))}); exported by mambaclinix"
    )
    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:  # pragma: no cover - needs a > 2 GiB network
        raise ValueError(f"the exported model is {len(data)} bytes, over ONNX's 2 GiB limit for one file")
    write_bytes_atomic(path, data)
    logger.info("exported %s to %s (%.1f MB)", type(network).__name__, path, len(data) / 1e6)
    return path


class OnnxNetwork:
    """An exported network, run by onnxruntime, called like the PyTorch network.

    ``OnnxNetwork(path)(x)`` takes ``x`` ``(B, C, *roi)`` (any float dtype, any device) and returns the
    logits ``(B, classes, *roi)`` as float32 on ``x``'s device, so it is a predictor for
    :func:`~mambaclinix.inference.sliding_window_inference` (``roi_size`` = the exported roi).

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx`.
        providers: onnxruntime execution providers, e.g. ``["CUDAExecutionProvider",
            "CPUExecutionProvider"]``; default the CPU provider.
        intra_op_threads: threads per operator (``None``: onnxruntime's default, one per core).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} does not exist")
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as err:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{self.path} is not a readable ONNX model: {err}") from err
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{self.path}: expected one input and one output, got {[i.name for i in inputs]} -> "
                f"{[o.name for o in outputs]}"
            )
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        #: input shape, batch axis first (a string where the axis is dynamic)
        self.input_shape = tuple(inputs[0].shape)

    @property
    def in_channels(self) -> int:
        return int(self.input_shape[1])

    @property
    def roi_size(self) -> tuple[int, ...]:
        """The spatial size the graph was exported for."""
        return tuple(int(v) for v in self.input_shape[2:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *roi) -> (B, classes, *roi)`` float32 logits on ``x``'s device."""
        expected = (self.in_channels, *self.roi_size)
        if x.dim() != len(self.input_shape) or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{self.path.name} takes (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(out).to(x.device)

    def __repr__(self) -> str:
        return f"OnnxNetwork({str(self.path)!r}, input={self.input_shape})"
