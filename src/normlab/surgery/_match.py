"""Finding the modules a surgery tool works on: batch norms of every origin, and name filters."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator

from torch import nn

from ..layers.batch_norm import _BatchNorm
from ..layers.frozen_batch_norm import _FrozenBatchNorm

__all__ = ["is_batch_norm", "is_frozen_batch_norm", "name_selected", "iter_selected", "set_submodule"]


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """normlab's FrozenBatchNorm*d, or a torchvision/timm/detectron2-style one (recognized by class name and its
    weight/bias/running_mean/running_var buffers, so those packages need not be importable)."""
    if isinstance(module, _FrozenBatchNorm):
        return True
    buffers = {"weight", "bias", "running_mean", "running_var"}
    return "FrozenBatchNorm" in type(module).__name__ and buffers <= set(dict(module.named_buffers(recurse=False)))


def is_batch_norm(module: nn.Module, *, frozen: bool = True) -> bool:
    """torch.nn BatchNorm*d / SyncBatchNorm / LazyBatchNorm*d, normlab's batch norms (incl. Ghost, Renorm), and,
    with ``frozen=True``, frozen batch norms of any origin."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm)):
        return True
    return frozen and is_frozen_batch_norm(module)


def name_selected(name: str, include: Iterable[str] | str | None, exclude: Iterable[str] | str | None) -> bool:
    """fnmatch-style patterns on qualified module names ("layer1.*", "*.bn2"); exclude wins over include."""
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def iter_selected(model: nn.Module, predicate, include=None, exclude=None) -> Iterator[tuple[str, nn.Module, bool]]:
    """(name, module, selected) for every module satisfying ``predicate``; ``selected`` applies the name filters."""
    for name, module in model.named_modules():
        if predicate(module):
            yield name, module, name_selected(name, include, exclude)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted ``name`` (the root itself when ``name`` is ''); returns the (new) root."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model
