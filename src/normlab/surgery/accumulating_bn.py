"""Gradient accumulation with BatchNorm running statistics that span the whole accumulated batch.

Under gradient accumulation, each micro-batch forward updates BatchNorm's running statistics on its own, so the
statistics describe batches of the micro-batch size (PyTorch issue #46516). :func:`accumulating_bn` makes them
describe the accumulated batch instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..functional._checks import check_positive_int
from ..functional.batch_norm import batch_stats
from ..layers.batch_norm import _BatchNorm
from ..layers.ghost_batch_norm import GhostBatchNorm2d

__all__ = ["accumulating_bn", "AccumulatingBN"]

_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class _Pending:
    """Chan et al.'s parallel mean/variance state: count, mean and sum of squared deviations (float64)."""

    count: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    micro_batches: int = 0

    def add(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        mean, m2 = mean.double(), var.double() * count
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
            self.count = total
        self.micro_batches += 1


@dataclass
class AccumulatingBN:
    """The handle :func:`accumulating_bn` yields: what it tracks, and a manual :meth:`flush`.

    Attributes:
        steps: micro-batches per accumulated batch.
        tracked: names of the modules whose running statistics are accumulated.
        skipped: {name: reason} for batch-norm-like modules left as they are.
        updates: running-statistics updates made so far (one per module per accumulated batch).
        nonfinite: accumulated batches whose statistics were NaN/Inf and were therefore not applied.
    """

    steps: int
    tracked: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    updates: int = 0
    nonfinite: int = 0
    _modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _pending: dict[str, _Pending] = field(default_factory=dict, repr=False)
    _originals: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _handles: list = field(default_factory=list, repr=False)

    def flush(self) -> None:
        """Apply the pending micro-batches of every module now (also when fewer than ``steps`` were seen)."""
        for name in self.tracked:
            self._apply(name)

    def _before_forward(self, name: str, module: nn.Module, args) -> None:
        if not module.training:
            return
        x = args[0]
        with torch.no_grad():
            mean, var, count = batch_stats(x.detach(), process_group=_sync_group(module))
        self._pending[name].add(mean, var, float(count))
        # The module updates throw-away copies during this forward; the accumulated update replaces it. (Swapping
        # the buffers, rather than undoing an update, leaves the real ones untouched even by a NaN batch, and keeps
        # autograd happy: torch's batch_norm saves the buffers it was given for its backward.)
        self._originals[name] = {k: module._buffers[k] for k in _STAT_BUFFERS}
        for k in _STAT_BUFFERS:
            module._buffers[k] = module._buffers[k].clone()

    def _after_forward(self, name: str, module: nn.Module, args, output) -> None:
        originals = self._originals.pop(name, None)
        if originals is None:
            return
        module._buffers.update(originals)
        if self._pending[name].micro_batches >= self.steps:
            self._apply(name)

    @torch.no_grad()
    def _apply(self, name: str) -> None:
        pending = self._pending[name]
        if pending.mean is None:
            return
        self._pending[name] = _Pending()
        module = self._modules[name]
        mean = pending.mean
        unbiased = pending.m2 / max(pending.count - 1.0, 1.0)
        if not (torch.isfinite(mean).all() and torch.isfinite(unbiased).all()):
            self.nonfinite += 1
            return
        momentum = module.momentum
        factor = 1.0 / (float(module.num_batches_tracked) + 1.0) if momentum is None else momentum
        module.running_mean.lerp_(mean.to(module.running_mean.dtype), factor)
        module.running_var.lerp_(unbiased.to(module.running_var.dtype), factor)
        module.num_batches_tracked.add_(1)
        self.updates += 1

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, originals in self._originals.items():
            self._modules[name]._buffers.update(originals)
        self._originals.clear()


def _sync_group(module: nn.Module):
    """The process group a synchronized batch norm reduces over now, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(module, nn.SyncBatchNorm):
        group = module.process_group or dist.group.WORLD
    elif isinstance(module, _BatchNorm) and module.sync:
        group = module.process_group if module.process_group is not None else dist.group.WORLD
    else:
        return None
    return group if dist.get_world_size(group) > 1 else None


def _classify(module: nn.Module) -> str | None:
    """None if the module's running statistics can be accumulated, else why not ('' for non-batch-norms)."""
    if isinstance(module, GhostBatchNorm2d):
        return "GhostBatchNorm2d normalizes ghost batches on purpose; its statistics are left per call"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, _BatchNorm)):
        if not module.track_running_stats or module.running_mean is None:
            return "track_running_stats=False: no running statistics"
        return None
    return ""


