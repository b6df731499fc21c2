"""Lightning training: :class:`SegmentationModule` (any network, the paper loss, sliding-window
validation/test/prediction) and the callbacks the CLI installs."""

from mambaclinix.training.callbacks import TrainingCurves
from mambaclinix.training.module import SegmentationModule

__all__ = ["SegmentationModule", "TrainingCurves"]
