"""The hazards the doctor looks for: one small class each, turning the measurements into evidence and ranked fixes.

Every hazard reads the same :class:`Observations` (what :func:`~normlab.doctor.diagnose` measured) and returns
:class:`~normlab.doctor.report.Finding` objects. Thresholds are class attributes, documented on each class; subclass
to change them. Fixes are ranked best first and name the exact call to apply where normlab has one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..surgery.momentum import momentum_from_keras
from .report import Finding

__all__ = [
    "LayerObservation",
    "Observations",
    "Hazard",
    "DegenerateRunningStats",
    "BatchSizeOne",
    "SmallStatisticsBatch",
    "TrainEvalGap",
    "ForeignMomentum",
    "SharedNormCall",
    "VaryingBatchSize",
    "HAZARDS",
    "batch_independent_spec",
]

_RECALIBRATE = "normlab.recalibrate_bn(model, data)"
_DROP_LAST = "torch.utils.data.DataLoader(dataset, batch_size=..., shuffle=True, drop_last=True)"


@dataclass
class LayerObservation:
    """What the doctor measured at one batch norm.

    Attributes:
        name, kind, num_features, eps, momentum: the module's qualified name, class name and settings.
        trained: put in training mode for the training-mode passes (False for frozen batch norms, and for batch
            norms the user left in eval mode inside a model in training mode).
        running_mean, running_var: copies of its running (EMA) statistics, None if it keeps none.
        batches_tracked: its ``num_batches_tracked`` (None if it has none): 0 means never updated.
        precise_mean, precise_var: recalibrated statistics over the same data, None if unavailable.
        sync_ranks: ranks its training statistics are all-reduced over (1 unless synchronized under DDP).
        ghost_batch: samples per ghost batch for ghost batch norms (their statistics come from these), else None.
        input_dims: rank of its inputs (None if it was never called).
        samples, values: per training-mode call, the samples and values per channel (samples x spatial positions)
            behind one batch statistic: the local batch, or the ghost batch.
        calls: per forward pass, how often it was called.
        train_eval_sq, ema_precise_sq, ref_sq, precise_ref_sq: sums of squared differences between normalizations
            of its training-mode inputs (batch vs running statistics, running vs precise statistics) and of the
            squared references, over all calls.
    """

    name: str
    kind: str
    num_features: int
    eps: float
    momentum: float | None
    trained: bool
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    batches_tracked: int | None = None
    precise_mean: torch.Tensor | None = None
    precise_var: torch.Tensor | None = None
    sync_ranks: int = 1
    ghost_batch: int | None = None
    input_dims: int | None = None
    samples: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    train_eval_sq: float = 0.0
    ref_sq: float = 0.0
    ema_precise_sq: float = 0.0
    precise_ref_sq: float = 0.0

    @property
    def label(self) -> str:
        """The name shown in reports ("(root)" for the model itself)."""
        return self.name or "(root)"

    @property
    def values_per_channel(self) -> int | None:
        """Median values per channel over the training-mode calls, times the ranks synchronized over."""
        return int(statistics.median(self.values)) * self.sync_ranks if self.values else None

    @property
    def train_eval_gap(self) -> float | None:
        return math.sqrt(self.train_eval_sq / self.ref_sq) if self.ref_sq > 0 else None

    @property
    def ema_precise_gap(self) -> float | None:
        return math.sqrt(self.ema_precise_sq / self.precise_ref_sq) if self.precise_ref_sq > 0 else None

    @property
    def has_finite_running_stats(self) -> bool:
        return (
            self.running_mean is not None
            and bool(torch.isfinite(self.running_mean).all())
            and bool(torch.isfinite(self.running_var).all())
        )


@dataclass
class Observations:
    """Everything the hazards read.

    Attributes:
        layers: one observation per batch norm, in model order.
        batch_sizes: the size of each batch used.
        output_rel_diff: train-vs-eval relative difference of the model outputs (None if not measured).
        training_failures: messages of training-mode forward passes that raised (e.g. one value per channel).
        world_size: torch.distributed world size (1 when not distributed): counts are per rank.
        swap_spec: the factory spec of a batch-independent norm that fits every batch norm (see
            :func:`batch_independent_spec`).
    """

    layers: list[LayerObservation]
    batch_sizes: list[int]
    output_rel_diff: float | None = None
    training_failures: list[str] = field(default_factory=list)
    world_size: int = 1
    swap_spec: str = "gn32"


def batch_independent_spec(layers: list[LayerObservation]) -> str:
    """The spec to pass to ``normlab.swap_norm``: "ln" when every batch norm sees (N, C) or (N, C, L) inputs
    (judged by the class name, ``...1d``, when no input was seen), else GroupNorm with the largest group count
    <= 32 that divides every batch norm's channels ("gn32", "gn:8", ...)."""
    if layers and all(
        layer.input_dims in (2, 3) or (layer.input_dims is None and layer.kind.endswith("1d")) for layer in layers
    ):
        return "ln"
    common = math.gcd(*(layer.num_features for layer in layers)) if layers else 32
    groups = max(g for g in range(1, 33) if common % g == 0)
    return "gn32" if groups == 32 else f"gn:{groups}"


