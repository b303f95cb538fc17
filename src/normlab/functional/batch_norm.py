"""Batch normalization reference (Ioffe & Szegedy, 2015, arXiv 1502.03167), optionally synchronized over ranks.

The math of torch.nn.functional.batch_norm written out in plain PyTorch, plus a cross-process statistics path that
works with any torch.distributed backend (gloo on CPU, NCCL on GPU) and weights each rank by its element count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import check_batch_has_values
from ._stats import accumulation_dtype, affine, channel_view, var_mean

__all__ = ["batch_norm", "batch_stats", "update_running_stats", "all_reduce_sum"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the gradient of a sum over ranks is again the sum over ranks."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-reduce (sum) of ``t`` over ``group``."""
    return _AllReduceSum.apply(t, group)


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def batch_stats(x: torch.Tensor, *, process_group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel batch mean, biased variance and element count of ``x`` (N, C, *).

    Args:
        x: input.
        process_group: when given, the statistics cover the inputs of every rank in the group, each rank weighted by
            its number of elements (ranks may hold different batch sizes, even zero). The global mean is reduced
            first, then the sum of squares around it, so the variance is exact and free of cancellation.

    Returns:
        (mean, var, count): mean and var of shape (C,) in the accumulation dtype, count a 0-dim tensor.
    """
    dims = _reduce_dims(x)
    acc = accumulation_dtype(x.dtype)
    if process_group is None:
        var, mean = var_mean(x, dims)
        count = torch.tensor(x.numel() // x.shape[1], dtype=acc, device=x.device)
        return mean.flatten(), var.flatten(), count
    xf = x.to(acc)
    local_count = torch.full((1,), x.numel() // x.shape[1], dtype=acc, device=x.device)
    summed = all_reduce_sum(torch.cat([xf.sum(dims), local_count]), process_group)
    count = summed[-1]
    mean = summed[:-1] / count
    centered = xf - channel_view(mean, x.dim())
    var = all_reduce_sum(centered.square().sum(dims), process_group) / count
    return mean, var, count


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    momentum: float,
) -> None:
    """In place: ``running = (1 - momentum) * running + momentum * batch``, with the unbiased batch variance."""
    unbiased = var * (count / (count - 1).clamp_min(1))
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype), momentum)


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
    r"""Batch normalization with torch.nn.functional.batch_norm's signature and semantics.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training (or when no running statistics are given) the statistics are the batch's, per channel over
    (N, *); the running statistics, when given, are updated in place with the unbiased variance. Otherwise the
    running statistics normalize.

    Args:
        x: input (N, C, *).
        running_mean, running_var: (C,) buffers or None.
        weight, bias: optional (C,) affine parameters.
        training: use (and record) batch statistics.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to the variance.
        process_group: synchronize the batch statistics over this torch.distributed group.

    Raises:
        ValueError: in training, if the (local) batch has only one value per channel.

    Example:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> y = batch_norm(x, None, None, training=True)
        >>> bool(y.mean((0, 2, 3)).abs().max() < 1e-5)
        True
    """
    use_batch_stats = training or running_mean is None
    if use_batch_stats:
        if process_group is None:
            check_batch_has_values("batch_norm", x)
        mean, var, count = batch_stats(x, process_group=process_group)
        if training and running_mean is not None and running_var is not None:
            update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    else:
        mean, var = running_mean, running_var
    acc = accumulation_dtype(x.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps)
    y = (x.to(acc) - channel_view(mean.to(acc), x.dim())) * channel_view(invstd, x.dim())
    return affine(y, weight, bias).to(x.dtype)
