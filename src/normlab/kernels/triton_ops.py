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
(measured on an H100 machine at (2, 64, 8, 8): GroupNorm forward+backward 862 vs 359 us of host time)."""


def _tiny(x: torch.Tensor) -> bool:
    return x.numel() < _TINY


def _big(x: torch.Tensor) -> bool:
    return x.numel() >= (1 << 22)


def _channels_last_2d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


SLOWER_THAN_TORCH: dict[str, Callable[[torch.Tensor], bool]] = {  # GPU time
    # transformer rows (N, C): torch's fused LayerNorm / RMSNorm took 0.36-0.50x normlab's GPU time at (16384, 1024)
    # on the group-statistics kernels; rows now run the channel-norm kernels, not yet measured on a GPU
    "layer_norm": lambda x: _tiny(x) or x.dim() == 2,
    "rms_norm": lambda x: _tiny(x) or x.dim() == 2,
    # channels-last GroupNorm over few channels per group (GroupNorm(32) of 64 channels at (32, 64, 112, 112)): 0.86x
    # torch's speed in bf16, 0.94x in fp32
    "group_norm": lambda x: _tiny(x) or (_channels_last_2d(x) and x.shape[1] <= 64),
    # float32 BatchNorm at small batch, (2, 256, 56, 56): 0.68x torch's speed NCHW, 0.90x channels-last; and
    # channels-last float32 at (32, 64, 112, 112): 0.93x (1.03x at (32, 256, 56, 56))
    "batch_norm": lambda x: _tiny(x) or (x.dtype == torch.float32 and (not _big(x) or _channels_last_2d(x))),
    # InstanceNorm: channels-last half precision at batch 2, (2, 256, 56, 56) bf16: 0.87x; NCHW float32 over 64
    # channels, (32, 64, 112, 112): 0.91x (1.15x at 256 channels)
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
backward, CUDA-graph replays, so that the kernels' GPU time is compared and not the host's; see the README's GPU
table), and tiny inputs (:data:`_TINY`). ``backend="triton"`` always runs the kernel. FRN and EvoNorm-S0 have no
torch counterpart: their kernels always run."""


def _nchw_2d(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous()


def _eager_group_stats(x: torch.Tensor) -> bool:
    return not (_big(x) and x.dtype == torch.float32 and _channels_last_2d(x))


def _eager_channel_stats(x: torch.Tensor) -> bool:
    return not (_big(x) and (_nchw_2d(x) or x.shape[1] <= 64))


SLOWER_THAN_TORCH_EAGER: dict[str, Callable[[torch.Tensor], bool]] = {
    # BatchNorm lost everywhere in wall time except NCHW at 112 x 112 (torch's NCHW kernel is slow there: 2.2x)
    "batch_norm": lambda x: not (_big(x) and _nchw_2d(x) and x.shape[2] * x.shape[3] >= 4096),
    # GroupNorm / InstanceNorm won only in float32 channels-last (torch's 0.8 ms there: 1.1-1.3x)
    "group_norm": _eager_group_stats,
    "instance_norm": _eager_group_stats,
    # LayerNorm2d / RMSNorm2d won NCHW (torch permutes: 1.3-6.2x) and channels-last over 64 channels (1.1-2.9x)
    "layer_norm2d": _eager_channel_stats,
    "rms_norm2d": _eager_channel_stats,
}
"""op -> predicate, applied besides :data:`SLOWER_THAN_TORCH`: where it is true, ``auto`` runs torch's op, because
normlab's kernel measured slower in *wall time* (host cost included) in ``normlab bench kernels`` on an H100
machine, whose host is slow: one normlab forward+backward costs 0.7-1.3 ms of host time there against torch's
0.2-0.5 ms, more than most of these ops' GPU time (the README's GPU section). Neither table applies under
torch.compile, where ``auto`` hands Inductor torch's ops (see :mod:`normlab.kernels`): there the kernels ran through
the same Python launchers (the custom ops), and the compiled ResNet-50 steps measured slower than torch's compiled
ones. In a CUDA graph only the GPU time counts and the kernels win more often: force them there with
``backend="triton"`` for the warm-up and the capture alike (a Triton kernel must be compiled and loaded before a
capture, so ``auto`` does not switch implementations when a capture starts)."""


def prefers_torch(op: str, x: torch.Tensor, *, wall_time: bool = True) -> bool:
    """True where the kernel of ``op`` was measured slower than torch for inputs like ``x``, in GPU time
    (:data:`SLOWER_THAN_TORCH`) or, with ``wall_time``, in the wall time of eager calls
    (:data:`SLOWER_THAN_TORCH_EAGER`; the ``auto`` backend applies both, ``auto-gpu`` the first only)."""
    rules = (SLOWER_THAN_TORCH.get(op), SLOWER_THAN_TORCH_EAGER.get(op) if wall_time else None)
    return any(rule(x) for rule in rules if rule is not None)