def _swap(obs: Observations) -> str:
    return f'normlab.swap_norm(model, "{obs.swap_spec}")'


class Hazard:
    """Base class: ``id`` names the hazard in reports, ``rank`` orders findings of equal severity (lower first)."""

    id: ClassVar[str]
    rank: ClassVar[int]

    def check(self, obs: Observations) -> list[Finding]:
        raise NotImplementedError

    def finding(self, layer: str, severity: str, evidence: dict, fixes: list[str], message: str) -> Finding:
        return Finding(self.id, layer, severity, evidence, tuple(fixes), message)


class DegenerateRunningStats(Hazard):
    """Running statistics with NaN/Inf or negative variances (severe), or variances below ``eps`` (warning).

    Non-finite statistics make every eval output of the layer NaN; a variance below ``eps`` means eval divides by
    about ``sqrt(eps)`` (a dead, constant channel also shows this: harmless only if it stays constant).
    """

    id = "degenerate_running_stats"
    rank = 0

    def check(self, obs: Observations) -> list[Finding]:
        found = []
        for layer in obs.layers:
            if layer.running_var is None:
                continue
            mean, var = layer.running_mean.double(), layer.running_var.double()
            nonfinite = int((~(torch.isfinite(mean) & torch.isfinite(var))).sum())
            negative = int((var < 0).sum())
            tiny = int(((var >= 0) & (var < layer.eps)).sum())
            if not (nonfinite or negative or tiny):
                continue
            evidence = {
                "nonfinite_channels": nonfinite,
                "negative_var_channels": negative,
                "near_zero_var_channels": tiny,
                "channels": layer.num_features,
                "eps": layer.eps,
            }
            if nonfinite or negative:
                severity = "severe"
                message = (
                    f"{layer.label}: running statistics hold NaN/Inf or negative variances in "
                    f"{nonfinite + negative} channel(s): its eval outputs are NaN or garbage."
                )
            else:
                severity = "warning"
                message = (
                    f"{layer.label}: running variance below eps={layer.eps:g} in {tiny} channel(s): eval divides "
                    "by about sqrt(eps) there (harmless only for a dead channel that stays constant)."
                )
            found.append(self.finding(layer.label, severity, evidence, [_RECALIBRATE], message))
        return found


class BatchSizeOne(Hazard):
    """A batch of one sample in the data (severe): batch norm then normalizes each sample with its own statistics
    (or, without spatial positions, cannot train at all: one value per channel)."""

    id = "batch_size_one"
    rank = 1

    def check(self, obs: Observations) -> list[Finding]:
        ones = sum(1 for n in obs.batch_sizes if n == 1)
        if not ones:
            return []
        evidence = {"batches_of_size_one": ones, "batches": len(obs.batch_sizes)}
        if obs.training_failures:
            evidence["training_forward_failures"] = len(obs.training_failures)
            evidence["first_failure"] = obs.training_failures[0]
        if ones == len(obs.batch_sizes):
            fixes = ["normlab.freeze_bn(model)", _swap(obs)]
            why = "every batch has one sample: use pretrained frozen statistics or a batch-independent norm"
        else:
            fixes = [_DROP_LAST, "normlab.freeze_bn(model)", _swap(obs)]
            why = "drop incomplete batches"
        message = f"{ones} of {len(obs.batch_sizes)} batch(es) hold a single sample; {why}."
        return [self.finding("(data)", "severe", evidence, fixes, message)]


