"""A CSV logger that keeps what earlier runs wrote.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a new run starts in a folder that is not empty. The
command line puts every command into one fixed folder (``runs/mambaclinix``) so that ``--ckpt_path last``
finds the checkpoints; with Lightning's logger, resuming a crashed run (or running ``test`` after
``fit``) would erase the training history. :class:`AppendingCSVLogger` appends to the existing file
instead (dropping an incomplete last row left by a killed process); when new columns appear it rewrites
the file with the wider header atomically and durably (:func:`mambaclinix.utils.atomic.atomic_write`), so
a crash never leaves it truncated.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from mambaclinix.utils.atomic import atomic_write

__all__ = ["AppendingCSVLogger"]


class _AppendingWriter(ExperimentWriter):
    """``ExperimentWriter`` that appends to an existing ``metrics.csv`` (local folders)."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            header = next(csv.reader(f), [])
        self.metrics_keys = list(header)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_write(self.metrics_file_path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, restval="")
            writer.writeheader()
            writer.writerows({k: v for k, v in row.items() if k is not None} for row in rows)

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):
            self._drop_partial_line()
        super().save()

    def _drop_partial_line(self) -> None:
        """A process killed while appending can leave an incomplete last row (no newline): remove it."""
        with open(self.metrics_file_path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            start = end
            while start > 0:
                start = max(0, start - 4096)
                f.seek(start)
                chunk = f.read(end - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    if start + cut + 1 < end:
                        f.truncate(start + cut + 1)
                    return
            # no newline at all: not even a whole header; leave the file to the header logic


class AppendingCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` (same arguments), appending to ``metrics.csv`` instead of deleting it.

    Rows of steps that a resumed run repeats (those after its checkpoint) appear twice, the later ones
    last. Remote folders (fsspec URLs) fall back to Lightning's writer.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        local = isinstance(get_filesystem(self.log_dir), LocalFileSystem)
        self._experiment = (_AppendingWriter if local else ExperimentWriter)(log_dir=self.log_dir)
        return self._experiment
