"""The one shared statistics core: numerically stable mean/variance with float32 (or float64) accumulation.

``torch.var_mean`` is a single-pass Welford/cascade reduction, so inputs with a large offset (mean 1e4, std 1 in
float32) keep their variance; the naive ``E[x^2] - E[x]^2`` loses it to cancellation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["accumulation_dtype", "var_mean", "channel_view", "affine"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def var_mean(x: torch.Tensor, dims: Sequence[int], *, correction: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance and mean of ``x`` over ``dims`` (kept as size-1 dims), in the accumulation dtype.

    Args:
        x: input of any floating dtype.
        dims: dimensions to reduce.
        correction: 0 for the biased (population) variance, 1 for the unbiased one.

    Returns:
        (var, mean), each float32 (float64 for float64 input) with ``keepdim=True``.
    """
    return torch.var_mean(x.to(accumulation_dtype(x.dtype)), dim=tuple(dims), correction=correction, keepdim=True)


def channel_view(p: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a per-channel vector (C,) so it broadcasts against an (N, C, *) tensor of ``ndim`` dimensions."""
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Apply a per-channel scale and shift to ``y`` (N, C, *); either may be None."""
    if weight is not None:
        y = y * channel_view(weight, y.dim())
    if bias is not None:
        y = y + channel_view(bias, y.dim())
    return y
