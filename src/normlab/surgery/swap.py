"""Swap the normalization layers of a model: BatchNorm -> any normlab norm, or any norm -> BatchNorm."""

from __future__ import annotations

import functools
import inspect
import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..factory import NormLayerFactory, get_norm_layer
from ._match import is_batch_norm, name_selected, set_submodule
from ._report import SurgeryReport

__all__ = ["swap_norm"]

# The input ranks a "<Family>1d/2d/3d" class takes, and back.
_SUFFIX_RANKS = {"1d": (2, 3), "2d": (4,), "3d": (5,)}
_RANK_SUFFIX = {ranks: suffix for suffix, ranks in _SUFFIX_RANKS.items()}
_AFFINE = ("weight", "bias")
_STATS = ("running_mean", "running_var")


def input_ranks(module: nn.Module) -> tuple[int, ...] | None:
    """The input ranks ``module`` accepts: normlab's ``_input_dims``, else read from a ``...1d/2d/3d`` class name
    (torch.nn.BatchNorm1d takes 2D or 3D input); None when not known (SyncBatchNorm, GroupNorm, Identity: any)."""
    dims = getattr(type(module), "_input_dims", None)
    if dims is not None:
        return tuple(dims)
    match = re.search(r"([123]d)$", type(module).__name__)
    return _SUFFIX_RANKS[match.group(1)] if match else None


def module_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a module's own parameters/buffers (None where it has none)."""
    tensors = [t for t in itertools.chain(module.parameters(False), module.buffers(False)) if t is not None]
    floating = [t for t in tensors if t.is_floating_point()]
    if floating:
        return floating[0].device, floating[0].dtype
    return (tensors[0].device if tensors else None), None


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name of every module, keyed by ``id(module)`` (a module shared under two names has two)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return names


