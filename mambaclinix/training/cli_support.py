"""What the command line needs around ``LightningCLI`` (:mod:`mambaclinix.training.lightning_cli`).

* :func:`checkpoint_folder` and :func:`find_last_checkpoint`: where ``--ckpt_path last`` looks, read from
  the parsed configuration with Lightning's own rule (the ``ModelCheckpoint``'s ``dirpath``, else the
  first logger's ``save_dir/name/version/checkpoints``, else ``default_root_dir/checkpoints``), so that
  the checkpoint is known before the model is built and its hyperparameters can fill in the network.
* :class:`MissingWeightsError` and :class:`ConfigurationError`: errors the user fixes (the command line
  prints them without a traceback).
* :func:`quiet_lightning`: silences the Lightning messages the project causes or a user cannot act on
  (advertising tips, a deprecation inside Lightning, the warning about the empty validation loader the
  data module returns on purpose); warnings about the user's data or settings stay.
* :class:`ParameterSummary`: Lightning's model summary without its FLOPs column, which is 0 for a model
  without an example input.
* :class:`SetupCleanup`: removes the files a command created in its run folder when it fails before the
  first batch (a TensorBoard event file, ``hparams.yaml``, ``config_<command>.yaml``).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

log = logging.getLogger(__name__)

__all__ = [
    "ConfigurationError",
    "MissingWeightsError",
    "ParameterSummary",
    "SetupCleanup",
    "checkpoint_folder",
    "find_last_checkpoint",
    "quiet_lightning",
]


class MissingWeightsError(FileNotFoundError):
    """``validate``/``test``/``predict`` without trained weights, or a checkpoint file that is missing."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        return str(self.args[0])


class ConfigurationError(ValueError):
    """A model or data argument the classes refuse (raised while the command line builds them)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# ------------------------------------------------------------------------------------------ last.ckpt


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    if isinstance(node, Mapping):
        return node.get(key, default)
    return getattr(node, key, default)


def _is_model_checkpoint(class_path: str) -> bool:
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, _, name = class_path.rpartition(".")
    try:
        import importlib

        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def checkpoint_folder(trainer: Any) -> Path:
    """The folder where ``--ckpt_path last`` looks, from the ``trainer`` section of a parsed configuration.

    Lightning's rule (``ModelCheckpoint``): the first checkpoint callback's ``dirpath``; else the first
    logger's ``save_dir/name/version/checkpoints`` (``version`` ``None``: the newest ``version_N`` folder
    holding a ``last.ckpt``); else ``default_root_dir/checkpoints``.
    """
    root = Path(_get(trainer, "default_root_dir") or os.getcwd())
    callbacks = _get(trainer, "callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = _get(cb, "class_path")
        if isinstance(class_path, str) and _is_model_checkpoint(class_path):
            dirpath = _get(_get(cb, "init_args"), "dirpath")
            if dirpath:
                return Path(dirpath)
            break
    loggers = _get(trainer, "logger")
    if loggers is True or loggers is None:  # Lightning's default logger: default_root_dir/lightning_logs
        return _newest_version(root / "lightning_logs")
    if loggers is False or (isinstance(loggers, list) and not loggers):
        return root / "checkpoints"
    first = loggers[0] if isinstance(loggers, list) else loggers
    args = _get(first, "init_args")
    save_dir = _get(args, "save_dir") or _get(args, "root_dir") or str(root)
    name = _get(args, "name", "lightning_logs")
    version = _get(args, "version")
    base = Path(save_dir) / ("" if name is None else str(name))
    if version is None:
        return _newest_version(base)
    version = version if isinstance(version, str) else f"version_{version}"
    return base / version / "checkpoints"


def _newest_version(base: Path) -> Path:
    """``base/version_N/checkpoints`` of the highest N that holds a last checkpoint (else of N = 0)."""
    numbered = []
    for p in base.glob("version_*") if base.is_dir() else []:
        m = re.fullmatch(r"version_(\d+)", p.name)
        if m and find_last_checkpoint(p / "checkpoints") is not None:
            numbered.append((int(m.group(1)), p))
    return (max(numbered)[1] if numbered else base / "version_0") / "checkpoints"


def find_last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) in ``folder``, as Lightning picks it; ``None``."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.suffix == ".ckpt" and re.match(r"^last(-v?\d+)?$", p.stem)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# ------------------------------------------------------------------------------------------- noise

_IGNORED_WARNINGS = (
    # the command line passes its arguments to LightningCLI on purpose
    r"LightningCLI's args parameter is intended to run from within Python",
    # inside Lightning's own pytree helper (a torch deprecation); nothing a user can change
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # the data module returns an empty validation loader when there are no validation cases; the data
    # module says so in one line instead
    r"Total length of `\w+` across ranks is zero",
)
_IGNORED_LOG_LINES = re.compile(r"💡 Tip: ")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _IGNORED_LOG_LINES.search(str(record.msg))


def quiet_lightning() -> None:
    """Install the warning and log filters (idempotent)."""
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if not any(isinstance(f, _DropTips) for f in target.filters):
                target.addFilter(_DropTips())


class ParameterSummary(ModelSummary):
    """Lightning's ``ModelSummary`` without the FLOPs column and total (0 without an example input)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **kwargs) -> None:  # fmt: skip
        columns = [c for c in summary_data if c[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        if not total_flops:
            table = "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops"))
        logging.getLogger("lightning.pytorch.callbacks.model_summary").info("\n" + table)


def replace_model_summary(trainer: L.Trainer) -> None:
    """Swap Lightning's default summary callback (``ModelSummary``/``RichModelSummary`` exactly) for
    :class:`ParameterSummary` with the same depth."""
    from lightning.pytorch.callbacks import RichModelSummary

    for i, cb in enumerate(trainer.callbacks):
        if type(cb) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = ParameterSummary(max_depth=cb._max_depth)


# ------------------------------------------------------------------------------------- clean failure


class SetupCleanup(L.Callback):
    """Notes when the first batch of the command's loop starts; :meth:`remove_new_files` then deletes
    the files created in ``folders`` since :meth:`snapshot` if the command failed before that."""

    def __init__(self) -> None:
        self.started = False
        self._before: dict[Path, set[Path] | None] = {}  # None: the folder is new (created by the command)

    def snapshot(self, folders: Iterable[str | os.PathLike]) -> None:
        """Remember what ``folders`` hold; for a folder that does not exist yet, its highest missing
        ancestor is remembered as new (removed whole, if only new files are in it)."""
        for folder in folders:
            if "://" in str(folder):  # remote (fsspec) folders are left alone
                continue
            folder = Path(folder).resolve()
            if folder.is_dir():
                self._before.setdefault(folder, set(folder.rglob("*")))
                continue
            top = folder
            while not top.parent.exists() and top.parent != top:
                top = top.parent
            self._before.setdefault(top, None)

    def _start(self, *args: Any) -> None:
        self.started = True

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _start

    def remove_new_files(self) -> list[Path]:
        """Delete what appeared in the watched folders (files, then the folders left empty); the paths."""
        removed: list[Path] = []
        for folder, before in self._before.items():
            if not folder.is_dir():
                continue
            new = [p for p in folder.rglob("*") if before is None or p not in before]
            if before is None:
                new.append(folder)
            for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
                try:
                    if p.is_dir() and not p.is_symlink():
                        if not any(p.iterdir()):
                            p.rmdir()
                            removed.append(p)
                    else:
                        p.unlink()
                        removed.append(p)
                except OSError:
                    pass
        return removed
