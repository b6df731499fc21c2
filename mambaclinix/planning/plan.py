"""The dataset plan: what :func:`~mambaclinix.planning.plan_dataset` decides, as plain Python values
(written to ``plan.yaml`` by :mod:`mambaclinix.planning.render`; ``docs/planning.md`` explains every entry).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DatasetPlan"]


@dataclass
class DatasetPlan:
    """Everything the planner decided, and the fingerprint summary it decided from.

    The attributes are plain Python values (the plan file is :func:`dataclasses.asdict` of this).
    """

    source: dict[str, str]
    dataset: dict[str, Any]
    fingerprint: dict[str, Any]
    target_spacing: list[float]
    anisotropic_axis: int | None
    normalization: list[str]
    median_shape: list[int]
    patch_size: list[int]
    batch_size: int
    network: dict[str, Any]
    foreground_probability: float
    memory: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    #: batch Dice for Dice and L_TRS (nnU-Net's rule, :func:`~mambaclinix.planning.planner.uses_batch_dice`)
    batch_dice: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def net_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`~mambaclinix.models.MambaClinixUNet` (without the channel counts)."""
        keys = ("n_stages", "features_per_stage", "kernel_sizes", "strides", "n_hgcn_stages")
        return {k: self.network[k] for k in keys}
