"""PreciseBN: replace the moving-average running statistics of a model's norms with population statistics.

BatchNorm's running statistics are an exponential moving average over the last few hundred training batches, taken
while the weights were still changing; Wu & Johnson (2021, "Rethinking 'Batch' in BatchNorm", arXiv 2105.07576)
show that recomputing them once with the final weights ("PreciseBN") makes evaluation more accurate and stable.
:func:`merge_batch_stats` is the arithmetic, :func:`recalibrate_bn` applies it to a model.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..functional._checks import check_positive_int
from ..functional._stats import var_mean
from ..functional.batch_norm import batch_stats
from ..layers.batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.batch_renorm import BatchRenorm2d
from ..layers.evonorm import EvoNorm2dB0
from ..layers.ghost_batch_norm import GhostBatchNorm2d
from ..layers.group_norm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from ._match import is_frozen_batch_norm, name_selected
from ._report import SurgeryReport
from .accumulating_bn import _sync_group

__all__ = ["merge_batch_stats", "recalibrate_bn"]

_OWNER = "recalibrate_bn"
# Exact types: a subclass written elsewhere may keep running statistics of something other than its input.
_NORMLAB_BATCH = (BatchNorm1d, BatchNorm2d, BatchNorm3d, GhostBatchNorm2d, BatchRenorm2d, EvoNorm2dB0)
_NORMLAB_INSTANCE = (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
# Where the model input is found in a dict batch, in this order.
_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values")


def _as_stacked(values, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64)
    values = list(values)
    if not values:
        raise ValueError(f"merge_batch_stats: {name} is empty; expected the statistics of at least one batch")
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])


def merge_batch_stats(
    counts: torch.Tensor | Sequence,
    means: torch.Tensor | Sequence[torch.Tensor],
    vars: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Mean and (biased) variance of the union of K batches, from each batch's count, mean and biased variance.

    Chan, Golub & LeVeque's pairwise update, applied as a balanced tree over the batches, in float64: with
    :math:`M_2 = n \sigma^2` (the sum of squared deviations),

    .. math::
        n = n_a + n_b, \quad \delta = \mu_b - \mu_a, \quad \mu = \mu_a + \delta \frac{n_b}{n}, \quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n}

    and the result is :math:`(\mu, M_2 / n, n)`: the exact mean and population variance of all values together
    (NOT the mean of the batch variances, which misses the spread of the batch means), whatever the batch sizes.
    Batches of count 0 are ignored (their mean and variance may be NaN). BatchNorm stores the unbiased
    :math:`M_2 / (n - 1)` as its running variance.

    Args:
        counts: (K,) numbers of values per batch (per channel), >= 0, not all 0.
        means: (K, *) per-batch means, a tensor or a sequence of K tensors of one shape (e.g. (C,)).
        vars: (K, *) per-batch biased variances, like ``means``.

    Returns:
        (mean, var, count): mean and biased variance of shape ``*`` and the total count (0-dim), all float64.

    Raises:
        ValueError: if the inputs are empty, their leading sizes differ, a count is negative or all are 0.

    Example:
        >>> import torch
        >>> from normlab.surgery.recalibrate import merge_batch_stats
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> parts = x.split([1, 4, 5])
        >>> mean, var, count = merge_batch_stats(
        ...     [len(p) for p in parts], [p.mean(0) for p in parts], [p.var(0, correction=0) for p in parts])
        >>> bool(torch.allclose(var, x.var(0, correction=0))), int(count)
        (True, 10)
    """
    n, mean, var = _as_stacked(counts, "counts"), _as_stacked(means, "means"), _as_stacked(vars, "vars")
    if n.dim() != 1 or n.shape[0] == 0 or mean.shape != var.shape or mean.shape[:1] != n.shape:
        raise ValueError(
            f"merge_batch_stats: expected counts (K,) and means, vars (K, ...) of one shape with K >= 1, got counts "
            f"{tuple(n.shape)}, means {tuple(mean.shape)}, vars {tuple(var.shape)}"
        )
    n = n.to(mean.device)
    if bool((n < 0).any()) or not bool((n > 0).any()):
        raise ValueError(f"merge_batch_stats: counts={n.tolist()} must be >= 0 and not all 0")
    n = n.reshape((-1,) + (1,) * (mean.dim() - 1))
    present = n > 0
    mean = torch.where(present, mean, 0.0)
    m2 = torch.where(present, var * n, 0.0)
    while n.shape[0] > 1:
        half = n.shape[0] // 2
        a, b = slice(0, 2 * half, 2), slice(1, 2 * half, 2)
        total = n[a] + n[b]
        safe = total.clamp_min(1.0)  # total == 0 only when both sides are empty: then nothing moves
        delta = mean[b] - mean[a]
        merged_mean = mean[a] + delta * (n[b] / safe)
        merged_m2 = m2[a] + m2[b] + delta.square() * (n[a] * n[b] / safe)
        rest = slice(2 * half, None)  # the odd one out goes up a level unchanged
        n = torch.cat([total, n[rest]])
        mean = torch.cat([merged_mean, mean[rest]])
        m2 = torch.cat([merged_m2, m2[rest]])
    count = n.reshape(-1)[0]
    return mean[0], m2[0] / count, count