class SmallStatisticsBatch(Hazard):
    """Few values per channel behind each training-mode batch statistic: batch x spatial positions (the local
    batch on each rank under DDP, times the ranks for synchronized batch norms).

    Thresholds: fewer than ``warn_below`` = 32 values warns, fewer than ``severe_below`` = 8 is severe. The batch
    mean's error is about std / sqrt(values) (more for correlated spatial positions), so train-mode outputs are
    noisy and differ from eval-mode ones.
    """

    id = "small_batch_stats"
    rank = 2
    warn_below: ClassVar[int] = 32
    severe_below: ClassVar[int] = 8

    def check(self, obs: Observations) -> list[Finding]:
        found = []
        for layer in obs.layers:
            values = layer.values_per_channel
            if not layer.trained or values is None or values >= self.warn_below:
                continue
            samples = int(statistics.median(layer.samples))
            evidence = {
                "values_per_channel": values,
                "samples_per_batch": samples,
                "spatial_positions": int(statistics.median(layer.values)) // max(samples, 1),
                "synchronized_ranks": layer.sync_ranks,
                "warn_below": self.warn_below,
                "severe_below": self.severe_below,
            }
            scope = ""
            if obs.world_size > 1:
                evidence["per_rank"] = True
                scope = f" (per rank: the local batch of one of {obs.world_size} ranks)"
            steps = math.ceil(self.warn_below / max(values, 1))
            fixes = [
                _swap(obs),
                "normlab.freeze_bn(model)  # fine-tuning from pretrained statistics",
                "normlab.to_sync_bn(model)  # under DDP: statistics over every rank's batch",
                f"with normlab.accumulating_bn(model, steps={steps}): ...  # fixes the running statistics only",
            ]
            if obs.world_size > 1 and layer.sync_ranks == 1:
                fixes.insert(0, fixes.pop(2))
            severity = "severe" if values < self.severe_below else "warning"
            message = (
                f"{layer.label}: each training batch statistic comes from {values} value(s) per channel{scope}, "
                f"fewer than {self.warn_below}: noisy training normalization and a train/eval mismatch."
            )
            found.append(self.finding(layer.label, severity, evidence, fixes, message))
        return found


class TrainEvalGap(Hazard):
    """Running (EMA) statistics far from the precise statistics of the data, so eval mode normalizes differently
    from training mode.

    Evidence per layer: ``train_eval_gap``, the relative difference ||z_batch - z_running|| / ||z_batch|| of its
    training-mode inputs normalized with their batch statistics and with the running statistics; and
    ``ema_precise_gap``, ||z_running - z_precise|| / ||z_precise|| with recalibrated (precise) statistics from
    ``recalibrate_bn``; plus the model-level ``output_rel_diff``. Only the EMA-vs-precise gap is judged, since the
    train/eval gap also holds the batch statistics' sampling noise (that is :class:`SmallStatisticsBatch`'s
    business): it warns from ``warn_at`` = 0.2 and is severe from ``severe_at`` = 0.5.

    Precise statistics from n values per channel are themselves off by about ``sqrt(1.5 / n)`` in these units
    (1/n from the mean, 1/(2n) from the standard deviation), so a gap below ``noise_factor`` = 2 times that
    ``noise_floor`` is not judged: pass more batches to resolve it.
    """

    id = "train_eval_gap"
    rank = 3
    warn_at: ClassVar[float] = 0.2
    severe_at: ClassVar[float] = 0.5
    noise_factor: ClassVar[float] = 2.0

    def check(self, obs: Observations) -> list[Finding]:
        found = []
        for layer in obs.layers:
            gap = layer.ema_precise_gap
            if not layer.trained or gap is None:
                continue
            precise_values = sum(layer.values) * layer.sync_ranks
            noise_floor = math.sqrt(1.5 / precise_values)
            if gap < max(self.warn_at, self.noise_factor * noise_floor):
                continue
            evidence = {
                "ema_precise_gap": gap,
                "train_eval_gap": layer.train_eval_gap,
                "output_rel_diff": obs.output_rel_diff,
                "num_batches_tracked": layer.batches_tracked,
                "noise_floor": noise_floor,
                "warn_at": self.warn_at,
                "severe_at": self.severe_at,
            }
            severity = "severe" if gap >= self.severe_at else "warning"
            message = (
                f"{layer.label}: its running statistics normalize the data {gap:.3g} (relative) away from the "
                "precise statistics: eval-mode outputs differ from what training produced."
            )
            found.append(self.finding(layer.label, severity, evidence, [_RECALIBRATE, _swap(obs)], message))
        return found


