"""Crash-safe checkpoints: atomic writes and a periodically refreshed ``last.ckpt``.

:class:`AtomicCheckpointIO` writes every checkpoint the Trainer saves (``ModelCheckpoint``, SLURM
requeue, ``trainer.save_checkpoint``) through :mod:`mambaclinix.utils.atomic`: to a hidden temporary
file in the destination folder, flushed to disk (``fsync``) and renamed over the destination
(``os.replace``, atomic on POSIX file systems); the folder entry is then synced too. A process killed at
any moment therefore leaves either the previous complete checkpoint or the new complete one, never a
truncated file under the checkpoint's name. The temporary name (``.<name>.tmp-<random>``) does not end
in ``.ckpt``, so neither ``--ckpt_path last`` nor a ``glob("*.ckpt")`` picks up the remains of an
interrupted write. Lightning's own writer goes through a temporary file in the system's temp folder,
which is moved by copying (not renamed) when that folder is on another file system, is not synced, and
is left behind when the process is killed.

:class:`ResumableCheckpoint` is Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` every
``last_every_n_train_steps`` optimizer steps, so a killed run loses at most that many steps, while the
top-k checkpoints keep following the monitored validation metric.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mambaclinix.utils.atomic import atomic_write

log = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointIO", "ResumableCheckpoint", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`mambaclinix.utils.atomic.atomic_write`: a temporary file in
    ``path``'s folder, ``fsync``, ``os.replace``, then an ``fsync`` of the folder.

    On any error (including ``KeyboardInterrupt``) the temporary file is removed and an existing ``path`` is
    left untouched. A process killed outright (``SIGKILL``, power loss) may leave the hidden temporary
    file ``.<name>.tmp-<random>`` behind (no ``.ckpt`` suffix), never a partial ``path``.

    Args:
        obj: anything ``torch.save`` accepts (a Lightning checkpoint dictionary).
        path: destination on a local file system; its folder is created if missing.
    """
    with atomic_write(path, "wb", suffix="") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose local writes are atomic (see the module docstring).

    Remote paths (``s3://``, ``gs://``, … through fsspec) keep Lightning's transactional upload. Pass it as
    ``Trainer(plugins=[AtomicCheckpointIO()])``; the command line installs it unless another
    ``CheckpointIO`` plugin is given.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint does not take storage_options; got "
                f"{storage_options!r}. Use a custom CheckpointIO plugin for that."
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` every ``last_every_n_train_steps`` steps.

    All ``ModelCheckpoint`` arguments are accepted and behave as in Lightning (the top-k checkpoints follow
    ``monitor`` at the end of validation; with ``save_last`` the last checkpoint is also written then).
    In addition, when ``save_last`` is set, ``last.ckpt`` is refreshed after every
    ``last_every_n_train_steps``-th optimizer step, mid-epoch included, so that ``--ckpt_path last``
    after a crash repeats at most that many steps. These step saves do not count as the callback's save of
    that step: the end-of-validation save still happens when both fall on the same step.

    Args:
        last_every_n_train_steps: refresh ``last.ckpt`` every this many optimizer steps; 0 or ``None``
            turns the step saves off.
        **kwargs: ``ModelCheckpoint`` arguments.
    """

    def __init__(self, last_every_n_train_steps: int | None = 100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = 0 if last_every_n_train_steps is None else last_every_n_train_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(
                f"last_every_n_train_steps must be None or an int >= 0, got {last_every_n_train_steps!r}"
            )
        if n and self.save_last == "link":
            raise ValueError(
                "save_last='link' makes last.ckpt a link to the newest top-k checkpoint, which a step save "
                "does not write; use save_last=True with last_every_n_train_steps, or set it to 0"
            )
        self.last_every_n_train_steps = n

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # Before the first validation (none yet, or no validation cases at all) the monitored metric does
        # not exist: there is no best checkpoint to keep yet, and Lightning's warning about it would only
        # say so. ``last.ckpt`` is saved as usual.
        if self.monitor is not None and self.monitor not in monitor_candidates:
            if not trainer.fit_loop.epoch_loop.val_loop._has_run:
                return
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_train_steps
        if not (n and self.save_last) or trainer.global_step % n != 0:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        before = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        # a step save must not keep the end-of-validation (top-k) save of this step from happening
        self._last_global_step_saved = before
