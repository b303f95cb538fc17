"""``diagnose(model, data)``: a few forward passes with hooks, on copies, and a report of BatchNorm hazards."""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parameter import is_lazy

from ..functional._checks import check_positive_int
from ..functional._stats import accumulation_dtype, channel_view
from ..functional.batch_norm import batch_stats
from ..layers.batch_norm import _BatchNorm
from ..surgery._match import is_batch_norm
from .hazards import HAZARDS, LayerObservation, Observations, batch_independent_spec
from .report import SEVERITIES, LayerSummary, Report

__all__ = ["diagnose", "DoctorInternalError"]

_DATA_FORMS = "an iterable of tensors or of (input, target) tuples"


class DoctorInternalError(RuntimeError):
    """The doctor changed the model it was asked to leave alone: a bug in normlab, please report it."""


def diagnose(model: nn.Module, data: Iterable | None, *, num_batches: int = 8, precise: bool = True) -> Report:
    """Look for BatchNorm hazards in ``model`` on a few batches of ``data``; report evidence and ranked fixes.

    What is checked (one class each in :mod:`normlab.doctor.hazards`, where the thresholds are documented):

    * ``degenerate_running_stats``: NaN/Inf, negative or below-eps running variances;
    * ``batch_size_one`` / ``varying_batch_size``: batches of one sample, or of different sizes, in ``data``;
    * ``small_batch_stats``: values per channel (batch x spatial positions) behind each training statistic:
      < 32 warns, < 8 is severe. Under DDP these are per rank (the local batch), times the ranks for
      synchronized batch norms;
    * ``train_eval_gap``: running (EMA) statistics far from the precise statistics of the data, computed with
      ``recalibrate_bn(copy.deepcopy(model), batches, num_batches)``; the evidence also holds each layer's
      train-vs-eval normalization gap and the model outputs' train-vs-eval relative difference;
    * ``foreign_momentum``: momentum > 0.5, probably Keras/Flax's convention;
    * ``shared_norm_call``: a batch norm called more than once per forward.

    The model is not changed: every forward pass runs on a deep copy (one in eval mode; one with the batch norms in
    training mode and every other module in eval mode, so that dropout does not blur the comparison), under
    ``torch.no_grad()``. Every parameter, buffer and training flag is compared before and after.

    Batch norms count as "training" ones unless frozen (FrozenBatchNorm of any origin) or left in eval mode inside a
    model in training mode (the usual way of freezing them); a model in eval mode is diagnosed as if about to train.

    Args:
        model: the model (a DistributedDataParallel wrapper is looked through).
        data: an iterable of tensors or of (input, target, ...) tuples; the model is called as ``model(input)``,
            with the input's tensors moved to the model's device. None: check the running statistics and momenta
            only.
        num_batches: batches to take from ``data``; fewer available warns and uses those.
        precise: compute precise statistics (needed for the ``train_eval_gap`` judgement).

    Returns:
        Report: per-layer summaries, findings ranked most urgent first, ``to_dict()``/``to_json()``, ``render()``.

    Raises:
        ValueError: on a bad ``num_batches``, ``data`` that is not of the accepted forms, or a model with
            uninitialized lazy modules.
        DoctorInternalError: if, despite the copies, the model changed (a bug: please report it).

    Example:
        >>> import torch
        >>> from normlab.doctor import diagnose
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4, momentum=0.9))
        >>> report = diagnose(model, [torch.randn(64, 4) for _ in range(8)])
        >>> [(f.hazard, f.layer) for f in report.findings]
        [('train_eval_gap', '1'), ('foreign_momentum', '1')]
        >>> report.ranked_fixes()
        ['normlab.recalibrate_bn(model, data)', 'model.get_submodule("1").momentum = normlab.momentum_from_keras(0.9)']
    """
    check_positive_int("diagnose", "num_batches", num_batches)
    notes: list[str] = []
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
        notes.append("looked through DistributedDataParallel: diagnosed its module on this rank")
    _check_initialized(model)
    before = _snapshot(model)
    report = _diagnose(model, data, num_batches, precise, notes)
    _check_unchanged(before, _snapshot(model))
    return report


