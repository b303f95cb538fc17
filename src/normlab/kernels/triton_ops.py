"""normlab's Triton kernels under the names of the functional references: what ``backend="triton"`` runs.

Each function has the signature of its namesake in :mod:`normlab.functional` (plus keyword ``act`` where the kernel
fuses an activation) and lives in its family's module:

===================================================  ============================================================
:mod:`normlab.kernels.group_norm`                    group_norm, instance_norm, layer_norm, rms_norm, evonorm_s0
                                                     (per-sample statistics over channel groups and positions)
:mod:`normlab.kernels.channel_norm`                  layer_norm2d, rms_norm2d (per position, over channels)
:mod:`normlab.kernels.batch_norm`                    batch_norm (training: split reduction + fused running-stat
                                                     update; eval), frozen_batch_norm
:mod:`normlab.kernels.frn`                           filter_response_norm (+ TLU)
===================================================  ============================================================

Importing this module imports Triton; :mod:`normlab.kernels` does so only where Triton is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .batch_norm import batch_norm, frozen_batch_norm
from .channel_norm import layer_norm2d, rms_norm2d
from .frn import filter_response_norm
from .group_norm import evonorm_s0, group_norm, instance_norm, layer_norm, rms_norm

__all__ = [
    "OPS",
    "FUSES_ACT",
    "FUSES_NAN_GUARD",
    "SLOWER_THAN_TORCH",
    "SLOWER_THAN_TORCH_EAGER",
    "EAGER_GPU_SAVING_MS",
    "prefers_torch",
    "batch_norm",
    "frozen_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
    "evonorm_s0",
    "layer_norm2d",
    "rms_norm2d",
    "filter_response_norm",
]

OPS = tuple(name for name in __all__ if name.islower() and name != "prefers_torch")
"""The functional ops that have a Triton kernel."""

FUSES_ACT = frozenset(op for op in OPS if op not in ("evonorm_s0", "filter_response_norm"))
"""The ops whose kernel takes ``act="relu"/"silu"`` and applies it in its last pass (see normlab.kernels.call);
EvoNorm-S0 and FRN+TLU carry their own nonlinearity."""

FUSES_NAN_GUARD = frozenset({"batch_norm"})
"""The ops whose kernel takes ``nan_guard=(num_batches_tracked, num_nonfinite_batches)`` and commits a training
update of the running statistics only if it is finite, counting the batch, within its own launches (see
normlab.kernels.fuses_nan_guard)."""

_TINY = 1 << 20
"""Inputs with fewer elements than this run torch's op under ``auto`` (ops that torch has): their GPU time is a few
microseconds, so the call's host cost decides, and normlab's Python launch path costs 2-4x torch's per call
(measured on an H100 machine at (2, 64, 8, 8): GroupNorm forward+backward 454 vs 235 us of host time, run 5)."""


def _tiny(x: torch.Tensor) -> bool:
    return x.numel() < _TINY


def _big(x: torch.Tensor) -> bool:
    return x.numel() >= (1 << 22)


def _channels_last_2d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


SLOWER_THAN_TORCH: dict[str, Callable[[torch.Tensor], bool]] = {  # GPU time
    # transformer rows (N, C) run the channel-norm kernels: 1.22x / 1.14x torch's fused LayerNorm / RMSNorm in
    # bf16 at (16384, 1024), 1.59x / 1.40x in fp32; channels-last GroupNorm over 2 channels per group (GroupNorm(32)
    # of 64 channels) with rows of contiguous channels: 4.2x bf16, 2.5x fp32 at (32, 64, 112, 112)
    "layer_norm": _tiny,
    "rms_norm": _tiny,
    "group_norm": _tiny,
    # float32 BatchNorm below 4M elements: 0.67x torch's speed at (2, 256, 56, 56) NCHW (1.03x channels-last);
    # at (32, 64, 112, 112) channels-last 0.98x and at (32, 256, 56, 56) 1.05x, so larger inputs keep the kernel
    "batch_norm": lambda x: _tiny(x) or (x.dtype == torch.float32 and not _big(x)),
    # InstanceNorm: channels-last half precision at batch 2, (2, 256, 56, 56) bf16: 0.89x; NCHW float32 over 64
    # channels, (32, 64, 112, 112): 0.92x (1.17x at 256 channels)
    "instance_norm": lambda x: (
        _tiny(x)
        or (_channels_last_2d(x) and x.shape[0] <= 2 and x.dtype in (torch.bfloat16, torch.float16))
        or (x.dim() == 4 and x.is_contiguous() and x.dtype == torch.float32 and x.shape[1] <= 64)
    ),
    "layer_norm2d": _tiny,
    "rms_norm2d": _tiny,
}
"""op -> predicate on the input: where it is true, ``auto`` dispatch runs torch's op (normlab's native backend)
instead of the kernel, because the kernel measured slower there: ``normlab bench kernels`` on an H100 (forward +
backward, CUDA-graph replays, so that the kernels' GPU time is compared and not the host's; run 4 in
benchmarks/results, the README's GPU table), and tiny inputs (:data:`_TINY`). ``backend="triton"`` always runs the
kernel. FRN and EvoNorm-S0 have no torch counterpart: their kernels always run."""


def _nchw_2d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous()


def _eager_group_stats(x: torch.Tensor) -> bool:
    return not (_big(x) and _channels_last_2d(x))


def _eager_channel_stats(x: torch.Tensor) -> bool:
    return not (_big(x) and (_nchw_2d(x) or x.shape[1] <= 64))


def _eager_rows_or_group_stats(x: torch.Tensor) -> bool:
    return x.dim() == 2 or _eager_group_stats(x)


EAGER_GPU_SAVING_MS = 0.3
"""The GPU time (ms per forward+backward) a kernel must save over torch's op for ``auto`` to use it in eager calls:
about the host time normlab's Python path costs beyond torch's C++ one on the measured H100 machine (run 4, at a
tiny shape: GroupNorm 0.36 ms, InstanceNorm 0.46, LayerNorm2d 0.24, BatchNorm 0.61; see the README's GPU section).
:data:`SLOWER_THAN_TORCH_EAGER` is written from the measured GPU times with this threshold."""

SLOWER_THAN_TORCH_EAGER: dict[str, Callable[[torch.Tensor], bool]] = {
    # BatchNorm saves enough only in NCHW at 112 x 112 (torch's NCHW kernel is slow there: 0.96 ms saved in bf16,
    # 0.55 in fp32 at (32, 64, 112, 112)); 0.24 ms at most elsewhere
    "batch_norm": lambda x: not (_big(x) and _nchw_2d(x) and x.shape[2] * x.shape[3] >= 4096),
    # GroupNorm / InstanceNorm save 0.38-0.54 ms channels-last (torch's channels-last kernels are 2-4x slower), at
    # most 0.14 ms in NCHW
    "group_norm": _eager_group_stats,
    "instance_norm": _eager_group_stats,
    # LayerNorm / RMSNorm over (C, *): the GroupNorm kernels; transformer rows save at most 0.08 ms
    "layer_norm": _eager_rows_or_group_stats,
    "rms_norm": _eager_rows_or_group_stats,
    # LayerNorm2d / RMSNorm2d save 0.42-1.2 ms in NCHW (torch permutes) and channels-last over 64 channels, at most
    # 0.18 ms channels-last over 256
    "layer_norm2d": _eager_channel_stats,
    "rms_norm2d": _eager_channel_stats,
}
"""op -> predicate, applied besides :data:`SLOWER_THAN_TORCH`: where it is true, ``auto`` runs torch's op in eager
calls, because the kernel saves less GPU time there than normlab's extra host time costs
(:data:`EAGER_GPU_SAVING_MS`). The rule is written from GPU times, not from the wall times of single eager calls:
on the measured machine those swing far more than the difference between the ops (torch's own calls took up to 10x
longer in run 4 than the same calls in run 3, while their GPU times agreed within 4%). In a ResNet-50 training step
(batch 64, bf16, channels_last) GroupNorm's kernels took 42.2 ms against torch GroupNorm's 56.5 ms. Neither table
applies under torch.compile, where ``auto`` hands Inductor torch's ops (see :mod:`normlab.kernels`). In a CUDA graph
only the GPU time counts: use ``backend="auto-gpu"`` (this table off) or ``"triton"`` for the warm-up and the
capture alike (a Triton kernel must be compiled and loaded before a capture, so ``auto`` does not switch
implementations when a capture starts)."""


def prefers_torch(op: str, x: torch.Tensor, *, wall_time: bool = True) -> bool:
    """True where the kernel of ``op`` was measured slower than torch for inputs like ``x`` in GPU time
    (:data:`SLOWER_THAN_TORCH`) or, with ``wall_time`` (eager calls, whose wall time includes the host's), saves too
    little GPU time to pay for its extra host time (:data:`SLOWER_THAN_TORCH_EAGER`); the ``auto`` backend applies
    both, ``auto-gpu`` the first only."""
    rules = (SLOWER_THAN_TORCH.get(op), SLOWER_THAN_TORCH_EAGER.get(op) if wall_time else None)
    return any(rule(x) for rule in rules if rule is not None)
