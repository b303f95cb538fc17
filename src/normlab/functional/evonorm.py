"""EvoNorm normalization-activation layers B0 and S0 (Liu, Brock, Simonyan & Le, 2020, "Evolving
Normalization-Activation Layers", arXiv 2004.02967).

Each fuses a normalization and a nonlinearity with a learned per-channel parameter ``v``. Without ``v`` (the
``nonlinearity=False`` variant) normlab normalizes plainly: B0 becomes batch norm and S0 becomes group norm. The
authors' TensorFlow code and timm instead apply only the affine transform in that case.
"""

from __future__ import annotations

import torch

from ._checks import check_batch_has_values, check_divides, check_input, check_positive_int
from ._stats import accumulation_dtype, affine, channel_view, var_mean
from .batch_norm import batch_norm, batch_stats, update_running_stats

__all__ = ["evonorm_b0", "evonorm_s0"]

_DIMS = (3, 4, 5)


def evonorm_b0(
    x: torch.Tensor,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    running_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""EvoNorm-B0: batch and instance variance combined with a learned nonlinearity.

    .. math::
        y = \frac{x}{\max\big(\sqrt{s^2_b + \epsilon},\ v x + \sqrt{s^2_i + \epsilon}\big)} \gamma + \beta

    :math:`s^2_b` is the biased per-channel variance over (N, *) (the batch's in training, ``running_var`` in eval)
    and :math:`s^2_i` the biased variance of each (sample, channel) over its spatial positions; both accumulate in
    float32 (float64 for float64 input). Paper: Liu, Brock, Simonyan & Le, 2020, arXiv 2004.02967.

    With ``v=None`` there is no nonlinearity and the layer is batch norm,
    :math:`y = (x - \mathrm{E}[x]) / \sqrt{\mathrm{Var}[x] + \epsilon}\,\gamma + \beta`, with
    :func:`~normlab.functional.batch_norm` semantics (``running_mean`` is then needed together with ``running_var``).
    The authors' code and timm apply only :math:`\gamma x + \beta` there; normlab keeps the layer a normalization.

    Args:
        x: input (N, C, *) with at least one spatial dimension.
        running_var: (C,) buffer or None. Read in eval; in training updated in place with the unbiased batch
            variance: ``running = (1 - momentum) * running + momentum * batch``.
        weight, bias: optional (C,) affine parameters :math:`\gamma`, :math:`\beta`.
        v: optional (C,) nonlinearity parameter; None selects the plain batch norm.
        training: use (and record) batch statistics. Without running statistics the batch's are used in eval too.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to both variances.
        running_mean: optional (C,) buffer, updated alongside ``running_var`` in training (B0 reads only the
            variance; the mean keeps the buffers BatchNorm-compatible) and read in eval when ``v`` is None.

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: if ``x`` is not 3D, 4D or 5D; if batch statistics are needed and there is only one value per
            channel; if ``v`` is None and only one of ``running_mean`` / ``running_var`` is given.

    Note:
        Training normalizes with the batch variance (and records it); eval uses ``running_var``. The instance
        variance is always the sample's own.

    Example:
        >>> x = torch.randn(4, 3, 5, 5)
        >>> running_var = torch.ones(3)
        >>> y = evonorm_b0(x, running_var, v=torch.ones(3), training=True)
        >>> tuple(y.shape), bool((running_var != 1).all())
        ((4, 3, 5, 5), True)
    """
    check_input("evonorm_b0", x, _DIMS, None)
    if v is None:
        if (running_mean is None) != (running_var is None):
            raise ValueError(
                "evonorm_b0: with v=None (no nonlinearity) it is batch norm and needs running_mean and running_var "
                f"together or neither, got running_mean={'None' if running_mean is None else 'a tensor'} and "
                f"running_var={'None' if running_var is None else 'a tensor'}"
            )
        return batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    acc = accumulation_dtype(x.dtype)
    if training or running_var is None:
        check_batch_has_values("evonorm_b0", x)
        mean, batch_var, count = batch_stats(x)
        if training and running_var is not None:
            # B0 reads only the variance; a throwaway mean lets the shared update rule serve both buffers.
            record_mean = running_mean if running_mean is not None else torch.zeros_like(running_var)
            update_running_stats(record_mean, running_var, mean.detach(), batch_var.detach(), count, momentum)
    else:
        batch_var = running_var
    instance_var, _ = var_mean(x, range(2, x.dim()))
    xf = x.to(acc)
    left = channel_view(torch.sqrt(batch_var.to(acc) + eps), x.dim())
    right = channel_view(v.to(acc), x.dim()) * xf + torch.sqrt(instance_var + eps)
    return affine(xf / torch.maximum(left, right), weight, bias).to(x.dtype)


def evonorm_s0(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""EvoNorm-S0: a SiLU-like gate divided by the group standard deviation; batch independent.

    .. math:: y = \frac{x \, \sigma(v x)}{\sqrt{s^2_g + \epsilon}} \gamma + \beta

    :math:`s^2_g` is the biased variance of each sample over the channels of its group and all spatial positions,
    accumulated in float32 (float64 for float64 input); :math:`\sigma` is the logistic sigmoid. Paper: Liu, Brock,
    Simonyan & Le, 2020, arXiv 2004.02967.

    With ``v=None`` there is no nonlinearity and the layer is group norm,
    :math:`y = (x - \mathrm{E}_g[x]) / \sqrt{s^2_g + \epsilon}\,\gamma + \beta`
    (torch.nn.functional.group_norm). The authors' code and timm apply only :math:`\gamma x + \beta` there.

    Args:
        x: input (N, C, *) with at least one spatial dimension.
        num_groups: number of channel groups G; must divide C.
        weight, bias: optional (C,) affine parameters :math:`\gamma`, :math:`\beta`.
        v: optional (C,) nonlinearity parameter; None selects the plain group norm.
        eps: added to the group variance.

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: if ``x`` is not 3D, 4D or 5D, or ``num_groups`` is not a positive divisor of C.

    Note:
        There are no running statistics: training and eval compute the same thing.

    Example:
        >>> x = torch.randn(2, 4, 5, 5)
        >>> y = evonorm_s0(x, 2, v=torch.zeros(4))  # sigmoid(0) = 1/2
        >>> bool((y.view(2, 2, -1).std(-1, unbiased=False) - 0.5).abs().max() < 1e-4)
        True
    """
    check_input("evonorm_s0", x, _DIMS, None)
    check_positive_int("evonorm_s0", "num_groups", num_groups)
    check_divides("evonorm_s0", "num_groups", num_groups, "channels", x.shape[1])
    n, c = x.shape[0], x.shape[1]
    spatial = (1,) * (x.dim() - 2)
    grouped = x.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    group_var, group_mean = var_mean(grouped, range(2, grouped.dim()))

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.expand(n, num_groups, c // num_groups, *spatial).reshape(n, c, *spatial)

    xf = x.to(accumulation_dtype(x.dtype))
    invstd = per_channel(torch.rsqrt(group_var + eps))
    if v is None:
        y = (xf - per_channel(group_mean)) * invstd
    else:
        y = xf * torch.sigmoid(channel_view(v.to(xf.dtype), x.dim()) * xf) * invstd
    return affine(y, weight, bias).to(x.dtype)
