"""Group normalization (Wu & He, 2018, arXiv 1803.08494) and instance normalization (Ulyanov et al., 2016,
arXiv 1607.08022): statistics per sample, over a group of channels or over one channel, never over the batch.

The math of torch.nn.functional.group_norm / instance_norm written out in plain PyTorch. The channel dimension is
split with a view, so a channels_last input stays channels_last.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_divides, check_positive_int, check_spatial_has_values
from ._stats import accumulation_dtype, affine, channel_view, var_mean
from .batch_norm import update_running_stats

__all__ = ["group_norm", "instance_norm"]


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Group normalization with torch.nn.functional.group_norm's signature and semantics.

    .. math:: y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma_c + \beta_c

    The C channels are split into ``num_groups`` consecutive groups; mean and biased variance are taken per sample
    and group over (C / num_groups, *). The affine parameters are per channel. Training and eval compute the same.

    Args:
        x: input (N, C, *).
        num_groups: number of groups; must divide C.
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance.

    Raises:
        ValueError: if ``num_groups`` is not a positive integer dividing C.

    Example:
        >>> x = torch.randn(2, 6, 4, 4)
        >>> y = group_norm(x, 3)
        >>> bool(y.reshape(2, 3, -1).mean(-1).abs().max() < 1e-5)
        True
    """
    check_positive_int("group_norm", "num_groups", num_groups)
    check_divides("group_norm", "num_groups", num_groups, "num_channels", x.shape[1])
    grouped = x.unflatten(1, (num_groups, x.shape[1] // num_groups))
    dims = range(2, grouped.dim())
    var, mean = var_mean(grouped, dims)
    y = (grouped.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    return affine(y.flatten(1, 2), weight, bias).to(x.dtype)


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
    r"""Instance normalization with torch.nn.functional.instance_norm's signature and semantics.

    .. math:: y = \frac{x - \mathrm{E}_{n,c}[x]}{\sqrt{\mathrm{Var}_{n,c}[x] + \epsilon}} \gamma_c + \beta_c

    With ``use_input_stats`` the statistics are per sample and channel over the spatial dimensions (*); the
    running statistics, when given, are updated in place with the batch average of the per-instance mean and
    unbiased variance (``running = (1 - momentum) * running + momentum * batch``). Otherwise the running statistics
    normalize every instance.

    Args:
        x: input (N, C, *) with at least one spatial dimension.
        running_mean, running_var: (C,) buffers, both or neither.
        weight, bias: optional (C,) affine parameters.
        use_input_stats: normalize with (and record) the per-instance statistics.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to the variance.

    Raises:
        ValueError: with ``use_input_stats``, if there is only one spatial value per channel; if only one of the
            running buffers is given; without ``use_input_stats``, if they are missing.

    Example:
        >>> x = torch.randn(2, 3, 5, 5)
        >>> y = instance_norm(x)
        >>> bool(y.mean((2, 3)).abs().max() < 1e-5)
        True
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "instance_norm: running_mean and running_var must both be tensors or both be None, got "
            f"running_mean={type(running_mean).__name__}, running_var={type(running_var).__name__}"
        )
    acc = accumulation_dtype(x.dtype)
    if use_input_stats:
        check_spatial_has_values("instance_norm", x)
        var, mean = var_mean(x, range(2, x.dim()))
        if running_mean is not None:
            count = torch.tensor(math.prod(x.shape[2:]), dtype=acc, device=x.device)
            batch_mean, batch_var = mean.detach().mean(0).flatten(), var.detach().mean(0).flatten()
            update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum)
    else:
        if running_mean is None:
            raise ValueError(
                "instance_norm: use_input_stats=False normalizes with running_mean and running_var, got None"
            )
        mean = channel_view(running_mean.to(acc), x.dim())
        var = channel_view(running_var.to(acc), x.dim())
    y = (x.to(acc) - mean) * torch.rsqrt(var + eps)
    return affine(y, weight, bias).to(x.dtype)
