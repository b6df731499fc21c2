"""Model packages: ``mambaclinix export`` writes them, :func:`read_package` reads them safely.

A package is a folder (or the same files in one zip archive)::

    model.json              what prediction needs, and the model card (mambaclinix.deploy.metadata)
    fold_0.safetensors      the network's weights, one file per checkpoint (fold) of the ensemble
    fold_0.onnx             optional: the network as ONNX (``--onnx``)

Weights are stored as `safetensors <https://huggingface.co/docs/safetensors>`_: reading them parses a
JSON header and copies raw tensor bytes, nothing is unpickled, so an untrusted package cannot run code.
``model.json`` records each weights file's SHA-256; a truncated or replaced file is refused before it
is parsed, and the tensors must have the names and shapes of the network ``model.json`` describes.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambaclinix.deploy._onnx import import_onnx_module
from mambaclinix.deploy.metadata import (
    FORMAT,
    FORMAT_VERSION,
    PackageError,
    check_metadata,
)
from mambaclinix.models import create_model, is_model
from mambaclinix.utils.atomic import atomic_directory, write_bytes_atomic

__all__ = ["ModelPackage", "build_network", "export_package", "read_package"]

MODEL_JSON = "model.json"
MAX_JSON_BYTES = 16 * 1024 * 1024


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()})


def export_package(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    as_zip: bool = False,
    onnx: bool = False,
    folds: Sequence[int] | None = None,
    opset: int = 18,
) -> Path:
    """Write a model package from one or several checkpoints (the folds of an ensemble).

    Args:
        sources: checkpoint files or run folders (their ``checkpoints/last.ckpt``); all must describe
            the same network, classes and preprocessing.
        out: the package folder, or with ``as_zip`` the archive (``.zip`` is appended if missing). An
            existing package there is replaced.
        as_zip: write one zip file instead of a folder.
        onnx: also export every fold's network as ONNX (``mambaclinix.deploy.onnx``).
        folds: a number for each source (default: the fold each was trained on, else 0, 1, ...).
        opset: the ONNX opset.

    Returns:
        The package's path.

    Raises:
        PackageError: see :func:`~mambaclinix.deploy.checkpoint.read_checkpoint`; checkpoints that differ
            in what prediction needs.
    """
    from mambaclinix.deploy.checkpoint import read_checkpoint

    if not sources:
        raise PackageError("export: give at least one checkpoint or run folder")
    if folds is not None and len(folds) != len(sources):
        raise PackageError(f"export: {len(folds)} fold number(s) for {len(sources)} checkpoint(s)")
    read = [read_checkpoint(s) for s in sources]
    shared = {k: v for k, v in read[0][0].items() if k not in ("card", "versions")}
    for meta, _, path in read[1:]:
        differing = sorted(k for k in shared if meta.get(k) != shared[k])
        if differing:
            raise PackageError(
                f"{path}: differs from {read[0][2]} in {', '.join(differing)}; the folds of one package "
                "must share the network, classes and preprocessing"
            )
    numbers = list(folds) if folds is not None else [m["card"].get("fold") for m, _, _ in read]
    if folds is None and (None in numbers or len(set(numbers)) != len(numbers)):
        numbers = list(range(len(read)))
    files: dict[str, bytes] = {}
    entries = []
    for number, (meta, state, path) in zip(numbers, read, strict=True):
        name = f"fold_{number}"
        data = _safetensors_bytes(state)
        files[f"{name}.safetensors"] = data
        entry = {"fold": number, "weights": f"{name}.safetensors", "sha256": _sha256(data),
                 "checkpoint": path.name, "card": meta["card"], "versions": meta["versions"]}  # fmt: skip
        if onnx:
            entry["onnx"] = f"{name}.onnx"
            files[entry["onnx"]] = _onnx_bytes(shared, state, opset)
        entries.append(entry)
    model = {"format": FORMAT, "format_version": FORMAT_VERSION, **shared,
             "versions": read[0][0]["versions"], "card": read[0][0]["card"], "folds": entries}  # fmt: skip
    check_metadata(model, "export")
    files[MODEL_JSON] = json.dumps(model, indent=1).encode()
    out = Path(out)
    if as_zip:
        out = out if out.suffix == ".zip" else out.with_name(out.name + ".zip")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        write_bytes_atomic(out, buffer.getvalue())
        return out
    if out.exists() and not (out / MODEL_JSON).is_file():
        raise PackageError(f"{out}: exists and is not a model package; choose another output path")
    with atomic_directory(out, replace=True) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return out


def _onnx_bytes(meta: dict[str, Any], state: dict[str, torch.Tensor], opset: int) -> bytes:
    export_onnx = import_onnx_module().export_onnx
    net = build_network(meta, state, "export")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(
            net, Path(tmp) / "model.onnx", tuple(meta["patch_size"]), meta["in_channels"], opset=opset
        )
        return Path(path).read_bytes()


def build_network(meta: dict[str, Any], state: dict[str, torch.Tensor] | None, source: str) -> nn.Module:
    """The network ``meta`` describes, in eval mode, with ``state`` loaded.

    Raises:
        PackageError: an unknown preset, arguments the preset rejects, or weights whose names or shapes
            differ from the network's.
    """
    net_meta = meta["network"]
    name = net_meta["name"]
    if not is_model(name):
        raise PackageError(
            f"{source}: unknown network preset {name!r}; is the package from a newer mambaclinix?"
        )
    kwargs = dict(net_meta.get("kwargs") or {})
    try:
        net = create_model(name, in_channels=meta["in_channels"], out_channels=meta["num_classes"], **kwargs)
    except (TypeError, ValueError) as err:
        raise PackageError(f"{source}: cannot build network {name!r} with {kwargs} ({err})") from err
    if state is not None:
        own = net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]  # fmt: skip
        if missing or unexpected or wrong:
            parts = []
            if wrong:
                parts.append("wrong shapes: " + "; ".join(f"{k} {a} (network: {b})" for k, a, b in wrong[:3]))
            if missing:
                parts.append(f"missing tensors: {', '.join(missing[:3])}")
            if unexpected:
                parts.append(f"unexpected tensors: {', '.join(unexpected[:3])}")
            raise PackageError(
                f"{source}: the weights do not fit the network model.json describes ({name}, "
                f"{meta['in_channels']} → {meta['num_classes']} channels): {'; '.join(parts)}"
            )
        net.load_state_dict(state)
    return net.eval()


@dataclass
class ModelPackage:
    """A model package read by :func:`read_package`.

    Attributes:
        path: the folder or zip file.
        metadata: the checked ``model.json``.
    """

    path: Path
    metadata: dict[str, Any]

    def _read(self, name: str) -> bytes:
        try:
            if self.path.is_dir():
                return (self.path / name).read_bytes()
            with zipfile.ZipFile(self.path) as archive:
                return archive.read(name)
        except (OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
            raise PackageError(f"{self.path}: cannot read {name} ({type(err).__name__}: {err})") from err

    @property
    def folds(self) -> list[int]:
        """The fold numbers of the package's weights."""
        return [f["fold"] for f in self.metadata["folds"]]

    def _entry(self, fold: int) -> dict[str, Any]:
        for entry in self.metadata["folds"]:
            if entry["fold"] == fold:
                return entry
        raise PackageError(f"{self.path}: no fold {fold}; the package holds folds {self.folds}")

    def state_dict(self, fold: int) -> dict[str, torch.Tensor]:
        """The weights of ``fold``, checked against their SHA-256 and read without unpickling."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        entry = self._entry(fold)
        data = self._read(entry["weights"])
        if _sha256(data) != entry["sha256"]:
            raise PackageError(
                f"{self.path}: {entry['weights']} is damaged or was replaced (its SHA-256 differs from "
                "model.json's); copy the package again"
            )
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise PackageError(
                f"{self.path}: {entry['weights']} is not a valid safetensors file ({err}); packages never "
                "hold pickled weights"
            ) from err

    def network(self, fold: int | None = None) -> nn.Module:
        """The network of ``fold`` (default: the first) with its weights, in eval mode."""
        fold = self.folds[0] if fold is None else fold
        return build_network(
            self.metadata, self.state_dict(fold), f"{self.path} ({self._entry(fold)['weights']})"
        )

    def onnx_bytes(self, fold: int) -> bytes:
        """The ONNX file of ``fold``."""
        entry = self._entry(fold)
        if not entry.get("onnx"):
            raise PackageError(f"{self.path}: no ONNX model; export the package with --onnx")
        return self._read(entry["onnx"])


def read_package(path: str | Path) -> ModelPackage:
    """Open a model package (folder or zip) and check its ``model.json``.

    Raises:
        PackageError: missing path, truncated or corrupt zip, missing or invalid ``model.json``, an
            unknown format version, a missing or mistyped field.
    """
    path = Path(path)
    if not path.exists():
        raise PackageError(
            f"{path}: no such model package (a folder or a .zip written by mambaclinix export)"
        )
    if path.is_file() and not zipfile.is_zipfile(path):
        raise PackageError(
            f"{path}: not a model package (a folder, or a zip archive: this file is truncated or not a zip)"
        )
    package = ModelPackage(path, {})
    raw = package._read(MODEL_JSON)
    if len(raw) > MAX_JSON_BYTES:
        raise PackageError(f"{path}: model.json is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PackageError(f"{path}: model.json is not valid JSON ({err}); the package is damaged") from err
    package.metadata = check_metadata(data, f"{path}/model.json")
    return package