class ForeignMomentum(Hazard):
    """A momentum above ``suspicious_above`` = 0.5 (warning): probably Keras/Flax's convention (0.9, 0.99 meaning
    "keep 90%/99% of the old average"), which in PyTorch's convention makes the running statistics about the last
    batch's."""

    id = "foreign_momentum"
    rank = 4
    suspicious_above: ClassVar[float] = 0.5

    def check(self, obs: Observations) -> list[Finding]:
        found = []
        for layer in obs.layers:
            m = layer.momentum
            if not layer.trained or m is None or m <= self.suspicious_above or layer.running_var is None:
                continue
            evidence = {"momentum": m, "pytorch_equivalent_if_keras": momentum_from_keras(m)}
            target = f'model.get_submodule("{layer.name}")' if layer.name else "model"
            fix = f"{target}.momentum = normlab.momentum_from_keras({m!r})"
            message = (
                f"{layer.label}: momentum={m:g} weights each new batch by {m:g} (PyTorch convention), so the running "
                f"statistics are about the last batch's; Keras/Flax's {m:g} is PyTorch's {momentum_from_keras(m):g}."
            )
            found.append(self.finding(layer.label, "warning", evidence, [fix], message))
        return found


class SharedNormCall(Hazard):
    """A batch norm called more than once per forward (shared weights, recurrent use) (warning): its running
    statistics mix the distributions of every call, which may differ (e.g. per time step), while each training
    call normalizes with its own."""

    id = "shared_norm_call"
    rank = 5

    def check(self, obs: Observations) -> list[Finding]:
        found = []
        for layer in obs.layers:
            calls = max(layer.calls, default=0)
            if not layer.trained or calls <= 1:
                continue
            fixes = [_swap(obs), "give each call its own batch norm (separate statistics per call or time step)"]
            message = f"{layer.label}: called {calls} times per forward; its running statistics mix all the calls."
            found.append(self.finding(layer.label, "warning", {"calls_per_forward": calls}, fixes, message))
        return found


class VaryingBatchSize(Hazard):
    """Batches of different sizes (above one sample; size one is :class:`BatchSizeOne`) (warning): smaller batches
    give noisier statistics yet move the running averages as much."""

    id = "varying_batch_size"
    rank = 6

    def check(self, obs: Observations) -> list[Finding]:
        sizes = [n for n in obs.batch_sizes if n > 1]
        if len(set(sizes)) <= 1:
            return []
        evidence = {"min_batch_size": min(sizes), "max_batch_size": max(sizes), "batch_sizes": sizes}
        message = f"batch sizes vary from {min(sizes)} to {max(sizes)}: the small batches have noisier statistics."
        return [self.finding("(data)", "warning", evidence, [_DROP_LAST], message)]


HAZARDS: tuple[Hazard, ...] = (
    DegenerateRunningStats(),
    BatchSizeOne(),
    SmallStatisticsBatch(),
    TrainEvalGap(),
    ForeignMomentum(),
    SharedNormCall(),
    VaryingBatchSize(),
)
