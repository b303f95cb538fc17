"""torch's own ops behind normlab's functional signatures, for ops where torch computes exactly the same thing.

Each function here has the signature of its namesake in normlab.functional and is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as reference

__all__ = ["batch_norm"]


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    process_group=None,
) -> torch.Tensor:
    """torch.nn.functional.batch_norm; a process group falls back to the reference (torch has no CPU sync)."""
    if process_group is not None:
        return reference.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, process_group=process_group)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
