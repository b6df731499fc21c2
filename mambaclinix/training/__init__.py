"""Lightning training: :class:`SegmentationModule` (any network, the paper loss, sliding-window
validation/test/prediction) and the callbacks the CLI installs."""

from mambaclinix.training.callbacks import TrainingCurves
from mambaclinix.training.checkpoint import AtomicCheckpointIO, ResumableCheckpoint
from mambaclinix.training.csv_logger import AppendingCSVLogger
from mambaclinix.training.guards import NonFiniteGuard, NonFiniteTrainingError
from mambaclinix.training.module import SegmentationModule

__all__ = [
    "AppendingCSVLogger",
    "AtomicCheckpointIO",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "ResumableCheckpoint",
    "SegmentationModule",
    "TrainingCurves",
]
