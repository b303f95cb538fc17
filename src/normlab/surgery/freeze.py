"""Freeze batch norms for fine-tuning so that they stay frozen through ``model.train()``, and unfreeze them again.

Setting ``bn.eval()`` and ``requires_grad_(False)`` freezes a batch norm only until the next ``model.train()``,
which puts it back into training mode (PyTorch issue #86590). :func:`freeze_bn` instead replaces each batch norm by
a :class:`~normlab.layers.frozen_batch_norm.FrozenBatchNorm2d` (or ``1d``/``3d``), whose statistics and affine are
buffers and whose train and eval modes compute the same function; :func:`unfreeze_bn` restores the original modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import layers
from ..layers.batch_norm import _BatchNorm
from ._match import is_batch_norm, is_frozen_batch_norm, name_selected
from ._report import SurgeryReport
from .swap import _RANK_SUFFIX, input_ranks, module_device_dtype, names_by_module, num_channels, replace_module

__all__ = ["freeze_bn", "unfreeze_bn"]

_FROZEN_STATE = ("weight", "bias", "running_mean", "running_var")
# The attribute of a frozen module that remembers the batch norm it replaced.
_RECIPE_ATTR = "_normlab_unfrozen"


@dataclass
class _Recipe:
    """What :func:`unfreeze_bn` needs to rebuild the batch norm :func:`freeze_bn` replaced: its class, the
    constructor arguments it was built with (read back from its attributes), and its other buffers
    (num_batches_tracked, ...) as copies. Statistics and affine come from the frozen module itself."""

    cls: type
    kwargs: dict
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)


def _constructor_kwargs(module: nn.Module) -> dict:
    """The keyword arguments of ``type(module).__init__`` that the module keeps as attributes of the same name
    (eps, momentum, affine, track_running_stats, virtual_batch_size, r_max, ...), with their current values; a
    flag named like a parameter (torch's ``bias=False``) is whether that parameter exists."""
    skip = {"self", "num_features", "device", "dtype"}
    kwargs = {}
    for name, p in inspect.signature(type(module).__init__).parameters.items():
        if name in skip or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        if name in module._parameters:
            if getattr(module, "weight", None) is not None:  # with affine=False the flag means nothing
                kwargs[name] = module._parameters[name] is not None
        elif hasattr(module, name) and not isinstance(getattr(module, name), (torch.Tensor, nn.Module)):
            kwargs[name] = getattr(module, name)
    return kwargs


def _frozen_class(bn: nn.Module) -> type | None:
    """normlab's FrozenBatchNorm of ``bn``'s rank (1d for 2D/3D input, 2d for 4D); 2d when the rank is not known
    (SyncBatchNorm); None when normlab has none of that rank."""
    ranks = input_ranks(bn)
    suffix = "2d" if ranks is None else _RANK_SUFFIX.get(ranks)
    return getattr(layers, f"FrozenBatchNorm{suffix}", None) if suffix else None


def _why_not_freezable(bn: nn.Module) -> str | None:
    if is_frozen_batch_norm(bn):
        return "already frozen"
    if not isinstance(bn, (nn.modules.batchnorm._BatchNorm, _BatchNorm)):
        return f"{type(bn).__name__} is not a batch norm normlab can freeze"
    if bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: no running statistics to freeze (it uses batch statistics even in eval)"
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return "lazy module not initialized yet: run one forward first"
    if _frozen_class(bn) is None:
        return (
            f"{type(bn).__name__} takes {input_ranks(bn)[0]}D input and normlab has no FrozenBatchNorm of that rank "
            "(FrozenBatchNorm1d/2d/3d only)"
        )
    return None


def freeze_bn(model: nn.Module, *, include=None, exclude=None) -> tuple[nn.Module, SurgeryReport]:
    """Freeze the batch norms of ``model``: running statistics and affine fixed, in train() and eval() alike.

    Each selected batch norm (torch.nn.BatchNorm1d/2d, SyncBatchNorm, normlab BatchNorm1d/2d, GhostBatchNorm2d,
    BatchRenorm2d) is replaced by a normlab FrozenBatchNorm1d/2d/3d holding its running statistics and its gamma/beta
    (1 and 0 without affine) as buffers: the output equals the batch norm's in eval mode, nothing is learned or
    updated, and a later ``model.train()`` changes nothing (unlike ``bn.eval()``, which ``model.train()`` undoes,
    PyTorch issue #86590). Each frozen module remembers the original's class, constructor arguments (eps,
    momentum, affine, track_running_stats, ...) and step counter, so :func:`unfreeze_bn` can restore it. The
    frozen modules load batch norm state_dicts (num_batches_tracked is ignored).

    Skipped, with the reason in the report: frozen batch norms (already frozen), batch norms without running
    statistics (track_running_stats=False: there is nothing to freeze) and uninitialized lazy ones. SyncBatchNorm,
    whose input rank is not fixed, becomes FrozenBatchNorm2d.

    Args:
        model: the model (its root may itself be a batch norm: then the returned model is the frozen module).
        include, exclude: fnmatch patterns on qualified module names ("layer1.*", "*.bn2"); exclude wins.

    Returns:
        (model, report): the same model object with the batch norms replaced in place, and the report.

    Note:
        Device, dtype (of the statistics) and each module's training flag are kept. Build the optimizer after
        freezing: an optimizer built before still holds the old (now unused) parameters. Hooks registered on the
        old batch norms are not carried over.

    Example:
        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> model, report = normlab.surgery.freeze_bn(model)
        >>> _ = model.train()
        >>> type(model[1]).__name__, model[1].running_mean.requires_grad, len(list(model[1].parameters()))
        ('FrozenBatchNorm2d', False, 0)
    """
    report = SurgeryReport("freeze_bn")
    all_names = names_by_module(model)
    seen: set[int] = set()
    replacements = []
    for name, bn in model.named_modules():
        if not is_batch_norm(bn) or id(bn) in seen:
            continue
        seen.add(id(bn))
        reason = _why_not_freezable(bn) if name_selected(name, include, exclude) else "not selected by include/exclude"
        if reason:
            report.skip(name, reason)
            continue
        replacements.append((name, bn))
    for name, bn in replacements:
        frozen = _frozen_class(bn).from_batch_norm(bn)
        buffers = {
            k: v.detach().clone()
            for k, v in bn.named_buffers(recurse=False)
            if k not in _FROZEN_STATE and v is not None
        }
        setattr(frozen, _RECIPE_ATTR, _Recipe(type(bn), _constructor_kwargs(bn), buffers))
        model = replace_module(model, all_names[id(bn)], frozen)
        note = "" if input_ranks(bn) is not None else "input rank not fixed by the class: assumed 4D"
        report.change(name, bn, frozen, note)
    return model, report


def _unfrozen(frozen: nn.Module) -> tuple[nn.Module, str]:
    """The trainable batch norm for a frozen one: the recorded original class, else normlab's BatchNorm of its rank
    (BatchNorm2d when the rank is not known)."""
    recipe = getattr(frozen, _RECIPE_ATTR, None)
    device, dtype = module_device_dtype(frozen)
    if recipe is None:
        cls = getattr(layers, f"BatchNorm{_RANK_SUFFIX.get(input_ranks(frozen), '2d')}")
        recipe = _Recipe(cls, {"eps": frozen.eps})
        note = f"not frozen by freeze_bn: became {cls.__module__}.{cls.__name__} with default momentum"
    else:
        note = ""
    bn = recipe.cls(num_channels(frozen), **recipe.kwargs, device=device, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.copy_(frozen.running_mean)
        bn.running_var.copy_(frozen.running_var)
        for k in ("weight", "bias"):
            if getattr(bn, k, None) is not None:
                getattr(bn, k).copy_(getattr(frozen, k))
        for k, v in recipe.buffers.items():
            if isinstance(getattr(bn, k, None), torch.Tensor):
                getattr(bn, k).copy_(v)
    bn.requires_grad_(True)
    return bn.train(frozen.training), note


def _why_not_unfreezable(frozen: nn.Module) -> str | None:
    if getattr(frozen, _RECIPE_ATTR, None) is not None:
        return None
    if not isinstance(getattr(frozen, "eps", None), (int, float)):
        return f"{type(frozen).__name__} has no eps attribute to rebuild a batch norm with"
    return None


def unfreeze_bn(model: nn.Module, *, include=None, exclude=None) -> tuple[nn.Module, SurgeryReport]:
    """Undo :func:`freeze_bn`: each selected frozen batch norm becomes a trainable batch norm again.

    A module frozen by :func:`freeze_bn` becomes a module of its original class (torch.nn.BatchNorm2d stays
    torch.nn.BatchNorm2d, GhostBatchNorm2d keeps its virtual batch size, ...) with its original constructor
    arguments and ``num_batches_tracked``, and the frozen statistics and affine; the affine are Parameters with
    ``requires_grad=True`` (none when the original had ``affine=False``). Any other frozen batch norm (normlab's
    built directly, torchvision's, timm's, detectron2's) becomes a normlab BatchNorm1d/2d/3d of its rank (2d if
    unknown) with its eps and statistics, default momentum and ``num_batches_tracked = 0``, as the report notes.

    Args:
        model: the model (its root may itself be a frozen batch norm).
        include, exclude: fnmatch patterns on qualified module names; exclude wins.

    Returns:
        (model, report): the same model object with the modules replaced in place, and the report.

    Note:
        Device, dtype and each module's training flag are kept (a model in train mode gets batch norms in train
        mode, which then update their running statistics again). Build the optimizer after unfreezing.

    Example:
        >>> import torch, normlab
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01))
        >>> model, _ = normlab.surgery.freeze_bn(model)
        >>> model, report = normlab.surgery.unfreeze_bn(model)
        >>> type(model[1]).__name__, model[1].momentum, model[1].weight.requires_grad
        ('BatchNorm2d', 0.01, True)
    """
    report = SurgeryReport("unfreeze_bn")
    all_names = names_by_module(model)
    seen: set[int] = set()
    replacements = []
    for name, frozen in model.named_modules():
        if not is_frozen_batch_norm(frozen) or id(frozen) in seen:
            continue
        seen.add(id(frozen))
        reason = (
            _why_not_unfreezable(frozen) if name_selected(name, include, exclude) else "not selected by include/exclude"
        )
        if reason:
            report.skip(name, reason)
            continue
        replacements.append((name, frozen))
    for name, frozen in replacements:
        bn, note = _unfrozen(frozen)
        model = replace_module(model, all_names[id(frozen)], bn)
        report.change(name, frozen, bn, note)
    return model, report
