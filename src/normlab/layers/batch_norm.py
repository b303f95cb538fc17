"""BatchNorm1d/2d/3d: torch.nn.BatchNorm*d semantics, plus CPU-capable sync and a guard for non-finite batches."""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from .. import kernels
from ..functional._checks import check_batch_has_values
from ._base import RunningStatsNormBase

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

# On accelerators, reading the guard's counter synchronizes with the device: look only every this many steps.
_GUARD_CHECK_EVERY = 64


class _BatchNorm(RunningStatsNormBase):
    """Shared body of the batch norms. Subclasses (Ghost BN, Batch Renorm) override :meth:`_normalize`."""

    _staged: tuple[torch.Tensor, torch.Tensor] | None = None
    _staged_key: tuple | None = None
    _fused_guard_op: str | None = None
    """Set by the classes whose :meth:`_normalize` runs this op through ``kernels.call`` and passes on extra keyword
    arguments. Where the op's implementation fuses the NaN guard (``kernels.fuses_nan_guard``: the Triton batch
    norm), forward hands it the counters (``nan_guard=``) instead of cloning the buffers and committing the update
    itself, which costs about ten small launches per layer and step on a GPU."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        nan_guard: bool = True,
        sync: bool = False,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )
        self.nan_guard = bool(nan_guard)
        self.sync = bool(sync) or process_group is not None
        self.process_group = process_group
        # Not persistent, so state_dicts stay exactly torch.nn.BatchNorm's in both directions.
        self.register_buffer(
            "num_nonfinite_batches", torch.tensor(0, dtype=torch.long, device=device), persistent=False
        )
        self._warned_nonfinite = False
        self._guard_calls = [0]  # a list: a plain int would go through nn.Module.__setattr__ at every step

    def _sync_group(self):
        """The process group to synchronize statistics over now, or None (not syncing, or a single rank)."""
        if not (self.sync and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _normalize(self, x, running_mean, running_var, use_batch_stats: bool, momentum: float, group, **kwargs):
        """Normalize ``x``; in training, update the given running buffers in place. ``kwargs``: ``nan_guard=``, only
        where ``_fused_guard_op`` is set."""
        return kernels.call(
            "batch_norm",
            x,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            process_group=group,
            **kwargs,
        )

    def _kernel_commits_guard(self, x: torch.Tensor, group) -> bool:
        """True when the implementation that :meth:`_normalize` runs commits the guarded update itself."""
        op = self._fused_guard_op
        return op is not None and group is None and kernels.fuses_nan_guard(op, x)

    def _stages_batch_stats(self, group) -> bool:
        """True where a guarded training step whose implementation does not fuse the guard runs the batch norm on a
        batch-statistics buffer and commits with ``kernels.commit_batch_stats``: the classes whose
        :meth:`_normalize` is a plain batch norm (``_fused_guard_op``; Ghost BN and Batch Renorm update
        differently), unsynchronized, where the commit runs in one launch (CUDA buffers, normlab's kernels, not
        compiling)."""
        return (
            self._fused_guard_op is not None
            and group is None
            and kernels.commits_in_one_launch(self.running_mean, self.running_var)
        )

    def _batch_stats_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (C,) zero tensors (batch mean, batch variance) in the running statistics' dtype and device, kept between
        steps (the commit zeroes them after use); two allocations rather than views of one, so that each starts
        aligned and a step creates no view. A plain attribute, not buffers: state_dict, DDP's broadcast and .to() do
        not see them; they are made anew when the running statistics move or change dtype."""
        key = (self.running_mean.data_ptr(), self.running_mean.dtype)
        if self._staged is None or self._staged_key != key:
            like = self.running_mean
            self._staged = (torch.zeros_like(like), torch.zeros_like(like))
            self._staged_key = key
        return self._staged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        group = self._sync_group()
        use_batch_stats = self._uses_batch_stats()
        if use_batch_stats and group is None:
            check_batch_has_values(type(self).__name__, x)
        update = self._updates_running_stats()
        running_mean, running_var = self.running_mean, self.running_var
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        guarded = update and self.nan_guard
        if guarded and self._kernel_commits_guard(x, group):
            # the kernel commits the update only if it is finite and counts the batch, without launches of its own
            counters = (self.num_batches_tracked, self.num_nonfinite_batches)
            y = self._normalize(
                x, running_mean, running_var, use_batch_stats, self._momentum_factor(), group, nan_guard=counters
            )
            self._check_nonfinite(x)
            return y
        if guarded and self._stages_batch_stats(group):
            # torch's batch norm writes this batch's mean and unbiased variance (momentum 1) to a zeroed buffer kept
            # between steps; one launch folds them into the running statistics if finite, counts the batch and
            # zeroes the buffer again: no copies of the buffers, no host synchronization (even for momentum=None)
            batch_mean, batch_var = self._batch_stats_buffers()
            y = self._normalize(x, batch_mean, batch_var, use_batch_stats, 1.0, group)
            counters = (self.num_batches_tracked, self.num_nonfinite_batches)
            kernels.commit_batch_stats(batch_mean, batch_var, running_mean, running_var, *counters, self.momentum)
            self._check_nonfinite(x)
            return y
        momentum = self._momentum_factor() if update else 0.0
        if guarded:
            # the batch updates copies; the buffers take the result only if it is finite. (Updating the buffers
            # in place and undoing it would break autograd: torch's batch_norm saves them for its backward.)
            running_mean, running_var = running_mean.clone(), running_var.clone()
        y = self._normalize(x, running_mean, running_var, use_batch_stats, momentum, group)
        if guarded:
            self._commit_if_finite(running_mean, running_var, x)
        elif update:
            self.num_batches_tracked.add_(1)
        return y

    def _commit_if_finite(self, new_mean: torch.Tensor, new_var: torch.Tensor, x: torch.Tensor) -> None:
        """Copy the updated running statistics into the buffers if they are finite; else count the batch.

        NaN or Inf in a batch make its variance NaN (an overflowing variance is Inf), and so the updated running
        variance: testing the sum of ``new_var`` covers every channel with one tiny reduction.
        """
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # reading the sum costs ~1 us on the CPU (an accelerator would have to synchronize)
            if math.isfinite(float(new_var.sum())):
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
                self.num_batches_tracked.add_(1)
            else:
                self.num_nonfinite_batches.add_(1)
                self._warn_nonfinite_once()
            return
        counters = (self.num_batches_tracked, self.num_nonfinite_batches)
        # one Triton launch (CUDA, normlab's kernels loaded) for what the torch ops below take about ten for
        if not kernels.commit_if_finite(new_mean, new_var, self.running_mean, self.running_var, *counters):
            with torch.no_grad():
                ok = torch.isfinite(new_var.sum())
                self.running_mean.copy_(torch.where(ok, new_mean, self.running_mean))
                self.running_var.copy_(torch.where(ok, new_var, self.running_var))
                self.num_batches_tracked.add_(ok.long())
                self.num_nonfinite_batches.add_((~ok).long())
        self._check_nonfinite(x)

    def _check_nonfinite(self, x: torch.Tensor) -> None:
        """Warn once if a batch was counted as non-finite: on the CPU right away, on accelerators (where reading the
        counter synchronizes with the device) every ``_GUARD_CHECK_EVERY`` steps, never while compiling or capturing a
        CUDA graph."""
        if torch.compiler.is_compiling() or self._warned_nonfinite:
            return
        calls = self._guard_calls
        calls[0] += 1
        if x.device.type != "cpu" and calls[0] % _GUARD_CHECK_EVERY != 1:
            return
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # reading the counter would synchronize, which a CUDA graph capture forbids
        if int(self.num_nonfinite_batches) > 0:
            self._warn_nonfinite_once()

    def _warn_nonfinite_once(self) -> None:
        if self._warned_nonfinite:
            return
        self._warned_nonfinite = True
        warnings.warn(
            f"{type(self).__name__}({self.num_features}): a training batch had non-finite statistics (NaN/Inf); the "
            "running statistics were left unchanged (such batches are counted in num_nonfinite_batches). This "
            "warning is shown once.",
            RuntimeWarning,
            stacklevel=4,
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.sync:
            extra += ", sync=True"
        if not self.nan_guard:
            extra += ", nan_guard=False"
        return extra


_DOC = r"""Batch normalization over a {rank} input, a drop-in replacement for torch.nn.{name}.

    .. math:: y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    Statistics are per channel over (N, *). Paper: Ioffe & Szegedy, 2015, "Batch Normalization", arXiv 1502.03167.
    Outputs, gradients, running statistics and state_dict keys are those of torch.nn.{name}; in addition:

    * ``sync=True`` / ``process_group=``: batch statistics are all-reduced over a torch.distributed group in
      training, on any backend (gloo on CPU as well as NCCL), weighting each rank by its element count, so ranks
      may hold different batch sizes. Without an initialized process group (or with one rank) it runs locally.
    * ``nan_guard=True``: a training batch whose statistics are not finite leaves the running statistics (and
      ``num_batches_tracked``) unchanged; it is counted in the non-persistent buffer ``num_nonfinite_batches`` and a
      RuntimeWarning is issued once (on accelerators the counter is read every {every} steps to avoid syncs).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Must be > 0.
        momentum: PyTorch convention, ``running = (1 - momentum) * running + momentum * batch``; None is the
            cumulative average. Keras/Flax momentum 0.9 equals PyTorch momentum 0.1.
        affine: learn a per-channel scale (weight) and shift (bias).
        track_running_stats: keep running statistics for eval; if False, eval uses batch statistics.
        nan_guard: skip running-statistics updates for non-finite batches.
        sync: synchronize statistics over ``process_group`` (default: the world group).
        process_group: a torch.distributed group; implies ``sync=True``.
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: {shape}.

    Raises:
        ValueError: on an input of the wrong rank or channel count, on one value per channel in training, or on an
            invalid argument (num_features <= 0, eps <= 0, momentum outside [0, 1]).

    Note:
        Training uses (and records) the batch's statistics; eval uses the running statistics. That difference is
        BatchNorm's weak point at small or size-1 batches: see GroupNorm, LayerNorm or FrozenBatchNorm instead.

    Example:
        >>> import torch, normlab
        >>> bn = normlab.{name}(3)
        >>> y = bn(torch.randn({example}))
        >>> tuple(y.shape), int(bn.num_batches_tracked)
        (({example_shape}), 1)
    """


class BatchNorm1d(_BatchNorm):
    _input_dims = (2, 3)
    _fused_guard_op = "batch_norm"


class BatchNorm2d(_BatchNorm):
    _input_dims = (4,)
    _fused_guard_op = "batch_norm"


class BatchNorm3d(_BatchNorm):
    _input_dims = (5,)
    _fused_guard_op = "batch_norm"


BatchNorm1d.__doc__ = _DOC.format(
    rank="2D or 3D",
    name="BatchNorm1d",
    every=_GUARD_CHECK_EVERY,
    shape="(N, C) or (N, C, L)",
    example="8, 3",
    example_shape="8, 3",
)
BatchNorm2d.__doc__ = _DOC.format(
    rank="4D",
    name="BatchNorm2d",
    every=_GUARD_CHECK_EVERY,
    shape="(N, C, H, W)",
    example="8, 3, 5, 5",
    example_shape="8, 3, 5, 5",
)
BatchNorm3d.__doc__ = _DOC.format(
    rank="5D",
    name="BatchNorm3d",
    every=_GUARD_CHECK_EVERY,
    shape="(N, C, D, H, W)",
    example="4, 3, 2, 5, 5",
    example_shape="4, 3, 2, 5, 5",
)
