"""Dataset planning: fingerprint → target spacing, patch, batch and network topology (nnU-Net's rules).

:func:`plan_dataset` (``mambaclinix plan DATA_DIR``) reads a dataset, computes its fingerprint, chooses
the preprocessing and the network for a memory budget and writes the plan and a ready LightningCLI
config; see ``docs/planning.md``. The rules (:mod:`mambaclinix.planning.topology`) and the memory model
(:mod:`mambaclinix.planning.memory`, its fitted coefficients shipped as package data) need only torch and
numpy; the planner itself reads images with TorchIO and, like the YAML rendering
(:mod:`mambaclinix.planning.render`), is imported on first access.
"""

import importlib

from mambaclinix.planning.memory import count_parameters, load_coefficients, memory_terms, predict_peak
from mambaclinix.planning.topology import (
    Topology,
    adaptive_layer_types,
    features_per_stage,
    plan_topology,
    target_spacing,
)

_LAZY = {
    "DatasetPlan": "mambaclinix.planning.plan",
    "PlanningError": "mambaclinix.planning.planner",
    "choose_patch_and_batch": "mambaclinix.planning.planner",
    "plan_dataset": "mambaclinix.planning.planner",
    "uses_batch_dice": "mambaclinix.planning.planner",
    "write_plan": "mambaclinix.planning.render",
}

__all__ = [
    "Topology",
    "adaptive_layer_types",
    "count_parameters",
    "features_per_stage",
    "load_coefficients",
    "memory_terms",
    "plan_topology",
    "predict_peak",
    "target_spacing",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
