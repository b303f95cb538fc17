"""Filter Response Normalization with the Thresholded Linear Unit (Singh & Krishnan, 2020, arXiv 1911.09737).

Batch independent and without mean subtraction: each (sample, channel) is divided by the root mean square of its
own spatial responses, then a learned per-channel threshold ``tau`` acts as the activation.
"""

from __future__ import annotations

import torch

from ._checks import check_input
from ._stats import accumulation_dtype, affine, channel_view

__all__ = ["filter_response_norm"]


def filter_response_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tau: torch.Tensor | None = None,
    eps: float = 1e-6,
    learned_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Filter response normalization, optionally followed by the TLU activation.

    .. math::
        \nu^2 = \frac{1}{|S|}\sum_{s \in S} x_s^2, \qquad
        y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon + |\epsilon_l|}} + \beta,\ \tau\Big)

    with :math:`\nu^2` per (sample, channel) over the spatial positions :math:`S`, accumulated in float32
    (float64 for float64 input). Paper: Singh & Krishnan, 2020, "Filter Response Normalization Layer: Eliminating
    Batch Dependence in the Training of Deep Neural Networks", arXiv 1911.09737.

    There is no mean subtraction: the output is invariant to a positive rescaling of each (sample, channel) slice of
    the input (up to ``eps``), not to a shift.

    Args:
        x: input (N, C, *) with at least one spatial dimension.
        weight, bias: optional (C,) affine parameters :math:`\gamma`, :math:`\beta`.
        tau: optional (C,) TLU threshold; None skips the activation.
        eps: constant added to :math:`\nu^2`.
        learned_eps: optional (C,) learned addition to ``eps``; its absolute value is used, so the total stays
            >= ``eps``.

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: if ``x`` is not 3D, 4D or 5D.

    Note:
        There are no running statistics: training and eval compute the same thing.

    Example:
        >>> x = torch.randn(2, 3, 8, 8)
        >>> y = filter_response_norm(x)
        >>> bool((y.square().mean((2, 3)) - 1).abs().max() < 1e-4)
        True
    """
    check_input("filter_response_norm", x, (3, 4, 5), None)
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    nu2 = xf.square().mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if learned_eps is not None:
        denominator = nu2 + channel_view(learned_eps.to(acc).abs() + eps, x.dim())
    else:
        denominator = nu2 + eps
    y = affine(xf * torch.rsqrt(denominator), weight, bias)
    if tau is not None:
        y = torch.maximum(y, channel_view(tau.to(y.dtype), x.dim()))
    return y.to(x.dtype)
