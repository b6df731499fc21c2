"""Norm and activation factories: choose a layer by name, class, ``functools.partial`` or ``(name, kwargs)``.

Every block of the package takes its normalisation as a factory ``channels -> nn.Module`` and its
activation as a factory ``() -> nn.Module``, so that each layer gets its own module. The two functions
here turn the ways a user names a choice into such factories, like timm's ``get_norm_layer`` /
``get_act_layer`` and MONAI's ``Norm`` / ``Act`` factories::

    get_norm_layer("group", num_groups=4)(16)                       # GroupNorm(4, 16)
    get_norm_layer(("instance", {"eps": 1e-3}), spatial_dims=2)(8)  # InstanceNorm2d(8, eps=1e-3, affine)
    get_norm_layer(functools.partial(nn.GroupNorm, 8))(32)          # GroupNorm(8, 32)
    get_act_layer("leakyrelu", negative_slope=0.2)()                # LeakyReLU(0.2, inplace=True)
    get_act_layer(nn.GELU)()                                        # GELU()

Names are case-insensitive and ignore ``_`` and ``-`` (``"LeakyReLU"``, ``"leaky_relu"``); a dotted
path (``"torch.nn.GELU"``, as a YAML configuration writes a class) is imported. A name starts
from the defaults of the MambaClinix paper where it has one: ``"instance"`` is InstanceNorm with
``affine=True`` and ``eps=1e-5`` (nnU-Net's choice; PyTorch's own default is ``affine=False``),
``"leakyrelu"`` is LeakyReLU(0.01) in place. A class or a partial is used exactly as given.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn

from mambaclinix.layers.norm import LayerNormChannels

__all__ = [
    "NormFactory",
    "ActFactory",
    "NormSpec",
    "ActSpec",
    "check_spatial_dims",
    "get_norm_layer",
    "get_act_layer",
]

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]
#: What :func:`get_norm_layer` accepts: a name, an ``nn.Module`` class, a pair ``(name or class, kwargs)``,
#: or a callable ``channels -> module`` (e.g. a ``functools.partial``). The order of the union is the order
#: in which jsonargparse (the command line) tries the types: a YAML class path becomes a class, a
#: ``[name, {kwargs}]`` list a pair.
NormSpec = str | type[nn.Module] | tuple[str | type[nn.Module], dict[str, Any]] | Callable[..., nn.Module]
ActSpec = NormSpec

_SPATIAL = (2, 3)
_INSTANCE = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_BATCH = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# Torch norm classes bound to a number of spatial axes (a 2d class in a 3D network is an error).
_DIMS_OF_CLASS = {
    cls: dims
    for dims, classes in {
        1: (nn.BatchNorm1d, nn.InstanceNorm1d),
        2: (nn.BatchNorm2d, nn.InstanceNorm2d),
        3: (nn.BatchNorm3d, nn.InstanceNorm3d),
    }.items()
    for cls in classes
}


def _group_norm(num_channels: int, num_groups: int, **kwargs) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, num_channels, **kwargs)


# Norm names: canonical name -> (class per number of spatial axes, the name's default kwargs).
_NORM_LAYERS: dict[str, tuple[Callable[[int], Callable[..., nn.Module]], dict[str, Any]]] = {
    "instance": (_INSTANCE.__getitem__, {"eps": 1e-5, "affine": True}),
    "batch": (_BATCH.__getitem__, {}),
    "group": (lambda dims: _group_norm, {}),
    "layer": (lambda dims: LayerNormChannels, {}),
}
_NORM_ALIASES = {
    "instancenorm": "instance",
    "batchnorm": "batch",
    "groupnorm": "group",
    "layernorm": "layer",
    "channellayernorm": "layer",
}

# Activation names: canonical name -> (class, the name's default kwargs).
_ACT_LAYERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "leakyrelu": (nn.LeakyReLU, {"negative_slope": 0.01, "inplace": True}),
    "relu": (nn.ReLU, {"inplace": True}),
    "prelu": (nn.PReLU, {}),
    "elu": (nn.ELU, {}),
    "gelu": (nn.GELU, {}),
    "silu": (nn.SiLU, {}),
    "mish": (nn.Mish, {}),
    "tanh": (nn.Tanh, {}),
    "sigmoid": (nn.Sigmoid, {}),
    "identity": (nn.Identity, {}),
}
_ACT_ALIASES = {"swish": "silu", "none": "identity"}


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise ``ValueError``."""
    if spatial_dims not in _SPATIAL:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def _canonical(name: str, table: Mapping, aliases: Mapping[str, str], what: str) -> str:
    key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    key = aliases.get(key, key)
    if key not in table:
        raise ValueError(
            f"unknown {what} {name!r}; valid names: {', '.join(table)} (or a class or a partial)"
        )
    return key


