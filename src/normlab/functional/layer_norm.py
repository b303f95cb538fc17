"""Layer normalization (Ba, Kiros & Hinton, 2016, arXiv 1607.06450) and RMS normalization (Zhang & Sennrich, 2019,
arXiv 1910.07467) for channels-first tensors (N, C, *), in two flavours:

* ``layer_norm`` / ``rms_norm``: per sample over C and every spatial position (GroupNorm with one group);
* ``layer_norm2d`` / ``rms_norm2d``: per sample and position over the channels only (the LayerNorm2d of ConvNeXt,
  Liu et al., 2022, arXiv 2201.03545).

The affine parameters are per channel (C,) in both. Everything is elementwise or a reduction, so channels_last
inputs stay channels_last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._stats import accumulation_dtype, affine, var_mean

__all__ = ["layer_norm", "layer_norm2d", "rms_norm", "rms_norm2d"]


def _standardize(
    x: torch.Tensor, dims: Sequence[int], weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    var, mean = var_mean(x, dims)
    y = (x.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    return affine(y, weight, bias).to(x.dtype)


def _rms_scale(x: torch.Tensor, dims: Sequence[int], weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.to(accumulation_dtype(x.dtype))
    y = xf * torch.rsqrt(xf.square().mean(tuple(dims), keepdim=True) + eps)
    return affine(y, weight, None).to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    r"""Layer normalization of a channels-first tensor over C and all positions, with a per-channel affine.

    .. math:: y = \frac{x - \mathrm{E}_n[x]}{\sqrt{\mathrm{Var}_n[x] + \epsilon}} \gamma_c + \beta_c

    Mean and biased variance are per sample over (C, *). This is ``group_norm(x, 1, weight, bias, eps)``; for a
    2-D input (N, C) it is torch.nn.functional.layer_norm over C. Training and eval compute the same.

    Args:
        x: input (N, C, *).
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y = layer_norm(x)
        >>> bool(y.mean((1, 2, 3)).abs().max() < 1e-5)
        True
    """
    return _standardize(x, range(1, x.dim()), weight, bias, eps)


def layer_norm2d(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    r"""Layer normalization over the channel dimension at every position (ConvNeXt / timm ``LayerNorm2d``).

    .. math:: y_{n,:,p} = \frac{x_{n,:,p} - \mathrm{E}_c[x_{n,:,p}]}{\sqrt{\mathrm{Var}_c[x_{n,:,p}] + \epsilon}}
        \gamma + \beta

    Mean and biased variance are per sample and position p over dim 1, which is what torch.nn.LayerNorm(C) does
    to the channels-last permutation of ``x``. For a 2-D input (N, C) it is plain layer normalization over C.

    Args:
        x: input (N, C, *).
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance (1e-6 as in ConvNeXt).

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y = layer_norm2d(x)
        >>> bool(y.mean(1).abs().max() < 1e-5)
        True
    """
    return _standardize(x, [1], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    r"""RMS normalization of a channels-first tensor over C and all positions, with a per-channel scale.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}_n[x^2] + \epsilon}} \gamma_c

    The mean of squares is per sample over (C, *), accumulated in float32 (float64 for float64 input); nothing is
    subtracted. For a 2-D input (N, C) it is torch.nn.functional.rms_norm over C.

    Args:
        x: input (N, C, *).
        weight: optional (C,) scale.
        eps: added to the mean of squares.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y = rms_norm(x)
        >>> bool((y.square().mean((1, 2, 3)) - 1).abs().max() < 1e-4)
        True
    """
    return _rms_scale(x, range(1, x.dim()), weight, eps)


def rms_norm2d(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    r"""RMS normalization over the channel dimension at every position.

    .. math:: y_{n,:,p} = \frac{x_{n,:,p}}{\sqrt{\mathrm{E}_c[x_{n,:,p}^2] + \epsilon}} \gamma

    The mean of squares is per sample and position over dim 1, accumulated in float32 (float64 for float64
    input): torch.nn.RMSNorm(C) applied to the channels-last permutation of ``x``.

    Args:
        x: input (N, C, *).
        weight: optional (C,) scale.
        eps: added to the mean of squares.

    Example:
        >>> x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> y = rms_norm2d(x)
        >>> bool((y.square().mean(1) - 1).abs().max() < 1e-4)
        True
    """
    return _rms_scale(x, [1], weight, eps)
