"""Frozen batch normalization: BatchNorm with fixed statistics and affine, as one per-channel scale and shift.

The inference form of batch normalization (Ioffe & Szegedy, 2015, arXiv 1502.03167) used by detection backbones
(torchvision.ops.FrozenBatchNorm2d), where batches are too small to estimate statistics.
"""

from __future__ import annotations

import torch

from ._stats import accumulation_dtype, channel_view

__all__ = ["frozen_batch_norm"]


def frozen_batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch normalization with fixed statistics: a per-channel affine map.

    .. math::
        s = \gamma / \sqrt{\mathrm{running\_var} + \epsilon}, \quad
        t = \beta - \mathrm{running\_mean} \cdot s, \quad y = x s + t

    This is torch.nn.BatchNorm in eval mode, folded into one scale and shift per channel (Ioffe & Szegedy, 2015,
    arXiv 1502.03167). Scale and shift are computed in float32 (float64 for float64 input); the result has x's
    dtype and memory format. Gradients flow to ``x``, and to ``weight``/``bias`` when they require grad.

    Args:
        x: input (N, C, *).
        running_mean, running_var: (C,) statistics.
        weight, bias: optional (C,) scale and shift (None: 1 and 0).
        eps: added to the variance.

    Note:
        There is no training mode: the statistics never come from the batch and are never updated.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> y = frozen_batch_norm(x, torch.zeros(3), torch.ones(3), eps=0.0)
        >>> torch.equal(y, x)
        True
    """
    acc = accumulation_dtype(x.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    y = x.to(acc) * channel_view(scale, x.dim()) + channel_view(shift, x.dim())
    return y.to(x.dtype)