def _check_initialized(model: nn.Module) -> None:
    """Uninitialized lazy modules cannot be copied, hence not diagnosed: say so before trying."""
    named = itertools.chain(model.named_parameters(), model.named_buffers())
    lazy = [name for name, t in named if is_lazy(t)]
    if lazy:
        raise ValueError(
            f"diagnose: model has uninitialized lazy parameters or buffers ({', '.join(lazy)}); "
            "run one forward pass first"
        )


def _diagnose(model: nn.Module, data, num_batches: int, precise: bool, notes: list[str]) -> Report:
    norms = [(name, m) for name, m in model.named_modules() if is_batch_norm(m, frozen=True)]
    if not norms:
        notes.append("no batch norm layers in this model: nothing to diagnose")
        return Report(model=type(model).__name__, notes=notes)
    world = _world_size()
    if world > 1:
        notes.append(
            f"torch.distributed is initialized with {world} ranks: batch sizes and values per channel are per rank "
            "(this rank's local batch); synchronized batch norms count every rank"
        )
    layers = [_observe(name, m, model.training, world) for name, m in norms]
    batches = _take_batches(data, num_batches, notes)
    inputs = [_to_device(_model_input(b), _device(model)) for b in batches]
    obs = Observations(layers=layers, batch_sizes=[_batch_size(x) for x in inputs], world_size=world)
    if inputs:
        if precise:
            _precise_stats(model, inputs, layers, notes)
        _forward_passes(model, inputs, obs)
    obs.swap_spec = batch_independent_spec([layer for layer in layers if layer.trained] or layers)
    order = {layer.label: i for i, layer in enumerate(layers)}
    ranks = {h.id: h.rank for h in HAZARDS}
    findings = sorted(
        (f for hazard in HAZARDS for f in hazard.check(obs)),
        key=lambda f: (SEVERITIES.index(f.severity), ranks[f.hazard], order.get(f.layer, -1)),
    )
    return Report(
        model=type(model).__name__,
        layers=[_summary(layer) for layer in layers],
        findings=findings,
        num_batches=len(inputs),
        batch_sizes=obs.batch_sizes,
        output_rel_diff=obs.output_rel_diff,
        notes=notes,
    )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _sync_ranks(module: nn.Module, world: int) -> int:
    """Ranks a batch norm's training statistics are all-reduced over."""
    if world == 1:
        return 1
    if isinstance(module, nn.SyncBatchNorm) or (isinstance(module, _BatchNorm) and module.sync):
        group = module.process_group
        return world if group is None else dist.get_world_size(group)
    return 1


def _observe(name: str, module: nn.Module, root_training: bool, world: int) -> LayerObservation:
    running_mean = getattr(module, "running_mean", None)
    running_var = getattr(module, "running_var", None)
    has_stats = running_mean is not None and running_var is not None
    tracked = getattr(module, "num_batches_tracked", None)
    return LayerObservation(
        name=name,
        kind=type(module).__name__,
        num_features=int(getattr(module, "num_features", 0) or (running_mean.numel() if has_stats else 0)),
        eps=float(getattr(module, "eps", 1e-5)),
        momentum=getattr(module, "momentum", None),
        trained=is_batch_norm(module, frozen=False) and (module.training or not root_training),
        running_mean=running_mean.detach().clone() if has_stats else None,
        running_var=running_var.detach().clone() if has_stats else None,
        batches_tracked=None if tracked is None else int(tracked),
        sync_ranks=_sync_ranks(module, world),
        ghost_batch=getattr(module, "virtual_batch_size", None),
    )


