"""Whole networks and their registry of named presets (``create_model(name, **kwargs)``)."""

from mambaclinix.models.mambaclinix import STAGE_LAYER_TYPES, MambaClinixUNet
from mambaclinix.models.registry import create_model, is_model, list_models, register_model

__all__ = [
    "STAGE_LAYER_TYPES",
    "MambaClinixUNet",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
]
