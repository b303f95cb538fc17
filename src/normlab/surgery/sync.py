"""Convert batch norms to synchronized ones and back, keeping their state.

``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` goes one way only and yields a module that needs a GPU; PyTorch
has no way back (issue #48075), which models trained with SyncBatchNorm need for CPU inference or export.
:func:`to_sync_bn` converts to normlab's synchronized BatchNorm (any backend, gloo on CPU included) and
:func:`from_sync_bn` converts both kinds back to plain batch norms.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.batch_renorm import BatchRenorm2d
from ..layers.ghost_batch_norm import GhostBatchNorm2d
from ._match import is_batch_norm, is_frozen_batch_norm
from ._report import SurgeryReport

__all__ = ["to_sync_bn", "from_sync_bn", "infer_batch_norm_dim"]

_TORCH_BN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_TORCH_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NORMLAB_BY_DIM = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
# normlab batch norms with a ``sync`` switch; exact types, since a subclass written elsewhere may not honour it
_NORMLAB_SYNCABLE = (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm2d)
_LAYER_DIM = {
    nn.Linear: 1,
    nn.Conv1d: 1,
    nn.Conv2d: 2,
    nn.Conv3d: 3,
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
}


def _check_dim(owner: str, dim) -> int | None:
    if dim is None or (not isinstance(dim, bool) and isinstance(dim, int) and dim in (1, 2, 3)):
        return dim
    raise ValueError(f"{owner}: dim={dim!r} must be 1, 2 or 3 (BatchNorm1d/2d/3d), or None to infer it")


def _layer_dim(module: nn.Module) -> tuple[int, int] | None:
    """(dimensionality, output channels) of a Linear / Conv / ConvTranspose layer (subclasses included), else None."""
    for cls, dim in _LAYER_DIM.items():
        if isinstance(module, cls):
            return dim, module.out_features if cls is nn.Linear else module.out_channels
    return None


def infer_batch_norm_dim(model: nn.Module, name: str) -> int | None:
    """The dimensionality (1, 2 or 3) of the batch norm at qualified ``name``, inferred from the model, or None.

    The nearest Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d (or a subclass) before it in ``model.named_modules()``
    order decides, if its output channel count equals the norm's ``num_features`` (Linear and Conv1d: 1); a
    nearest such layer with another channel count, or none, gives None. This is a heuristic for layouts such as
    conv -> bn (or a previous block's conv before a pre-activation bn); pass ``dim`` explicitly when it is None.
    """
    num_features = model.get_submodule(name).num_features
    previous = None
    for other_name, module in model.named_modules():
        if other_name == name:
            break
        found = _layer_dim(module)
        if found is not None:
            previous = found
    if previous is None or previous[1] != num_features:
        return None
    return previous[0]


def _factory(old: nn.Module) -> dict:
    ref = next((t for t in (old.weight, old.running_mean) if t is not None), None)
    return {} if ref is None else {"device": ref.device, "dtype": ref.dtype}


@torch.no_grad()
def _rebuild(old: nn.Module, cls: type[nn.Module], **extra) -> nn.Module:
    """A ``cls`` with ``old``'s hyperparameters that shares its parameters and buffers (so an optimizer built
    before the conversion keeps working) and its training flag."""
    new = cls(
        old.num_features,
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        **extra,
        **_factory(old),
    )
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    if old.track_running_stats:
        new.running_mean, new.running_var = old.running_mean, old.running_var
        new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    if hasattr(old, "qconfig"):
        new.qconfig = old.qconfig
    return new


def _replace_all(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Replace every occurrence (shared modules included) of each module whose id is a key; returns the root."""
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
    return replacements.get(id(model), model)


def _resolve_dim(owner: str, model: nn.Module, names: list[str], dim: int | None) -> dict[str, int]:
    """The dimensionality of each torch.nn.SyncBatchNorm in ``names``; raise listing those that cannot be inferred."""
    dims = {name: dim if dim is not None else infer_batch_norm_dim(model, name) for name in names}
    unknown = [name or "(root)" for name, d in dims.items() if d is None]
    if unknown:
        raise ValueError(
            f"{owner}: cannot infer whether the torch.nn.SyncBatchNorm module(s) {unknown} are 1d, 2d or 3d (no "
            "preceding Linear/Conv layer with a matching channel count); pass dim=1, 2 or 3"
        )
    return dims


def _skip_reason(module: nn.Module) -> str:
    if is_frozen_batch_norm(module):
        return "frozen batch norm: constant statistics, nothing to synchronize"
    if isinstance(module, GhostBatchNorm2d):
        return "GhostBatchNorm2d normalizes slices of each rank's local batch on purpose; it has no sync"
    return f"{type(module).__name__} is not a plain batch norm (a subclass may change its forward); not converted"