def _take_batches(data, num_batches: int, notes: list[str]) -> list:
    if data is None:
        notes.append("no data given: only the running statistics and momenta were checked")
        return []
    try:
        iterator = iter(data)
    except TypeError:
        raise ValueError(f"diagnose: data must be {_DATA_FORMS}, got {type(data).__name__}") from None
    batches = list(itertools.islice(iterator, num_batches))
    if len(batches) < num_batches:
        message = f"data yielded {len(batches)} batch(es), fewer than num_batches={num_batches}: using those"
        warnings.warn(f"diagnose: {message}", UserWarning, stacklevel=4)
        notes.append(message)
    return batches


def _model_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"diagnose: data must be {_DATA_FORMS}; got a batch of type {type(batch).__name__}")


def _first_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    for item in x if isinstance(x, (tuple, list)) else ():
        if isinstance(item, torch.Tensor):
            return item
    raise ValueError(f"diagnose: data must be {_DATA_FORMS}; got an input of type {type(x).__name__}")


def _batch_size(x) -> int:
    tensor = _first_tensor(x)
    if tensor.dim() == 0:
        raise ValueError(f"diagnose: data must be {_DATA_FORMS}; got a 0-dim tensor input (no batch dimension)")
    return int(tensor.shape[0])


def _device(model: nn.Module) -> torch.device | None:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return None if first is None else first.device


def _to_device(x, device):
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return type(x)(_to_device(item, device) for item in x)


def _precise_stats(model: nn.Module, inputs: list, layers: list[LayerObservation], notes: list[str]) -> None:
    """Precise statistics of the training batch norms from ``recalibrate_bn`` on an eval-mode deep copy (so that,
    as in the training-mode pass, dropout is off), stored on the observations."""
    trained = [layer.name for layer in layers if layer.trained]
    if not trained:
        return
    try:
        from ..surgery.recalibrate import recalibrate_bn
    except ImportError as err:
        notes.append(
            f"precise statistics skipped (normlab.surgery.recalibrate unavailable: {err}): "
            "train_eval_gap was not judged"
        )
        return
    try:
        calibrated, _ = recalibrate_bn(
            copy.deepcopy(model).eval(), inputs, len(inputs), forward_fn=lambda m, x: m(x), include=trained
        )
    except (ValueError, RuntimeError) as err:
        notes.append(
            f"precise statistics could not be computed ({type(err).__name__}: {err}): train_eval_gap was not judged"
        )
        return
    for layer in layers:
        module = calibrated.get_submodule(layer.name)
        mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if layer.trained and mean is not None and var is not None:
            layer.precise_mean, layer.precise_var = mean.detach().clone(), var.detach().clone()


