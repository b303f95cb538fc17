"""torch's own ops behind normlab's functional signatures, for ops where torch computes exactly the same thing.

Each function here has the signature of its namesake in normlab.functional and is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as reference

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "layer_norm2d", "rms_norm", "rms_norm2d"]


def _half_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


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
    """torch.nn.functional.batch_norm.

    Falls back to the reference for a process group (torch has no CPU sync) and for half-precision CPU inputs:
    torch's CPU kernel applies ``x * scale + shift`` in bfloat16, which cancels (a 2-value batch normalizes to
    0.95 / -1.05 instead of 1 / -1); the reference computes in float32 and rounds once.
    """
    if process_group is not None or _half_on_cpu(x):
        return reference.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps, process_group=process_group
        )
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of ``x`` that the reference's elementwise math carries over to its output."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _laid_out_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in the memory format of ``x`` (a no-op when it already is)."""
    return y.contiguous(memory_format=_memory_format(x))


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """torch.nn.functional.group_norm of a contiguous copy, returned in the input's memory format.

    torch's channels-last CPU kernel takes the variance as ``E[x^2] - E[x]^2``, which cancels at a large offset
    (float32 input with mean 1e4 and std 1 comes out with std ~300); its contiguous kernel is stable.
    """
    return _laid_out_like(F.group_norm(x.contiguous(), num_groups, weight, bias, eps), x)


def instance_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """torch.nn.functional.instance_norm, returned in the input's memory format.

    torch computes it with its batch_norm kernel, so half-precision CPU inputs fall back to the reference for the
    reason given in :func:`batch_norm` (measured here: mean 100 std 1 in bfloat16 normalizes to means up to 0.35).
    """
    if _half_on_cpu(x):
        return reference.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    y = F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _laid_out_like(y, x)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """:func:`group_norm` with one group, for every rank (also (N, C), which F.layer_norm would do).

    torch's CPU layer_norm backward sums the weight and bias gradients of half-precision inputs with 10-20%
    error (measured at 20000 x 8 in bfloat16); its group_norm does not.
    """
    return group_norm(x, 1, weight, bias, eps)


def layer_norm2d(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """torch.nn.functional.layer_norm over C of the channels-last permutation, returned in the input's format.

    Half-precision CPU inputs fall back to the reference: torch's CPU layer_norm backward sums the weight and bias
    gradients with 10-20% error there (measured at 16 x 8 x 56 x 56 in bfloat16).
    """
    if _half_on_cpu(x):
        return reference.layer_norm2d(x, weight, bias, eps)
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)
    return _laid_out_like(y, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """torch.nn.functional.rms_norm over (C, *), the per-channel weight broadcast to (C, *) so bf16 rounds once."""
    if weight is not None:
        weight = weight.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[1:])
    return _laid_out_like(F.rms_norm(x, x.shape[1:], weight, eps), x)


def rms_norm2d(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """torch.nn.functional.rms_norm over C of the channels-last permutation, returned in the input's format."""
    y = F.rms_norm(x.movedim(1, -1), (x.shape[1],), weight, eps).movedim(-1, 1)
    return _laid_out_like(y, x)