@contextlib.contextmanager
def accumulating_bn(model: nn.Module, steps: int) -> Iterator[AccumulatingBN]:
    """Make BatchNorm running statistics span the ``steps`` micro-batches of each gradient-accumulation step.

    Inside the ``with`` block, every training-mode forward of a batch norm (torch.nn.BatchNorm1d/2d/3d,
    SyncBatchNorm, normlab BatchNorm1d/2d/3d and BatchRenorm2d) records its micro-batch's per-channel count, mean
    and variance instead of updating the running statistics; after ``steps`` such calls the module gets ONE update
    with the mean and unbiased variance of all of them together (Chan et al.'s pairwise merge, in float64), its
    ``momentum`` (or cumulative average), and ``num_batches_tracked + 1``. The running statistics after 8
    micro-batches of 4 are therefore those of one batch of 32. Synchronized batch norms merge over their process
    group, as their forward does. On exit, a partial group is applied and every hook is removed.

    What is and is not equivalent to the large batch:

    * equivalent: ``running_mean``, ``running_var`` and ``num_batches_tracked``, hence eval-mode outputs;
    * NOT equivalent: the normalization inside each micro-batch forward (and so the training loss and gradients)
      still uses that micro-batch's statistics, which cannot depend on micro-batches not yet seen. For that, use
      a batch-independent norm (GroupNorm, LayerNorm) or synchronized BatchNorm over more devices.
    * consequently, in a network with several batch norms, each one's running statistics are exactly those of
      the concatenation of the inputs it received; a batch norm after another one receives inputs normalized with
      micro-batch statistics, so its statistics differ (slightly) from a large-batch run's. The first batch norm
      of a network, and every one in eval-equivalence tests such as recalibration, matches exactly.

    * BatchRenorm2d's r and d read the running statistics, which now stay fixed through the accumulated batch
      (as they would for one large batch) instead of moving after every micro-batch.

    Cost: one extra read of each batch norm's input per training forward (the micro-batch statistics). Eager mode
    only (hooks with Python state); modules in eval mode are untouched.

    Args:
        model: the model (or a single module).
        steps: micro-batches per optimizer step (> 0).

    Yields:
        AccumulatingBN: names of the tracked and skipped modules, the number of updates, and ``flush()``.

    Raises:
        ValueError: if ``steps`` is not a positive integer.

    Example:
        >>> import torch, normlab
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> x = torch.randn(32, 3)
        >>> with normlab.accumulating_bn(bn, steps=8) as acc:
        ...     for chunk in x.split(4):
        ...         _ = bn(chunk)
        >>> acc.updates, int(bn.num_batches_tracked)
        (1, 1)
        >>> ref = torch.nn.BatchNorm1d(3)
        >>> _ = ref(x)
        >>> torch.allclose(bn.running_var, ref.running_var, atol=1e-6)
        True
    """
    handle = AccumulatingBN(steps=check_positive_int("accumulating_bn", "steps", steps))
    for name, module in model.named_modules():
        reason = _classify(module)
        if reason:
            handle.skipped[name] = reason
        if reason is not None:
            continue
        handle.tracked.append(name)
        handle._modules[name] = module
        handle._pending[name] = _Pending()
        handle._handles.append(
            module.register_forward_pre_hook(lambda m, a, name=name: handle._before_forward(name, m, a))
        )
        handle._handles.append(
            module.register_forward_hook(lambda m, a, o, name=name: handle._after_forward(name, m, a, o))
        )
    try:
        yield handle
    finally:
        handle._restore()
        handle.flush()
