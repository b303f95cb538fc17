"""Weight standardization (Qiao et al., 2019, arXiv 1903.10520) and its NF-Net scaled form (Brock et al., 2021,
arXiv 2101.08692): a convolution's weight is normalized per output channel before every use."""

from __future__ import annotations

import torch

from ._stats import var_mean

__all__ = ["standardize_weight"]


def standardize_weight(
    weight: torch.Tensor,
    eps: float = 1e-6,
    gain: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    r"""Standardize ``weight`` per output channel (dim 0) over all other dimensions.

    .. math:: \hat W_{o} = g_o \cdot s \cdot \frac{W_{o} - \mathrm{E}[W_{o}]}{\sqrt{\mathrm{Var}[W_{o}] + \epsilon}}

    with the biased variance over the fan-in of output channel :math:`o`, accumulated in float32 (float64 for
    float64 weights). ``scale`` = 1 and no gain is StdConv (Qiao et al., 2019, "Micro-Batch Training with
    Batch-Channel Normalization and Weight Standardization", arXiv 1903.10520). NF-Nets' ScaledStdConv (Brock et al.,
    2021, "High-Performance Large-Scale Image Recognition Without Normalization", arXiv 2101.08692) uses
    ``scale = gamma / sqrt(fan_in)`` and a learned gain, so each output channel's weight has L2 norm close to
    ``gamma * gain``.

    Args:
        weight: (C_out, *) weight, e.g. a conv weight (C_out, C_in / groups, kH, kW).
        eps: added to the variance.
        gain: optional (C_out,) per-output-channel gain :math:`g`.
        scale: a constant factor :math:`s`.

    Returns:
        Tensor of weight's shape, dtype and memory format.

    Note:
        A stateless transform of the parameter: identical in training and eval. An output channel with a single
        fan-in element (a depthwise 1x1 conv) has zero variance and standardizes to zero.

    Example:
        >>> w = torch.randn(4, 3, 3, 3)
        >>> var, mean = torch.var_mean(standardize_weight(w), dim=(1, 2, 3), correction=0)
        >>> bool(mean.abs().max() < 1e-5), bool((var - 1).abs().max() < 1e-4)
        (True, True)
    """
    var, mean = var_mean(weight, range(1, weight.dim()))
    w = (weight.to(mean.dtype) - mean) * (torch.rsqrt(var + eps) * scale)
    if gain is not None:
        w = w * gain.to(w.dtype).reshape((-1,) + (1,) * (weight.dim() - 1))
    return w.to(weight.dtype)