def _kind(module: nn.Module) -> tuple[str | None, str]:
    """("batch" | "instance", "") for a module to recalibrate; (None, reason) for a candidate to skip; (None, "")
    for a module that is not a candidate (no running statistics of any kind)."""
    batch = isinstance(module, nn.modules.batchnorm._BatchNorm) or type(module) in _NORMLAB_BATCH
    instance = isinstance(module, nn.modules.instancenorm._InstanceNorm) or type(module) in _NORMLAB_INSTANCE
    if batch or instance:
        if getattr(module, "running_mean", None) is None or not getattr(module, "track_running_stats", True):
            return (None, "track_running_stats=False: no running statistics") if batch else (None, "")
        if is_lazy(module.running_mean):
            return None, "uninitialized lazy module: run one forward first"
        return ("batch" if batch else "instance"), ""
    if is_frozen_batch_norm(module):
        return None, "frozen batch norm: its statistics are constants by design (unfreeze it to recalibrate)"
    own = dict(module.named_buffers(recurse=False))
    if any(k.startswith("running_") and v is not None for k, v in own.items()):
        return None, (
            f"{type(module).__name__} keeps running statistics that recalibrate_bn does not know how to recompute "
            "(they are not the batch statistics of its input); left unchanged"
        )
    return None, ""


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in itertools.chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class _Collector:
    """Forward hook of one module: records the statistics of its input, then puts its buffers back as they were,
    so every forward of the run sees the module's original state (Batch Renorm's r and d read it)."""

    def __init__(self, name: str, module: nn.Module, kind: str) -> None:
        self.name, self.module, self.kind = name, module, kind
        self.calls = 0
        self.counts: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []
        self.vars: list[torch.Tensor] = []
        self._buffers = {k: (b, b.detach().clone()) for k, b in module._buffers.items() if b is not None}

    def __call__(self, module: nn.Module, args, kwargs, output) -> None:
        x = _first_tensor(args, kwargs)
        if x is not None:
            self._record(x.detach())
        for key, (buf, value) in self._buffers.items():
            module._buffers[key] = buf
            buf.copy_(value)

    def _record(self, x: torch.Tensor) -> None:
        if self.kind == "batch":
            mean, var, count = batch_stats(x, process_group=_sync_group(self.module))
        else:
            if x.dim() == getattr(self.module, "_get_no_batch_dim", lambda: -1)():
                x = x.unsqueeze(0)  # torch's InstanceNorm takes unbatched input
            # the average over instances of each instance's mean and unbiased (L/(L-1)) variance: what eval uses
            var, mean = var_mean(x, range(2, x.dim()), correction=1)
            mean, var = mean.flatten(1).double().sum(0), var.flatten(1).double().sum(0)
            count = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        self.calls += 1
        self.counts.append(count)
        self.means.append(mean)
        self.vars.append(var)

    def population(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(running_mean, running_var, count) to store, float64."""
        if self.kind == "instance":
            count = torch.stack(self.counts).sum()
            return torch.stack(self.means).sum(0) / count, torch.stack(self.vars).sum(0) / count, float(count)
        mean, var, count = merge_batch_stats(self.counts, self.means, self.vars)
        n = float(count)
        return mean, var * (n / max(n - 1.0, 1.0)), n


def _model_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise ValueError(
            f"recalibrate_bn: a dict batch needs its model input under one of the keys {list(_INPUT_KEYS)}, got keys "
            f"{list(batch)}; pass forward_fn=lambda model, batch: model(...) for other layouts"
        )
    raise ValueError(
        f"recalibrate_bn: cannot take the model input from a batch of type {type(batch).__name__}; expected a "
        "tensor, a non-empty (input, target, ...) tuple/list or a dict, or pass forward_fn"
    )


def _to_device(batch, device):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, list):
        return [_to_device(b, device) for b in batch]
    if isinstance(batch, tuple):
        return tuple(_to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if not is_lazy(t):
            return t.device
    return None


def _describe_change(module: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> str:
    old_mean, old_var = module.running_mean.double(), module.running_var.double()
    shift = float((mean - old_mean).abs().max())
    ratio = var / old_var.clamp_min(torch.finfo(torch.float64).tiny)
    low, high = float(ratio.min()), float(ratio.max())
    return f"max |change of running_mean| {shift:.3g}; running_var x [{low:.3g}, {high:.3g}]"


@torch.no_grad()
def _write(collector: _Collector, report: SurgeryReport) -> None:
    module = collector.module
    mean, var, count = collector.population()
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
        report.skip(collector.name, "its inputs had non-finite values (NaN/Inf); running statistics left unchanged")
        return
    note = _describe_change(module, mean, var)
    module.running_mean.copy_(mean.to(module.running_mean.dtype))
    module.running_var.copy_(var.to(module.running_var.dtype))
    if getattr(module, "num_batches_tracked", None) is not None:
        module.num_batches_tracked.add_(1)
    what = "per-instance statistics averaged over" if collector.kind == "instance" else "population statistics of"
    unit = "instances" if collector.kind == "instance" else "values per channel"
    report.change(
        collector.name,
        f"{type(module).__name__}({module.num_features}) moving-average running statistics",
        f"{what} {count:.0f} {unit} in {collector.calls} call(s)",
        note,
    )


def recalibrate_bn(
    model: nn.Module,
    data: Iterable,
    num_batches: int = 200,
    *,
    device: torch.device | str | None = None,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> tuple[nn.Module, SurgeryReport]:
    r"""PreciseBN: set the running statistics of every norm to the population statistics of ``num_batches`` batches.

    Wu & Johnson, 2021, "Rethinking 'Batch' in BatchNorm", arXiv 2105.07576. The model runs forward (under
    ``torch.no_grad()``) on up to ``num_batches`` batches of ``data`` with every recalibrated norm in training mode,
    so each one normalizes with batch statistics and sees the activations it sees in training; every other module
    keeps its mode (call ``model.eval()`` first to switch dropout off, ``model.train()`` to keep it on: the paper
    uses the training-time activations). Each norm's inputs over all batches (and all calls, if a module is called
    several times per forward) then give its new buffers, computed in float64:

    * batch norms (torch.nn.BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses; normlab BatchNorm1d/2d/3d,
      GhostBatchNorm2d, BatchRenorm2d, EvoNorm2dB0): per channel, over every value seen,
      ``running_mean = mean`` and ``running_var = M2 / (n - 1)``, the exact population variance with BatchNorm's
      unbiased correction for the total count n (see :func:`merge_batch_stats`); NOT the mean of the batch
      variances. Batch sizes may vary (1 included). Synchronized batch norms merge over their process group, as
      their forward does (every rank must then run the same number of batches). EvoNorm2dB0 reads only
      ``running_var``; its ``running_mean`` is kept consistent as its training update does.
    * instance norms with ``track_running_stats=True`` (torch and normlab InstanceNorm1d/2d/3d): eval normalizes
      every instance with one (C,) statistic, which training estimates by the batch average of the per-instance
      statistics. Here: ``running_mean`` = the average over all N instances seen of each instance's spatial mean,
      ``running_var`` = the average of each instance's unbiased spatial variance (correction L / (L - 1), L the
      spatial size), every instance weighted equally whatever the batch sizes.

    ``num_batches_tracked`` gets +1 (one recalibration, one update; Batch Renorm's warm-up moves by one step).
    ``momentum`` is never touched, and during the run every forward of a recalibrated norm sees its original
    buffers (they are put back after each call, so Batch Renorm's r and d read the original running statistics).
    Afterwards every module's training flag and every buffer of every other module are as before, all hooks are
    removed, and parameters are untouched; when the forward raises, all of that is restored and nothing is written.

    Skipped, with the reason in the report: batch norms without running statistics, frozen batch norms, modules not
    selected by ``include`` / ``exclude``, norms that received no input, norms whose inputs were non-finite, and any
    other module with ``running_*`` buffers (OnlineNorm, MovingAverageBatchNorm2d, RecurrentBatchNorm1d, ...),
    whose statistics are not the batch statistics of their input. A model without norms gets an empty report.

    Args:
        model: the model; modified in place and returned. Use ``copy.deepcopy(model)`` to keep the original.
        data: an iterable of batches (a DataLoader, a list...), not a tensor. A batch is the model input itself
            (a tensor), an ``(input, target, ...)`` tuple or list (input = its first element), or a dict (input =
            the value of the first of the keys ``"input", "inputs", "x", "image", "images", "pixel_values"``).
            The model is called as ``model(input)``.
        num_batches: batches to use (> 0). Fewer in ``data``: a warning, and those are used.
        device: where the batches are moved; default: the device of the model's first parameter or buffer.
        forward_fn: ``forward_fn(model, batch)`` replaces ``model(input)`` for custom models (the batch is moved
            to ``device`` first, tensors in tuples, lists and dicts included).
        include, exclude: fnmatch patterns on qualified module names restricting which norms are recalibrated.

    Returns:
        (model, report): the model and a :class:`~normlab.surgery._report.SurgeryReport` listing every norm
        recalibrated (with how far its statistics moved) and every candidate skipped.

    Raises:
        ValueError: if ``num_batches`` is not a positive int, ``data`` is a tensor, or a batch's input cannot be
            found. Errors of the forward propagate (e.g. a batch norm given one value per channel in training)
            after the model has been restored.

    Note:
        Recalibration is for evaluation: it replaces the statistics eval mode normalizes with. Training-mode
        outputs do not depend on them (except Batch Renorm's).

    Example:
        >>> import torch
        >>> from normlab.surgery.recalibrate import recalibrate_bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
        >>> data = [(torch.randn(n, 3, 6, 6), None) for n in (1, 5, 2)]
        >>> model, report = recalibrate_bn(model, data, num_batches=3)
        >>> [c.name for c in report.changed], int(model[1].num_batches_tracked), model.training
        (['1'], 1, True)
    """
    num_batches = check_positive_int(_OWNER, "num_batches", num_batches)
    if isinstance(data, torch.Tensor):
        raise ValueError(
            f"recalibrate_bn: data must be an iterable of batches, got a tensor of shape {tuple(data.shape)}; pass "
            "[x] for one batch or x.split(batch_size) for several"
        )
    report = SurgeryReport(_OWNER)
    collectors: list[_Collector] = []
    for name, module in model.named_modules():
        kind, reason = _kind(module)
        if kind is None:
            if reason:
                report.skip(name, reason)
        elif not name_selected(name, include, exclude):
            report.skip(name, "not selected by include/exclude")
        else:
            collectors.append(_Collector(name, module, kind))
    if not collectors:
        report.notes.append("no normalization layer with running statistics to recalibrate; nothing was run")
        return model, report

    device = torch.device(device) if device is not None else _model_device(model)
    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, k, b, b.detach().clone()) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    handles = []
    used = 0
    try:
        for c in collectors:
            c.module.training = True
            handles.append(c.module.register_forward_hook(c, with_kwargs=True))
        with torch.no_grad():
            for batch in itertools.islice(data, num_batches):
                if forward_fn is not None:
                    forward_fn(model, _to_device(batch, device))
                else:
                    model(_to_device(_model_input(batch), device))
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for m, key, buf, value in saved:
                m._buffers[key] = buf
                buf.copy_(value)
        for m, training in flags:
            m.training = training

    if used < num_batches:
        warnings.warn(
            f"recalibrate_bn: data gave {used} batches, fewer than num_batches={num_batches}; the statistics use "
            f"those {used}",
            UserWarning,
            stacklevel=2,
        )
    for c in collectors:
        if c.calls == 0:
            report.skip(c.name, f"received no input in {used} batch(es); running statistics left unchanged")
        else:
            _write(c, report)
    report.notes.append(
        f"{used} batch(es); recalibrated norms ran in training mode (batch statistics), other modules in their mode"
    )
    return model, report
