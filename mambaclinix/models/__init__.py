"""Whole networks, their parts and the registry of named presets (``create_model(name, **kwargs)``)."""

from mambaclinix.models.decoder import MambaClinixDecoder
from mambaclinix.models.encoder import STAGE_LAYER_TYPES, MambaClinixEncoder
from mambaclinix.models.mambaclinix import MambaClinixUNet
from mambaclinix.models.registry import create_model, is_model, list_models, register_model

__all__ = [
    "STAGE_LAYER_TYPES",
    "MambaClinixDecoder",
    "MambaClinixEncoder",
    "MambaClinixUNet",
    "create_model",
    "is_model",
    "list_models",
    "register_model",
]
