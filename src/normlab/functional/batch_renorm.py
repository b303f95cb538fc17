"""Batch renormalization (Ioffe, 2017, "Batch Renormalization", arXiv 1702.03275).

Training normalizes with the batch statistics corrected towards the running ones by per-channel constants r and d
(no gradient through them), so training and inference see the same function when the two agree and small or
non-i.i.d. batches hurt less than with BatchNorm.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_batch_has_values, check_nonnegative_float
from ._stats import accumulation_dtype, affine, channel_view
from .batch_norm import batch_norm, batch_stats, update_running_stats

__all__ = ["batch_renorm", "check_renorm_limits"]


def check_renorm_limits(owner: str, r_max, d_max):
    """Validate ``r_max >= 1`` and ``d_max >= 0`` given as Python numbers (returned as floats); tensors pass as they
    are (reading their values would synchronize with the device and break torch.compile graphs)."""
    if not isinstance(r_max, torch.Tensor):
        if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not math.isfinite(r_max) or r_max < 1:
            raise ValueError(
                f"{owner}: r_max={r_max!r} must be a finite number >= 1 (r is clipped to [1/r_max, r_max])"
            )
        r_max = float(r_max)
    if not isinstance(d_max, torch.Tensor):
        d_max = check_nonnegative_float(owner, "d_max", d_max)
    return r_max, d_max


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.tensor(value, device=like.device, dtype=like.dtype)


# r and d are computed in an opaque custom op so that torch.compile saves them for the backward. As plain pointwise
# ops, AOTAutograd's partitioner (torch 2.13, inductor) recomputes them in the backward from the running-statistics
# buffers, which by then hold the *updated* values, and the input gradient comes out wrong.
@torch.library.custom_op("normlab::renorm_correction", mutates_args=())
def _renorm_correction(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    r_max: torch.Tensor,
    d_max: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = clip(sigma_B / sigma, 1/r_max, r_max) and d = clip((mean_B - running_mean) / sigma, -d_max, d_max)."""
    invstd_running = torch.rsqrt(running_var.to(mean.dtype) + eps)
    r = torch.clamp((var + eps).sqrt() * invstd_running, 1.0 / r_max, r_max)
    d = torch.clamp((mean - running_mean.to(mean.dtype)) * invstd_running, -d_max, d_max)
    return r, d


@_renorm_correction.register_fake
def _(mean, var, running_mean, running_var, eps, r_max, d_max):
    return torch.empty_like(mean), torch.empty_like(mean)


def batch_renorm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float | torch.Tensor = 3.0,
    d_max: float | torch.Tensor = 5.0,
    process_group=None,
) -> torch.Tensor:
    r"""Batch renormalization: batch norm corrected towards the running statistics.

    .. math::
        \sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}, \quad \sigma = \sqrt{\mathrm{running\_var} + \epsilon},

        r = \mathrm{sg}(\mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma)), \quad
        d = \mathrm{sg}(\mathrm{clip}_{[-d_{max},\, d_{max}]}((\mathrm{E}_B[x] - \mathrm{running\_mean}) / \sigma)),

        y = \left(\frac{x - \mathrm{E}_B[x]}{\sigma_B} r + d\right) \gamma + \beta

    where sg stops the gradient (r and d are constants for backpropagation). Paper: Ioffe, 2017, "Batch
    Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models", arXiv 1702.03275. With
    ``r_max = 1`` and ``d_max = 0`` this is batch norm. Statistics are computed in float32 (float64 for float64
    input); the output has x's dtype.

    Args:
        x: input (N, C, *).
        running_mean, running_var: (C,) buffers; required in training (r and d are measured against them).
        weight, bias: optional (C,) affine parameters.
        training: use the corrected batch statistics and update the running statistics in place (after computing
            r and d) with the unbiased batch variance, as batch norm does.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to the variances.
        r_max: bound of r, >= 1; a Python number or a 0-dim tensor (a schedule computed as a tensor does not make
            torch.compile recompile at each step). Tensors are not validated.
        d_max: bound of d, >= 0; a Python number or a 0-dim tensor.
        process_group: synchronize the batch statistics over this torch.distributed group (see
            :func:`batch_stats`).

    Raises:
        ValueError: in training without running statistics, on a (local, unsynchronized) batch with one value per
            channel, or on a Python ``r_max < 1`` or ``d_max < 0``.

    Note:
        Training uses the renormalized batch statistics; eval is exactly batch norm's eval with the running
        statistics.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_renorm(x, mean, var, training=True, r_max=1.0, d_max=0.0)
        >>> bool(y.mean((0, 2, 3)).abs().max() < 1e-5), bool(mean.abs().max() > 0)
        (True, True)
    """
    r_max, d_max = check_renorm_limits("batch_renorm", r_max, d_max)
    if not training:
        return batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    if running_mean is None or running_var is None:
        raise ValueError(
            "batch_renorm: training needs running_mean and running_var (r and d compare the batch statistics with "
            "them); got None"
        )
    if process_group is None:
        check_batch_has_values("batch_renorm", x)
    acc = accumulation_dtype(x.dtype)
    mean, var, count = batch_stats(x, process_group=process_group)
    invstd_batch = torch.rsqrt(var + eps)
    r, d = _renorm_correction(
        mean.detach(), var.detach(), running_mean, running_var, eps, _as_tensor(r_max, mean), _as_tensor(d_max, mean)
    )
    update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    scale = channel_view(invstd_batch * r, x.dim())
    y = (x.to(acc) - channel_view(mean, x.dim())) * scale + channel_view(d, x.dim())
    return affine(y, weight, bias).to(x.dtype)