def _check_kwargs(target: Callable, kwargs: Mapping[str, Any], what: str) -> None:
    """Fail now, with the argument's name, rather than when the first layer is built."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a callable without a signature: nothing to check
        return
    try:
        signature.bind_partial(**kwargs)
    except TypeError as err:
        raise ValueError(f"{what}: {err} (got {dict(kwargs)})") from None


def _import(path: str, what: str) -> Any:
    """The object at a dotted import path such as ``"torch.nn.GELU"`` (a class path in a YAML config)."""
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} {path!r} is not an importable name: {err}") from None


def _split(spec: Any, kwargs: dict[str, Any], what: str) -> tuple[Any, dict[str, Any]]:
    """Unpack ``(spec, kwargs)`` pairs and partials of classes and import dotted paths; later kwargs
    override earlier ones."""
    if isinstance(spec, str) and "." in spec:
        spec = _import(spec, what)
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2 or not isinstance(spec[1], Mapping):
            raise ValueError(f"{what} as a sequence must be (name or class, kwargs dict), got {spec!r}")
        return _split(spec[0], {**spec[1], **kwargs}, what)
    if isinstance(spec, functools.partial) and isinstance(spec.func, type) and not spec.args:
        return spec.func, {**spec.keywords, **kwargs}
    if isinstance(spec, nn.Module):
        raise ValueError(
            f"{what} must be a name, a class or a factory, not the module instance {spec!r} "
            "(every layer needs a module of its own)"
        )
    return spec, kwargs


def _bind(target: Callable, kwargs: dict[str, Any], what: str) -> Callable[..., nn.Module]:
    _check_kwargs(target, kwargs, what)
    return functools.partial(target, **kwargs) if kwargs else target


def get_norm_layer(norm: NormSpec = "instance", spatial_dims: int = 3, **kwargs) -> NormFactory:
    """A factory ``channels -> nn.Module`` for the normalisation ``norm``.

    Args:
        norm: One of

            - a name: ``"instance"`` (InstanceNorm{2,3}d, default ``eps=1e-5, affine=True``), ``"batch"``
              (BatchNorm{2,3}d), ``"group"`` (GroupNorm; needs ``num_groups``), ``"layer"`` (LayerNorm
              over the channels of each voxel, :class:`~mambaclinix.layers.LayerNormChannels`);
            - a class taking the channels first, e.g. ``nn.InstanceNorm3d`` (PyTorch's defaults) or
              ``LayerNormChannels``; ``nn.GroupNorm`` is called as ``GroupNorm(num_groups, channels)``;
            - a ``functools.partial`` of one of those, e.g. ``partial(nn.GroupNorm, 8)``, or any callable
              ``channels -> nn.Module``;
            - a pair ``(one of the above, kwargs)``, MONAI's form, convenient in YAML configurations:
              ``["group", {"num_groups": 8}]``.

            A dotted import path such as ``"torch.nn.BatchNorm3d"`` stands for the object it names.
        spatial_dims: 3 (volumes) or 2 (slices); picks the class of a name, and a torch norm class of the
            wrong dimensionality (e.g. ``nn.BatchNorm2d`` for 3) is rejected.
        **kwargs: Keyword arguments of the layer, overriding those of ``norm``.

    Returns:
        The factory; it builds a new module on every call.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), an ``nn.Module`` instance instead of
            a class, a class of the wrong dimensionality, ``"group"`` without ``num_groups``, or keyword
            arguments the layer does not take.
    """
    if isinstance(norm, int) and not isinstance(norm, bool):  # the former get_norm_layer(spatial_dims, eps)
        warnings.warn(
            "get_norm_layer(spatial_dims, eps=...) is deprecated; use "
            "get_norm_layer('instance', spatial_dims=..., eps=...)",
            DeprecationWarning,
            stacklevel=2,
        )
        norm, spatial_dims = "instance", norm
    check_spatial_dims(spatial_dims)
    spec, kwargs = _split(norm, kwargs, "norm")
    if isinstance(spec, str):
        key = _canonical(spec, _NORM_LAYERS, _NORM_ALIASES, "norm")
        cls_for_dims, defaults = _NORM_LAYERS[key]
        spec, kwargs = cls_for_dims(spatial_dims), {**defaults, **kwargs}
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise ValueError(f"norm must be an nn.Module class, got {spec!r}")
        dims = next((_DIMS_OF_CLASS[c] for c in spec.__mro__ if c in _DIMS_OF_CLASS), spatial_dims)
        if dims != spatial_dims:
            raise ValueError(
                f"norm {spec.__name__} is for {dims} spatial axes, but spatial_dims={spatial_dims}"
            )
        if issubclass(spec, nn.GroupNorm):
            spec = _group_norm
    elif not callable(spec):
        raise ValueError(f"norm must be a name, an nn.Module class or a callable, got {spec!r}")
    if spec is _group_norm and "num_groups" not in kwargs:
        raise ValueError("norm 'group' needs num_groups, e.g. get_norm_layer('group', num_groups=8)")
    return _bind(spec, kwargs, "norm")


def get_act_layer(act: ActSpec = "leakyrelu", **kwargs) -> ActFactory:
    """A factory ``() -> nn.Module`` for the activation ``act``.

    Args:
        act: One of

            - a name: ``"leakyrelu"`` (default ``negative_slope=0.01, inplace=True``), ``"relu"``
              (``inplace=True``), ``"prelu"``, ``"elu"``, ``"gelu"``, ``"silu"`` (``"swish"``), ``"mish"``,
              ``"tanh"``, ``"sigmoid"``, ``"identity"`` (``"none"``);
            - an ``nn.Module`` class, e.g. ``nn.GELU`` (PyTorch's defaults);
            - a ``functools.partial`` such as ``partial(nn.LeakyReLU, 0.1)``, or any callable returning a
              module;
            - a pair ``(one of the above, kwargs)``: ``["leakyrelu", {"negative_slope": 0.1}]``.

            A dotted import path such as ``"torch.nn.GELU"`` stands for the object it names.
        **kwargs: Keyword arguments of the activation, overriding those of ``act``.

    Returns:
        The factory; it builds a new module on every call.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), an ``nn.Module`` instance instead of
            a class, or keyword arguments the activation does not take.
    """
    if isinstance(act, (int, float)) and not isinstance(act, bool):  # the former get_act_layer(slope)
        warnings.warn(
            "get_act_layer(negative_slope) is deprecated; use get_act_layer('leakyrelu', negative_slope=...)",
            DeprecationWarning,
            stacklevel=2,
        )
        act, kwargs = "leakyrelu", {"negative_slope": act, **kwargs}
    spec, kwargs = _split(act, kwargs, "act")
    if isinstance(spec, str):
        cls, defaults = _ACT_LAYERS[_canonical(spec, _ACT_LAYERS, _ACT_ALIASES, "act")]
        spec, kwargs = cls, {**defaults, **kwargs}
    if isinstance(spec, type) and not issubclass(spec, nn.Module):
        raise ValueError(f"act must be an nn.Module class, got {spec!r}")
    if not callable(spec):
        raise ValueError(f"act must be a name, an nn.Module class or a callable, got {spec!r}")
    return _bind(spec, kwargs, "act")
