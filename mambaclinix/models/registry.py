"""Registry of named model presets: ``register_model``, ``create_model(name, **kwargs)``, ``list_models``.

A preset is a small function ``name(**kwargs) -> nn.Module`` decorated with :func:`register_model`;
keyword arguments override the preset's defaults (timm's pattern).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under ``fn.__name__``; used as a decorator on preset functions.

    Raises:
        ValueError: a preset of the same name is already registered.
    """
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def is_model(name: str) -> bool:
    """True if ``name`` is a registered preset."""
    return name in _MODELS


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered presets, optionally filtered by a shell-style ``pattern``."""
    names = sorted(_MODELS)
    return names if pattern is None else fnmatch.filter(names, pattern)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the preset ``name``; ``kwargs`` override its arguments (e.g. ``out_channels=3``).

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)