def to_sync_bn(model: nn.Module, process_group=None, *, dim: int | None = None) -> tuple[nn.Module, SurgeryReport]:
    """Make every batch norm of ``model`` a normlab batch norm synchronized over ``process_group``.

    * torch.nn.BatchNorm1d/2d/3d -> normlab BatchNorm1d/2d/3d(sync=True);
    * torch.nn.SyncBatchNorm -> normlab BatchNorm{dim}d(sync=True); torch's SyncBatchNorm does not record its
      dimensionality: ``dim`` gives it, or it is inferred per module (see :func:`infer_batch_norm_dim`);
    * normlab BatchNorm1d/2d/3d and BatchRenorm2d: ``sync`` switched on in place (already synchronized over the
      requested group: skipped).

    Unlike torch.nn.SyncBatchNorm, the result works on every torch.distributed backend (gloo on CPU included) and
    weights each rank by its batch size; without an initialized process group it computes locally. A converted
    module shares the original's parameters and buffers (an optimizer built before keeps working) and keeps eps,
    momentum, affine, track_running_stats, device, dtype and training flag; it gets normlab's ``nan_guard=True``
    (non-finite batches do not update the running statistics). Its state_dict is torch.nn.BatchNorm*d's. Exactly
    these classes are converted; subclasses, frozen and ghost batch norms are skipped with the reason.

    Args:
        model: the model; changed in place (the root itself is replaced if it is a batch norm: use the returned one).
        process_group: a torch.distributed group; None means the world group, except that a SyncBatchNorm, or a
            normlab batch norm, that already has a group keeps it.
        dim: 1, 2 or 3 for every torch.nn.SyncBatchNorm; None infers it per module.

    Returns:
        (model, report): the converted model and the report of every conversion and skip.

    Raises:
        ValueError: if ``dim`` is invalid or the dimensionality of a torch.nn.SyncBatchNorm cannot be inferred
            (nothing is changed then), or a module's hyperparameters are invalid for normlab (e.g. eps=0).

    Note:
        Training-mode statistics are synchronized; eval mode uses the running statistics and involves no
        communication, as with torch.nn.SyncBatchNorm.

    Example:
        >>> import torch
        >>> from normlab.surgery.sync import to_sync_bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        >>> model, report = to_sync_bn(model)
        >>> type(model[1]).__name__, model[1].sync, len(report.changed)
        ('BatchNorm2d', True, 1)
    """
    owner = "to_sync_bn"
    dim = _check_dim(owner, dim)
    report = SurgeryReport(owner)
    candidates = [(name, m) for name, m in model.named_modules() if is_batch_norm(m)]
    sync_names = [name for name, m in candidates if type(m) is nn.SyncBatchNorm]
    dims = _resolve_dim(owner, model, sync_names, dim)
    replacements: dict[int, nn.Module] = {}
    for name, module in candidates:
        kind = type(module)
        if kind in _TORCH_BN or kind is nn.SyncBatchNorm:
            group = process_group if process_group is not None else getattr(module, "process_group", None)
            target = _NORMLAB_BY_DIM[_TORCH_BN[kind] if kind in _TORCH_BN else dims[name]]
            try:
                new = _rebuild(module, target, sync=True, process_group=group)
            except ValueError as e:
                raise ValueError(f"{owner}: cannot convert {name or '(root)'!r}: {e}") from e
            replacements[id(module)] = new
            report.change(name, module, new)
        elif kind in _NORMLAB_SYNCABLE:
            group = process_group if process_group is not None else module.process_group
            if module.sync and module.process_group is group:
                report.skip(name, "already synchronized over that process group")
                continue
            before = repr(module)
            module.sync, module.process_group = True, group
            report.change(name, before, module, "sync switched on in place")
        else:
            report.skip(name, _skip_reason(module))
    return _replace_all(model, replacements), report


def from_sync_bn(model: nn.Module, *, dim: int | None = None) -> tuple[nn.Module, SurgeryReport]:
    """Make every synchronized batch norm of ``model`` a plain one (the inverse PyTorch lacks, issue #48075).

    * torch.nn.SyncBatchNorm -> torch.nn.BatchNorm{dim}d. SyncBatchNorm does not record its dimensionality (it
      takes any input of 2 or more dims): ``dim`` gives it for all of them, or it is inferred per module from the
      nearest preceding Linear/Conv layer with a matching channel count (see :func:`infer_batch_norm_dim`); if
      that fails for any module, ValueError and nothing is changed.
    * normlab BatchNorm1d/2d/3d and BatchRenorm2d with ``sync=True``: ``sync`` switched off in place (they know
      their dimensionality; ``dim`` does not apply to them).

    A new module shares the original's parameters and buffers and keeps eps, momentum, affine,
    track_running_stats, device, dtype and training flag; every result's state_dict loads into
    torch.nn.BatchNorm*d. Subclasses of SyncBatchNorm are skipped with the reason.

    Args:
        model: the model; changed in place (the root itself is replaced if it is a SyncBatchNorm: use the returned
            one).
        dim: 1, 2 or 3 for every torch.nn.SyncBatchNorm; None infers it per module.

    Returns:
        (model, report): the converted model and the report of every conversion and skip.

    Raises:
        ValueError: if ``dim`` is invalid or a SyncBatchNorm's dimensionality cannot be inferred.

    Note:
        Only training mode changes (local instead of synchronized batch statistics); eval outputs are identical.

    Example:
        >>> import torch
        >>> from normlab.surgery.sync import from_sync_bn
        >>> model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 1), torch.nn.SyncBatchNorm(4))
        >>> model, report = from_sync_bn(model)
        >>> type(model[1]).__name__
        'BatchNorm1d'
    """
    owner = "from_sync_bn"
    dim = _check_dim(owner, dim)
    report = SurgeryReport(owner)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.SyncBatchNorm) or (is_batch_norm(m, frozen=False) and getattr(m, "sync", False))
    ]
    sync_names = [name for name, m in candidates if type(m) is nn.SyncBatchNorm]
    dims = _resolve_dim(owner, model, sync_names, dim)
    replacements: dict[int, nn.Module] = {}
    for name, module in candidates:
        if type(module) is nn.SyncBatchNorm:
            new = _rebuild(module, _TORCH_BY_DIM[dims[name]])
            replacements[id(module)] = new
            report.change(name, module, new)
        elif type(module) in _NORMLAB_SYNCABLE:
            before = repr(module)
            module.sync, module.process_group = False, None
            report.change(name, before, module, "sync switched off in place")
        else:
            report.skip(name, _skip_reason(module))
    return _replace_all(model, replacements), report
