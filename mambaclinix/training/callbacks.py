"""Callbacks the CLI installs by default."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)


class TrainingCurves(L.Callback):
    """After ``fit``, plot the CSV logger's training loss and validation Dice to ``training_curves.png``.

    Args:
        filename: PNG name, written next to the CSV logger's ``metrics.csv``.
    """

    def __init__(self, filename: str = "training_curves.png") -> None:
        self.filename = filename

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            return
        csv_logger.save()
        metrics = Path(csv_logger.log_dir) / "metrics.csv"
        if not metrics.exists():
            return
        from mambaclinix.training.plots import plot_training_curves

        out = Path(csv_logger.log_dir) / self.filename
        if plot_training_curves(metrics, out):
            log.info("training curves written to %s", out)