def replace_module(model: nn.Module, names: list[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at each of ``names`` (all the places one module is registered); returns the (new) root."""
    for name in names:
        model = set_submodule(model, name, new)
    return model


def num_channels(module: nn.Module) -> int | None:
    """C of a per-channel norm: ``num_features`` (normlab, torch BatchNorm), ``num_channels`` (torch GroupNorm), else
    the length of its 1-D ``running_mean`` or ``weight`` (torchvision's FrozenBatchNorm2d keeps no count)."""
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for attr in ("running_mean", "weight"):
        value = getattr(module, attr, None)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            return value.numel()
    return None


def _rank_sibling(factory: NormLayerFactory, suffix: str) -> NormLayerFactory | None:
    """The same factory building the ``suffix`` ("1d"/"2d"/"3d") member of its class's family, if there is one:
    BatchNorm2d -> BatchNorm1d, FrozenBatchNorm2d -> FrozenBatchNorm1d, torch.nn.BatchNorm2d -> torch.nn.BatchNorm1d.
    """
    build = factory.build
    cls = build.func if isinstance(build, functools.partial) else build
    if not inspect.isclass(cls) or not re.search(r"[123]d$", cls.__name__):
        return None
    sibling = getattr(sys.modules.get(cls.__module__), cls.__name__[:-2] + suffix, None)
    if not (inspect.isclass(sibling) and issubclass(sibling, nn.Module)):
        return None
    if isinstance(build, functools.partial):
        sibling = functools.partial(sibling, *build.args, **build.keywords)
    return NormLayerFactory(factory.name, sibling, factory.defaults)


def _source_predicate(source) -> Callable[[nn.Module], bool]:
    if source is None:
        return is_batch_norm
    if inspect.isclass(source) or (isinstance(source, tuple) and all(inspect.isclass(s) for s in source)):
        return lambda module: isinstance(module, source)
    if callable(source):
        return source
    raise ValueError(
        f"swap_norm: source={source!r} must be None (batch norms), a module class, a tuple of classes or a "
        "predicate module -> bool"
    )


@dataclass
class _Plan:
    """One module to replace: its names, the old and new module, and what the report says about it."""

    names: list[str]
    old: nn.Module
    new: nn.Module
    notes: list[str]


class _CannotSwap(Exception):
    """Why one selected module cannot take the new norm (raised under strict, reported as a skip otherwise)."""


def _build(factory: NormLayerFactory, old: nn.Module) -> tuple[nn.Module, list[str]]:
    """The new module for ``old``, of a rank that fits it, with notes on any rank caveat."""
    if isinstance(old, nn.modules.lazy.LazyModuleMixin) and old.has_uninitialized_params():
        raise _CannotSwap("lazy module not initialized yet: run one forward first")
    channels = num_channels(old)
    if channels is None:
        raise _CannotSwap("cannot tell its number of channels (no num_features, num_channels or 1-D weight)")
    device, dtype = module_device_dtype(old)

    def make(f: NormLayerFactory) -> nn.Module:
        try:
            return f(channels, device=device, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise _CannotSwap(f"building {f.name!r} for {channels} channels failed: {e}") from None

    new = make(factory)
    old_ranks, new_ranks = input_ranks(old), input_ranks(new)
    if old_ranks is None or new_ranks is None or set(old_ranks) <= set(new_ranks):
        return new, []
    sibling = _rank_sibling(factory, _RANK_SUFFIX.get(old_ranks, ""))
    if sibling is not None:
        candidate = make(sibling)
        if set(old_ranks) & set(input_ranks(candidate) or old_ranks):
            new, new_ranks = candidate, input_ranks(candidate)
    if new_ranks is not None and not set(old_ranks) & set(new_ranks):
        raise _CannotSwap(
            f"{type(new).__name__} takes {_ranks_text(new_ranks)} input but {type(old).__name__} takes "
            f"{_ranks_text(old_ranks)} input, and the spec has no variant of that rank"
        )
    if new_ranks is not None and not set(old_ranks) <= set(new_ranks):
        return new, [f"{type(new).__name__} takes only {_ranks_text(new_ranks)} input"]
    return new, []


def _ranks_text(ranks) -> str:
    return " or ".join(f"{r}D" for r in ranks)


def _copy_affine(old: nn.Module, new: nn.Module, channels: int) -> str:
    """Copy gamma/beta (parameters or buffers, e.g. a FrozenBatchNorm's) where both sides have them with shape (C,);
    returns a note on what was and was not copied."""
    copied, missing = [], []
    for attr in _AFFINE:
        src, dst = getattr(old, attr, None), getattr(new, attr, None)
        if not isinstance(src, torch.Tensor):
            missing.append(f"{attr} (source has none)")
        elif not isinstance(dst, torch.Tensor):
            missing.append(f"{attr} (target has none)")
        elif tuple(dst.shape) != (channels,) or tuple(src.shape) != (channels,):
            missing.append(f"{attr} (shape {tuple(src.shape)} -> {tuple(dst.shape)}, expected ({channels},))")
        else:
            with torch.no_grad():
                dst.copy_(src)
            copied.append(attr)
    if not missing:
        return "affine copied"
    text = "not copied: " + ", ".join(missing)
    return (f"{' and '.join(copied)} copied; " if copied else "affine ") + text


def _copy_batch_norm_state(old: nn.Module, new: nn.Module, factory: NormLayerFactory, channels: int) -> str:
    """Between two batch norms: running statistics, num_batches_tracked, and eps/momentum unless the spec sets
    them, so that the swap changes the class and not the function."""
    done = []
    stats = [(getattr(old, k, None), getattr(new, k, None)) for k in _STATS]
    if all(isinstance(s, torch.Tensor) and isinstance(d, torch.Tensor) for s, d in stats) and all(
        tuple(s.shape) == tuple(d.shape) == (channels,) for s, d in stats
    ):
        with torch.no_grad():
            for src, dst in stats:
                dst.copy_(src)
            src, dst = getattr(old, "num_batches_tracked", None), getattr(new, "num_batches_tracked", None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                dst.copy_(src)
        done.append("running statistics")
    given = {**factory.defaults, **getattr(factory.build, "keywords", {})}  # the spec's own choices win
    for attr in ("eps", "momentum"):
        if attr not in given and hasattr(old, attr) and hasattr(new, attr):
            setattr(new, attr, getattr(old, attr))
            done.append(attr)
    return (", ".join(done) + " copied") if done else ""


def swap_norm(
    model: nn.Module,
    spec,
    *,
    include=None,
    exclude=None,
    source=None,
    copy_affine: bool = True,
    strict: bool = True,
) -> tuple[nn.Module, SurgeryReport]:
    """Replace the normalization layers of ``model`` by ``get_norm_layer(spec)(C, device=..., dtype=...)``.

    By default every batch norm is replaced: torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm, normlab's batch norms
    (incl. GhostBatchNorm2d, BatchRenorm2d) and frozen batch norms of any origin (normlab, torchvision, timm,
    detectron2). ``source`` selects other modules instead, e.g. ``source=normlab.GroupNorm`` with ``spec="bn"``
    turns GroupNorm back into BatchNorm.

    What carries over:

    * device, dtype (of the old module's parameters/buffers) and the training flag of each replaced module; the
      model's own training flag and every other module are untouched. Norm parameters are 1-D, so there is no
      memory format to keep.
    * gamma/beta (``copy_affine``): copied when both modules have a per-channel ``weight``/``bias`` of shape (C,),
      parameters or buffers alike (a FrozenBatchNorm's buffers become the new parameters). An affine-less target,
      an affine-less source or a shape mismatch is noted in the report as not copied.
    * batch norm -> batch norm (e.g. torch.nn.BatchNorm2d -> normlab ``"bn"``, or -> ``"frozen_bn"``): running
      statistics, ``num_batches_tracked``, and ``eps``/``momentum`` unless the spec (its factory keywords or
      partial) sets them, so the model computes the same function in train and eval. Other targets keep their own
      eps.

    Rank mapping: the spec names a family, the replaced module's rank picks its member. A module taking 2D/3D input
    (BatchNorm1d, FrozenBatchNorm1d) gets the spec's ``...1d`` class, a 5D one its ``...3d`` class: ``"bn"`` builds
    BatchNorm1d for a BatchNorm1d, BatchNorm3d for a BatchNorm3d; ``"frozen_bn"`` builds FrozenBatchNorm1d /
    FrozenBatchNorm3d for them; a torch class given as the spec maps the same way (torch.nn.BatchNorm2d ->
    torch.nn.BatchNorm1d). Rank-agnostic targets (GroupNorm, LayerNorm, RMSNorm, Identity) fit any module. A target
    that cannot take the module's input rank (LayerNorm2d or FilterResponseNorm2d for a BatchNorm1d or a
    BatchNorm3d) is incompatible. Where the old module's rank is not known (SyncBatchNorm, GroupNorm, ...), the spec
    is built as given; where the new module takes only some of the old one's ranks, the report says so.

    Args:
        model: the model (its root may itself be a norm: then the returned model is the new module).
        spec: anything :func:`normlab.get_norm_layer` takes ("gn:8", "bn", "frozen_bn", a class, a partial, ...).
        include, exclude: fnmatch patterns on qualified module names ("layer1.*", "*.bn2"); exclude wins.
            A module registered under several names is selected by its first name and replaced at all of them.
        source: which modules to replace: None (batch norms of every origin), a module class or tuple of
            classes, or a predicate ``module -> bool``. The modules must expose C as ``num_features`` or
            ``num_channels``.
        copy_affine: copy gamma/beta where meaningful (see above).
        strict: a selected module that cannot be swapped (incompatible rank, spec not buildable for its channel
            count, unknown channel count) raises ValueError before anything is changed; with False it is left as
            it was and reported as skipped.

    Returns:
        (model, report): the same model object with its modules replaced in place (the new module when the root
        itself was replaced), and a :class:`~normlab.surgery._report.SurgeryReport` listing each replacement with
        what was copied, and each candidate skipped with the reason.

    Raises:
        ValueError: unknown spec (from the factory, naming it), a bad ``source``, or under ``strict`` a module that
            cannot be swapped (naming it and the reason).

    Note:
        The new modules are fresh: hooks registered on the old ones are not carried over, and an optimizer built
        before the swap still holds the old parameters (build it after). Training and eval flags are preserved,
        so a model swapped in eval mode stays in eval mode.

    Example:
        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> model, report = normlab.surgery.swap_norm(model, "gn:4")
        >>> type(model[1]).__name__, model[1].num_groups, len(report.changed)
        ('GroupNorm', 4, 1)
    """
    factory = get_norm_layer(spec)
    predicate = _source_predicate(source)
    report = SurgeryReport("swap_norm")
    all_names = names_by_module(model)
    plans: list[_Plan] = []
    done: set[int] = set()
    for name, module in model.named_modules():
        if not predicate(module) or id(module) in done:
            continue
        done.add(id(module))
        if any(name.startswith(p.names[0] + ".") or not p.names[0] for p in plans):
            report.skip(name, "inside a module that is already being replaced")
            continue
        if not name_selected(name, include, exclude):
            report.skip(name, "not selected by include/exclude")
            continue
        try:
            new, notes = _build(factory, module)
        except _CannotSwap as e:
            if strict:
                raise ValueError(
                    f"swap_norm: cannot replace {name or '(root)'} ({type(module).__name__}) with {factory.name!r}: "
                    f"{e}. Pass exclude=[{name!r}] to leave it, or strict=False to skip such modules"
                ) from None
            report.skip(name, str(e))
            continue
        plans.append(_Plan(all_names[id(module)], module, new, notes))

    for plan in plans:
        old, new = plan.old, plan.new
        channels = num_channels(old)
        if copy_affine:
            plan.notes.append(_copy_affine(old, new, channels))
        if is_batch_norm(old) and is_batch_norm(new):
            plan.notes.append(_copy_batch_norm_state(old, new, factory, channels))
        if len(plan.names) > 1:
            plan.notes.append("also registered as " + ", ".join(plan.names[1:]))
        new.train(old.training)
        model = replace_module(model, plan.names, new)
        report.change(plan.names[0], old, new, "; ".join(n for n in plan.notes if n))
    return model, report
