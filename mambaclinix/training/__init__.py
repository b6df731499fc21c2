"""Lightning training: :class:`SegmentationModule` (any network, the paper loss, sliding-window
validation/test/prediction), the callbacks the CLI installs, and the LightningCLI itself
(:class:`MambaClinixCLI`, built by :func:`lightning_cli`) that ``mambaclinix.cli`` and the demo run."""

from mambaclinix.training.callbacks import TrainingCurves
from mambaclinix.training.checkpoint import AtomicCheckpointIO, ResumableCheckpoint
from mambaclinix.training.csv_logger import AppendingCSVLogger
from mambaclinix.training.guards import NonFiniteGuard, NonFiniteTrainingError
from mambaclinix.training.lightning_cli import MambaClinixCLI, lightning_cli
from mambaclinix.training.module import SegmentationModule

__all__ = [
    "AppendingCSVLogger",
    "AtomicCheckpointIO",
    "MambaClinixCLI",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "ResumableCheckpoint",
    "SegmentationModule",
    "TrainingCurves",
    "lightning_cli",
]
