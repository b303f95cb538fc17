"""LayerNorm, LayerNorm2d, RMSNorm and RMSNorm2d for channels-first (N, C, *) tensors of conv nets.

These are not for transformer tokens laid out (N, L, C): there keep torch.nn.LayerNorm / torch.nn.RMSNorm, which
normalize the last dimension. Here the channels are dim 1 and the affine parameters are per channel (C,).
"""

from __future__ import annotations

import torch

from .. import kernels
from ._base import NormBase

__all__ = ["LayerNorm", "LayerNorm2d", "RMSNorm", "RMSNorm2d"]


class _AffineNorm(NormBase):
    """A per-sample norm whose shift can be dropped with ``bias=False``, as in torch.nn.LayerNorm."""

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.affine and self.bias is None:
            extra += ", bias=False"
        return extra


class LayerNorm(_AffineNorm):
    r"""Layer normalization of a channels-first input over the channels and all positions.

    .. math:: y = \frac{x - \mathrm{E}_n[x]}{\sqrt{\mathrm{Var}_n[x] + \epsilon}} \gamma_c + \beta_c

    Mean and biased variance are per sample over (C, *); the affine parameters are per channel, so this is
    GroupNorm with one group (the "LayerNorm" of conv nets, e.g. timm's GroupNorm1). For (N, C) input it equals
    torch.nn.LayerNorm(C). Paper: Ba, Kiros & Hinton, 2016, "Layer Normalization", arXiv 1607.06450.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Must be > 0.
        affine: learn a per-channel scale (weight) and shift (bias).
        bias: with ``affine``, also learn the shift; False keeps only the scale.
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, *) with 0 to 3 spatial dimensions.

    Raises:
        ValueError: on an input of the wrong rank or channel count, or num_features <= 0 or eps <= 0.

    Note:
        Training and eval compute the same thing: the statistics are each sample's own, nothing is tracked. For
        transformer tokens (N, L, C) use torch.nn.LayerNorm, which normalizes the last dimension.

    Example:
        >>> import torch
        >>> from normlab.layers.layer_norm import LayerNorm
        >>> y = LayerNorm(3)(torch.randn(2, 3, 4, 4))
        >>> bool(y.mean((1, 2, 3)).abs().max() < 1e-5)
        True
    """

    _input_dims = (2, 3, 4, 5)

    def __init__(
        self, num_features: int, *, eps: float = 1e-5, affine: bool = True, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("layer_norm", x, self.weight, self.bias, self.eps)


class LayerNorm2d(_AffineNorm):
    r"""Layer normalization over the channels at every position of an (N, C, H, W) input (ConvNeXt).

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,:,h,w}]}
        {\sqrt{\mathrm{Var}_c[x_{n,:,h,w}] + \epsilon}} \gamma + \beta

    Mean and biased variance are per sample and position over C: torch.nn.LayerNorm(C) applied to the
    channels-last permutation, with the input's memory format kept (channels_last stays channels_last). The
    LayerNorm2d of timm and of ConvNeXt: Liu et al., 2022, "A ConvNet for the 2020s", arXiv 2201.03545.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Must be > 0. Default 1e-6 as in ConvNeXt.
        affine: learn a per-channel scale (weight) and shift (bias).
        bias: with ``affine``, also learn the shift; False keeps only the scale.
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input of the wrong rank or channel count, or num_features <= 0 or eps <= 0.

    Note:
        Training and eval compute the same thing: the statistics are each sample's own, nothing is tracked. For
        transformer tokens (N, L, C) use torch.nn.LayerNorm, which normalizes the last dimension.

    Example:
        >>> import torch
        >>> from normlab.layers.layer_norm import LayerNorm2d
        >>> y = LayerNorm2d(8)(torch.randn(2, 8, 4, 4))
        >>> bool(y.mean(1).abs().max() < 1e-5)
        True
    """

    _input_dims = (4,)

    def __init__(
        self, num_features: int, *, eps: float = 1e-6, affine: bool = True, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("layer_norm2d", x, self.weight, self.bias, self.eps)


class RMSNorm(NormBase):
    r"""RMS normalization of a channels-first input over the channels and all positions.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}_n[x^2] + \epsilon}} \gamma_c

    The mean of squares is per sample over (C, *), accumulated in float32 (float64 for float64 input); nothing is
    subtracted and there is no shift. For (N, C) input it equals torch.nn.RMSNorm(C, eps=eps). Paper: Zhang &
    Sennrich, 2019, "Root Mean Square Layer Normalization", arXiv 1910.07467.

    Args:
        num_features: C, the number of channels.
        eps: added to the mean of squares. Must be > 0.
        affine: learn a per-channel scale (weight).
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, *) with 0 to 3 spatial dimensions.

    Raises:
        ValueError: on an input of the wrong rank or channel count, or num_features <= 0 or eps <= 0.

    Note:
        Training and eval compute the same thing: the statistics are each sample's own, nothing is tracked. For
        transformer tokens (N, L, C) use torch.nn.RMSNorm, which normalizes the last dimension.

    Example:
        >>> import torch
        >>> from normlab.layers.layer_norm import RMSNorm
        >>> y = RMSNorm(3)(torch.randn(2, 3, 4, 4))
        >>> bool((y.square().mean((1, 2, 3)) - 1).abs().max() < 1e-4)
        True
    """

    _input_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, *, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("rms_norm", x, self.weight, self.eps)


class RMSNorm2d(NormBase):
    r"""RMS normalization over the channels at every position of an (N, C, H, W) input.

    .. math:: y_{n,:,h,w} = \frac{x_{n,:,h,w}}{\sqrt{\mathrm{E}_c[x_{n,:,h,w}^2] + \epsilon}} \gamma

    The mean of squares is per sample and position over C, accumulated in float32 (float64 for float64 input):
    torch.nn.RMSNorm(C) applied to the channels-last permutation, memory format kept. Paper: Zhang &
    Sennrich, 2019, "Root Mean Square Layer Normalization", arXiv 1910.07467.

    Args:
        num_features: C, the number of channels.
        eps: added to the mean of squares. Must be > 0.
        affine: learn a per-channel scale (weight).
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input of the wrong rank or channel count, or num_features <= 0 or eps <= 0.

    Note:
        Training and eval compute the same thing: the statistics are each sample's own, nothing is tracked. For
        transformer tokens (N, L, C) use torch.nn.RMSNorm, which normalizes the last dimension.

    Example:
        >>> import torch
        >>> from normlab.layers.layer_norm import RMSNorm2d
        >>> y = RMSNorm2d(8)(torch.randn(2, 8, 4, 4))
        >>> bool((y.square().mean(1) - 1).abs().max() < 1e-4)
        True
    """

    _input_dims = (4,)

    def __init__(self, num_features: int, *, eps: float = 1e-6, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_features, eps=eps, affine=affine, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("rms_norm2d", x, self.weight, self.eps)
