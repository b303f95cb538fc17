"""Norm-layer factory: a spec (string, alias, class or functools.partial) -> ``f(num_features, device=, dtype=)``.

The returned callable is what timm- and torchvision-style models take as ``norm_layer``; they call it as
``norm_layer(C)`` or ``norm_layer(C, device=..., dtype=..., eps=...)``.

Spec strings (case-insensitive, ``-`` read as ``_``):

=================  ===================================================================
``bn``             BatchNorm2d (also ``bn1d``, ``bn2d``, ``bn3d``)
``syncbn``         BatchNorm2d(sync=True): statistics all-reduced over the default process group
``frozen_bn``      FrozenBatchNorm2d (also ``frozen_bn1d``, ``frozen_bn3d``)
``ghost_bn:16``    GhostBatchNorm2d(virtual_batch_size=16)
``brn``            BatchRenorm2d
``gn32``           GroupNorm(num_groups=32); ``gn`` = ``gn32``; ``gn:8`` = 8 groups; ``gn:gs16`` = 16 channels/group
``in``             InstanceNorm2d (affine; also ``in1d``, ``in3d``)
``ln``             LayerNorm over (C, *)
``ln2d``           LayerNorm2d: per position over channels (ConvNeXt)
``rms``/``rms2d``  RMSNorm / RMSNorm2d
``frn``            FilterResponseNorm2d with TLU
``evo_b0``         EvoNorm2dB0; ``evo_s0`` EvoNorm2dS0 (takes ``:G`` / ``:gsK`` like gn)
``online``         OnlineNorm2d (also ``online1d``): streaming statistics, batch size 1 and varying batches
``mabn``           MovingAverageBatchNorm2d: moving-average statistics in forward and backward
``none``           torch.nn.Identity
=================  ===================================================================

Aliases from detectron2 ("BN", "SyncBN", "FrozenBN", "GN", "LN", "naiveSyncBN", "nnSyncBN"), mmcv ("BN2d", "IN",
"GN", "LN", ...) and timm ("batchnorm", "groupnorm", "groupnorm1", "layernorm2d", "rmsnorm2d", "frozenbatchnorm2d",
"evonormb0", "evonorms0", "frn", ...) map to the same layers. Keyword arguments given to :func:`get_norm_layer`
become defaults; keyword arguments at call time override them.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .functional._checks import unknown_name_error

__all__ = ["get_norm_layer", "create_norm_layer", "register_norm", "list_norms", "NormLayerFactory"]


def _group_arg(arg: str) -> dict:
    if arg.startswith("gs") and arg[2:].isdigit():
        return {"group_size": int(arg[2:])}
    if arg.isdigit():
        return {"num_groups": int(arg)}
    raise ValueError(f"group spec argument {arg!r} must be a number of groups ('gn:8', 'gn8') or 'gs<channels>'")


def _virtual_batch_arg(arg: str) -> dict:
    if arg.isdigit():
        return {"virtual_batch_size": int(arg)}
    raise ValueError(f"ghost_bn spec argument {arg!r} must be the virtual batch size, e.g. 'ghost_bn:16'")


@dataclass(frozen=True)
class _Entry:
    """A registered norm: a layer class name in normlab.layers (or a callable) plus default keyword arguments."""

    target: str | Callable
    defaults: dict = field(default_factory=dict)
    parse_arg: Callable[[str], dict] | None = None

    def build(self) -> Callable:
        if callable(self.target):
            return self.target
        if self.target == "Identity":
            return nn.Identity
        from . import layers

        return getattr(layers, self.target)


_REGISTRY: dict[str, _Entry] = {
    "bn": _Entry("BatchNorm2d"),
    "bn1d": _Entry("BatchNorm1d"),
    "bn2d": _Entry("BatchNorm2d"),
    "bn3d": _Entry("BatchNorm3d"),
    "syncbn": _Entry("BatchNorm2d", {"sync": True}),
    "frozen_bn": _Entry("FrozenBatchNorm2d"),
    "frozen_bn1d": _Entry("FrozenBatchNorm1d"),
    "frozen_bn3d": _Entry("FrozenBatchNorm3d"),
    "ghost_bn": _Entry("GhostBatchNorm2d", parse_arg=_virtual_batch_arg),
    "brn": _Entry("BatchRenorm2d"),
    "gn": _Entry("GroupNorm", parse_arg=_group_arg),
    "in": _Entry("InstanceNorm2d"),
    "in1d": _Entry("InstanceNorm1d"),
    "in3d": _Entry("InstanceNorm3d"),
    "ln": _Entry("LayerNorm"),
    "ln2d": _Entry("LayerNorm2d"),
    "rms": _Entry("RMSNorm"),
    "rms2d": _Entry("RMSNorm2d"),
    "frn": _Entry("FilterResponseNorm2d"),
    "evo_b0": _Entry("EvoNorm2dB0"),
    "evo_s0": _Entry("EvoNorm2dS0", parse_arg=_group_arg),
    "online": _Entry("OnlineNorm2d"),
    "online1d": _Entry("OnlineNorm1d"),
    "mabn": _Entry("MovingAverageBatchNorm2d"),
    "none": _Entry("Identity"),
}

_ALIASES: dict[str, str] = {
    # detectron2 / mmcv
    "batchnorm": "bn",
    "batchnorm2d": "bn",
    "batch_norm": "bn",
    "bn2d": "bn2d",
    "batchnorm1d": "bn1d",
    "batchnorm3d": "bn3d",
    "sync_bn": "syncbn",
    "syncbatchnorm": "syncbn",
    "naivesyncbn": "syncbn",
    "nnsyncbn": "syncbn",
    "torchsyncbn": "syncbn",
    "frozenbn": "frozen_bn",
    "frozen_batchnorm": "frozen_bn",
    "frozenbatchnorm": "frozen_bn",
    "frozenbatchnorm2d": "frozen_bn",
    "frozenbatchnorm1d": "frozen_bn1d",
    "frozenbatchnorm3d": "frozen_bn3d",
    "ghostbn": "ghost_bn",
    "ghostbatchnorm": "ghost_bn",
    "ghostbatchnorm2d": "ghost_bn",
    "batchrenorm": "brn",
    "batch_renorm": "brn",
    "batchrenorm2d": "brn",
    "groupnorm": "gn",
    "group_norm": "gn",
    "instancenorm": "in",
    "instance_norm": "in",
    "instancenorm2d": "in",
    "in2d": "in",
    "instancenorm1d": "in1d",
    "instancenorm3d": "in3d",
    "layernorm": "ln",
    "layer_norm": "ln",
    "layernorm2d": "ln2d",
    "layer_norm2d": "ln2d",
    "rmsnorm": "rms",
    "rms_norm": "rms",
    "rmsnorm2d": "rms2d",
    "rms_norm2d": "rms2d",
    "filterresponsenorm": "frn",
    "filterresponsenorm2d": "frn",
    "filterresponsenormtlu2d": "frn",
    "evonormb0": "evo_b0",
    "evonorm_b0": "evo_b0",
    "evonorm2db0": "evo_b0",
    "evonorms0": "evo_s0",
    "evonorm_s0": "evo_s0",
    "evonorm2ds0": "evo_s0",
    "onlinenorm": "online",
    "online_norm": "online",
    "onlinenorm2d": "online",
    "onlinenorm1d": "online1d",
    "movingaveragebatchnorm2d": "mabn",
    "movingaveragebatchnorm": "mabn",
    "identity": "none",
    "": "none",
    # timm: GroupNorm with one group is a LayerNorm over (C, H, W)
    "groupnorm1": "ln",
}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "_")


class NormLayerFactory:
    """Callable ``f(num_features, device=None, dtype=None, **overrides) -> nn.Module`` made by get_norm_layer."""

    def __init__(self, name: str, build: Callable, defaults: dict) -> None:
        self.name = name
        self.build = build
        self.defaults = dict(defaults)

    def __call__(self, num_features: int, device=None, dtype=None, **overrides) -> nn.Module:
        kwargs = {**self.defaults, **overrides}
        if device is not None:
            kwargs["device"] = device
        if dtype is not None:
            kwargs["dtype"] = dtype
        return self.build(num_features, **kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        return f"NormLayerFactory({self.name!r}{', ' if args else ''}{args})"


def _lookup(spec: str) -> tuple[str, _Entry, dict]:
    raw = _canonical(spec)
    name, _, arg = raw.partition(":")
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        m = re.fullmatch(r"(gn|groupnorm|group_norm|evo_s0|evonorms0)(\d+)", name)
        if m is None:
            raise unknown_name_error("norm spec", spec, list(_REGISTRY) + list(_ALIASES))
        name, arg = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    entry = _REGISTRY[name]
    kwargs = dict(entry.defaults)
    if arg:
        if entry.parse_arg is None:
            raise ValueError(f"norm spec {spec!r}: {name!r} takes no ':' argument")
        try:
            kwargs.update(entry.parse_arg(arg))
        except ValueError as e:
            raise ValueError(f"norm spec {spec!r}: {e}") from None
    return name, entry, kwargs


def get_norm_layer(spec, **defaults) -> NormLayerFactory:
    """Resolve ``spec`` into a norm-layer constructor ``f(num_features, device=None, dtype=None, **overrides)``.

    Args:
        spec: a spec string or alias (see the module docstring), a registered name, an nn.Module subclass whose
            constructor takes ``num_features`` first, a functools.partial of one, or any callable with that shape.
        **defaults: keyword arguments passed to every layer built (overridable per call).

    Raises:
        ValueError: unknown name (the message lists the valid ones and the closest match), a bad ``:`` argument,
            or a spec of the wrong type.

    Example:
        >>> import torch, normlab
        >>> norm_layer = normlab.get_norm_layer("gn:8")
        >>> norm_layer(64)
        GroupNorm(64, num_groups=8, eps=1e-05, affine=True)
        >>> normlab.get_norm_layer("SyncBN")(16).sync
        True
    """
    if isinstance(spec, NormLayerFactory):
        return NormLayerFactory(spec.name, spec.build, {**spec.defaults, **defaults})
    if isinstance(spec, str):
        name, entry, kwargs = _lookup(spec)
        return NormLayerFactory(name, entry.build(), {**kwargs, **defaults})
    if isinstance(spec, functools.partial) or inspect.isclass(spec) or callable(spec):
        label = getattr(spec, "__name__", None) or getattr(getattr(spec, "func", None), "__name__", repr(spec))
        return NormLayerFactory(label, spec, defaults)
    raise ValueError(
        f"get_norm_layer: spec={spec!r} must be a string, an nn.Module class, a functools.partial or a callable"
    )


def create_norm_layer(spec, num_features: int, **kwargs) -> nn.Module:
    """Build one norm module: ``get_norm_layer(spec)(num_features, **kwargs)``.

    Example:
        >>> import normlab
        >>> normlab.create_norm_layer("bn", 8, momentum=0.01).momentum
        0.01
    """
    return get_norm_layer(spec)(num_features, **kwargs)


def register_norm(name: str, factory, *, aliases: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Register a user-defined norm under ``name`` (and ``aliases``) for get_norm_layer and spec strings.

    Args:
        name: the spec name; case-insensitive.
        factory: a class or callable taking ``num_features`` first and keyword arguments (device, dtype, ...).
        aliases: further names for it.
        overwrite: allow replacing an existing name.

    Raises:
        ValueError: if the name is taken and ``overwrite`` is False, or ``factory`` is not callable.

    Example:
        >>> import torch, normlab
        >>> normlab.register_norm("my_bn", torch.nn.BatchNorm2d, overwrite=True)
        >>> type(normlab.create_norm_layer("my_bn", 4)) is torch.nn.BatchNorm2d
        True
    """
    if not callable(factory):
        raise ValueError(f"register_norm: factory={factory!r} must be a class or callable")
    names = [_canonical(name)] + [_canonical(a) for a in aliases]
    for n in names:
        if not n or ":" in n:
            raise ValueError(f"register_norm: name={n!r} must be non-empty and contain no ':'")
        if not overwrite and (n in _REGISTRY or n in _ALIASES):
            raise ValueError(f"register_norm: name={n!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[names[0]] = _Entry(factory)
    _ALIASES.pop(names[0], None)
    for a in names[1:]:
        _ALIASES[a] = names[0]


def list_norms(aliases: bool = False) -> list[str]:
    """Sorted registered spec names (with ``aliases=True``, the aliases too).

    Example:
        >>> import normlab
        >>> "gn" in normlab.list_norms()
        True
    """
    names = set(_REGISTRY)
    if aliases:
        names |= {a for a in _ALIASES if a}
    return sorted(names)