def _standardize(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    acc = accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    return (x.to(acc) - channel_view(mean.to(acc), x.dim())) * channel_view(invstd, x.dim())


def _finite(*tensors: torch.Tensor | None) -> bool:
    return all(t is not None and bool(torch.isfinite(t).all()) for t in tensors)


def _record_training_input(layer: LayerObservation, x: torch.Tensor) -> None:
    """Values per channel, and the normalization gaps of one training-mode input of ``layer``."""
    samples = x.shape[0] if layer.ghost_batch is None else min(x.shape[0], layer.ghost_batch)
    values = samples * math.prod(x.shape[2:])
    layer.samples.append(int(samples))
    layer.values.append(int(values))
    if values < 2 or not _finite(layer.running_mean, layer.running_var):
        return
    mean, var, _ = batch_stats(x)
    z_batch = _standardize(x, mean, var, layer.eps)
    z_running = _standardize(x, layer.running_mean, layer.running_var, layer.eps)
    layer.train_eval_sq += float((z_batch - z_running).double().square().sum())
    layer.ref_sq += float(z_batch.double().square().sum())
    if _finite(layer.precise_mean, layer.precise_var):
        z_precise = _standardize(x, layer.precise_mean, layer.precise_var, layer.eps)
        layer.ema_precise_sq += float((z_running - z_precise).double().square().sum())
        layer.precise_ref_sq += float(z_precise.double().square().sum())


def _forward_passes(model: nn.Module, inputs: list, obs: Observations) -> None:
    """One eval-mode and one training-mode forward per batch, on two deep copies, recording at every batch norm."""
    eval_copy = copy.deepcopy(model).eval()
    train_copy = copy.deepcopy(model).eval()
    calls = dict.fromkeys((layer.name for layer in obs.layers), 0)
    for layer in obs.layers:
        eval_copy.get_submodule(layer.name).register_forward_pre_hook(_counting_hook(layer, calls))
        if layer.trained:
            module = train_copy.get_submodule(layer.name).train()
            module.register_forward_pre_hook(lambda m, args, layer=layer: _record_training_input(layer, args[0]))
    diff_sq = ref_sq = 0.0
    with torch.no_grad():
        for i, x in enumerate(inputs):
            calls.update(dict.fromkeys(calls, 0))
            out_eval = eval_copy(x)
            for layer in obs.layers:
                layer.calls.append(calls[layer.name])
            try:
                out_train = train_copy(x)
            except (ValueError, RuntimeError) as err:
                obs.training_failures.append(f"batch {i}: {err}")
                continue
            for a, b in zip(_tensors(out_train), _tensors(out_eval)):
                diff_sq += float((a.double() - b.double()).square().sum())
                ref_sq += float(b.double().square().sum())
    if ref_sq > 0 or math.isnan(ref_sq):
        obs.output_rel_diff = math.sqrt(diff_sq / ref_sq)


def _counting_hook(layer: LayerObservation, calls: dict[str, int]):
    def hook(module, args):
        calls[layer.name] += 1
        layer.input_dims = args[0].dim()

    return hook


def _tensors(output) -> list[torch.Tensor]:
    """The floating-point tensors in a model output (a tensor, or tuples/lists/dicts of them), in order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


def _summary(layer: LayerObservation) -> LayerSummary:
    return LayerSummary(
        name=layer.label,
        kind=layer.kind,
        num_features=layer.num_features,
        momentum=layer.momentum,
        trained=layer.trained,
        values_per_channel=layer.values_per_channel,
        calls_per_forward=max(layer.calls, default=0),
        train_eval_gap=layer.train_eval_gap,
        ema_precise_gap=layer.ema_precise_gap,
    )


@dataclass(frozen=True)
class _Snapshot:
    """Every parameter and buffer (identity and value) and every module's training flag."""

    tensors: dict[str, tuple[int, torch.Tensor]]
    flags: dict[str, bool]


def _snapshot(model: nn.Module) -> _Snapshot:
    named = itertools.chain(
        (("parameter " + n, t) for n, t in model.named_parameters(remove_duplicate=False)),
        (("buffer " + n, t) for n, t in model.named_buffers(remove_duplicate=False)),
    )
    tensors = {name: (id(t), t.detach().clone()) for name, t in named}
    flags = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    return _Snapshot(tensors, flags)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not (a.is_floating_point() or a.is_complex()):
        return torch.equal(a, b)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0))


def _check_unchanged(before: _Snapshot, after: _Snapshot) -> None:
    changed = sorted(set(before.tensors) ^ set(after.tensors))
    for name in before.tensors.keys() & after.tensors.keys():
        (id_before, value_before), (id_after, value_after) = before.tensors[name], after.tensors[name]
        if id_before != id_after or not _same(value_before, value_after):
            changed.append(name)
    changed += [f"training flag of {n or '(root)'}" for n in before.flags if before.flags[n] != after.flags.get(n)]
    if changed or before.flags.keys() != after.flags.keys():
        raise DoctorInternalError(
            f"diagnose changed the model it must leave alone ({', '.join(sorted(changed)) or 'its modules'}); "
            "this is a bug in normlab.doctor, please report it"
        )
