"""Ghost batch normalization (Hoffer, Hubara & Soudry, 2017, "Train longer, generalize better", arXiv 1705.08741).

In training, the batch is cut along dim 0 into "ghost" batches of ``virtual_batch_size`` samples, each normalized
with its own statistics: large-batch training keeps the noise (and the regularization) of small-batch BatchNorm.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_positive_int
from ._stats import accumulation_dtype, affine, var_mean
from .batch_norm import batch_norm

__all__ = ["ghost_batch_norm"]


def _check_ghost_batches(x: torch.Tensor, virtual_batch_size: int) -> None:
    """Every ghost batch needs more than one value per channel; the smallest one is the last."""
    n = x.shape[0]
    smallest = n % virtual_batch_size or min(n, virtual_batch_size)
    if smallest * math.prod(x.shape[2:]) <= 1:
        raise ValueError(
            f"ghost_batch_norm: virtual_batch_size={virtual_batch_size} leaves a ghost batch of {smallest} sample(s) "
            f"with at most one value per channel for input of shape {tuple(x.shape)}; choose a virtual_batch_size "
            "whose last ghost batch has more than one value per channel"
        )


def _ghost_stats(x: torch.Tensor, virtual_batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Biased variance, mean (each (G, C), accumulation dtype) and element count (G,) of each ghost batch.

    The full ghost batches are reduced together through a reshape (N, C, *) -> (G, vbs, C, *); a smaller last one,
    if N is not a multiple of ``virtual_batch_size``, on its own.
    """
    n, c = x.shape[0], x.shape[1]
    full, rest = divmod(n, virtual_batch_size)
    per_sample = math.prod(x.shape[2:])
    variances, means, counts = [], [], []
    if full:
        head = x[: full * virtual_batch_size].reshape((full, virtual_batch_size) + tuple(x.shape[1:]))
        var, mean = var_mean(head, [1] + list(range(3, head.dim())))
        variances.append(var.reshape(full, c))
        means.append(mean.reshape(full, c))
        counts += [virtual_batch_size * per_sample] * full
    if rest:
        var, mean = var_mean(x[full * virtual_batch_size :], [0] + list(range(2, x.dim())))
        variances.append(var.reshape(1, c))
        means.append(mean.reshape(1, c))
        counts.append(rest * per_sample)
    acc = accumulation_dtype(x.dtype)
    count = torch.tensor(counts, dtype=acc, device=x.device)
    return torch.cat(variances), torch.cat(means), count


@torch.no_grad()
def _update_running_stats_ghost(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    var: torch.Tensor,
    mean: torch.Tensor,
    count: torch.Tensor,
    momentum: float,
) -> None:
    """One momentum step towards the ghost batches' average mean and average unbiased variance."""
    unbiased = var * (count / (count - 1)).unsqueeze(1)
    running_mean.lerp_(mean.mean(0).to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.mean(0).to(running_var.dtype), momentum)


def ghost_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int,
    process_group=None,
) -> torch.Tensor:
    r"""Ghost batch normalization: batch norm applied to each chunk of ``virtual_batch_size`` samples on its own.

    .. math:: y_i = \frac{x_i - \mathrm{E}_{g(i)}[x]}{\sqrt{\mathrm{Var}_{g(i)}[x] + \epsilon}} \gamma + \beta

    where :math:`g(i)` is the ghost batch of sample :math:`i`: samples ``[k * vbs, (k + 1) * vbs)`` along dim 0.
    The last ghost batch is smaller when N is not a multiple of ``virtual_batch_size``. Statistics are per channel
    over the ghost batch's (samples, *), in float32 (float64 for float64 input). Paper: Hoffer, Hubara & Soudry,
    2017, "Train longer, generalize better", arXiv 1705.08741.

    Running statistics: ONE update per call, towards the plain (unweighted) average over the ghost batches of their
    means and of their unbiased variances, ``running = (1 - momentum) * running + momentum * average``. So
    ``momentum`` means per step what it means for BatchNorm, however many ghost batches the batch holds, and with
    ``virtual_batch_size >= N`` the update is exactly BatchNorm's. (Implementations that apply a BatchNorm to each
    chunk in turn update once per ghost batch instead, which makes the effective momentum depend on
    N / virtual_batch_size.)

    Args:
        x: input (N, C, *).
        running_mean, running_var: (C,) buffers or None.
        weight, bias: optional (C,) affine parameters.
        training: use ghost-batch statistics and update the running statistics in place.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to the variance.
        virtual_batch_size: samples per ghost batch, a positive int.
        process_group: accepted for signature compatibility with :func:`batch_norm` and ignored: ghost batches are
            slices of the local batch, so each rank normalizes its own ghost batches and keeps its own running
            statistics (nothing is synchronized).

    Raises:
        ValueError: if ``virtual_batch_size`` is not a positive int, or (when using batch statistics) a ghost batch
            has only one value per channel.

    Note:
        Training (or no running statistics) uses ghost-batch statistics; eval with running statistics is exactly
        BatchNorm's eval.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4)
        >>> bool(y[:4].mean((0, 2, 3)).abs().max() < 1e-5), bool(y[4:].mean((0, 2, 3)).abs().max() < 1e-5)
        (True, True)
    """
    virtual_batch_size = check_positive_int("ghost_batch_norm", "virtual_batch_size", virtual_batch_size)
    if not (training or running_mean is None):
        return batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    _check_ghost_batches(x, virtual_batch_size)
    var, mean, count = _ghost_stats(x, virtual_batch_size)
    if training and running_mean is not None and running_var is not None:
        _update_running_stats_ghost(running_mean, running_var, var.detach(), mean.detach(), count, momentum)
    # Per-sample statistics: row i of the (G, C) tables is ghost batch i // vbs.
    ghost_of_sample = torch.arange(x.shape[0], device=x.device) // virtual_batch_size
    per_sample = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    sample_mean = mean[ghost_of_sample].reshape(per_sample)
    sample_invstd = torch.rsqrt(var[ghost_of_sample] + eps).reshape(per_sample)
    y = (x.to(mean.dtype) - sample_mean) * sample_invstd
    return affine(y, weight, bias).to(x.dtype)
