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

SLOWER_THAN_TORCH: dict[str, Callable[[torch.Tensor], bool]] = {}
"""op -> predicate on the input: where it is true, ``auto`` dispatch runs torch's op (or the reference) instead of
the kernel, because ``normlab bench kernels`` measured the kernel slower there. Empty until a GPU measurement shows
such a case (none has been run yet); ``backend="triton"`` always runs the kernel."""


def prefers_torch(op: str, x: torch.Tensor) -> bool:
    """True where the kernel of ``op`` was measured slower than torch for inputs like ``x``."""
    rule = SLOWER_THAN_TORCH.get(op)
    return rule is not None and rule(x)
