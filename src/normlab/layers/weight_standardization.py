"""StdConv2d and ScaledStdConv2d: convolutions whose weight is standardized per output channel at every forward."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import kernels
from ..functional._checks import check_positive_float

__all__ = ["StdConv2d", "ScaledStdConv2d"]


class StdConv2d(nn.Conv2d):
    r"""A Conv2d with weight standardization (WS).

    .. math:: \hat W_o = \frac{W_o - \mathrm{E}[W_o]}{\sqrt{\mathrm{Var}[W_o] + \epsilon}}, \qquad
              y = \hat W \star x + b

    Mean and biased variance are per output channel :math:`o` over its fan-in (C_in / groups, kH, kW), recomputed
    from the stored ``weight`` at every forward (gradients flow through the standardization). Paper: Qiao, Wang,
    Liu, Shen & Yuille, 2019, "Micro-Batch Training with Batch-Channel Normalization and Weight Standardization",
    arXiv 1903.10520. Usually paired with GroupNorm (as in BiT / timm's ResNetV2).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode: as
            torch.nn.Conv2d.
        eps: added to the weight variance. Must be > 0.
        device, dtype: of the parameters.

    Shape:
        Input (N, C_in, H, W), output (N, C_out, H_out, W_out), as torch.nn.Conv2d.

    Raises:
        ValueError: if eps <= 0 (plus torch.nn.Conv2d's own argument checks).

    Note:
        No running statistics and no batch dependence: training and eval are identical. A filter with a single
        fan-in element (a depthwise 1x1 conv) has zero variance and standardizes to zero.

    Example:
        >>> import torch
        >>> from normlab.layers.weight_standardization import StdConv2d
        >>> conv = StdConv2d(3, 8, 3, padding=1)
        >>> tuple(conv(torch.randn(2, 3, 5, 5)).shape)
        (2, 8, 5, 5)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ) -> None:
        eps = check_positive_float(type(self).__name__, "eps", eps)
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses."""
        return kernels.call("standardize_weight", self.weight, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class ScaledStdConv2d(StdConv2d):
    r"""A Conv2d with NF-Nets' scaled weight standardization and a learned per-output-channel gain.

    .. math:: \hat W_o = g_o \frac{\gamma}{\sqrt{N}} \frac{W_o - \mathrm{E}[W_o]}{\sqrt{\mathrm{Var}[W_o] + \epsilon}},
              \qquad y = \hat W \star x + b

    with :math:`N` = fan-in = C_in / groups * kH * kW, so each output channel's effective weight has L2 norm
    :math:`\gamma g_o \sqrt{\mathrm{Var}[W_o] / (\mathrm{Var}[W_o] + \epsilon)} \approx \gamma g_o`: a
    variance-preserving layer for unit-variance inputs when :math:`\gamma` is the activation's gain. Paper: Brock,
    De, Smith & Simonyan, 2021, "High-Performance Large-Scale Image Recognition Without Normalization",
    arXiv 2101.08692 (the eps-inside-the-root form follows timm's ScaledStdConv2d).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode: as
            torch.nn.Conv2d.
        gamma: the constant :math:`\gamma` (e.g. about 1.714 for ReLU in NF-Nets). Must be > 0.
        eps: added to the weight variance. Must be > 0.
        gain_init: initial value of the learned ``gain`` (out_channels,). Must be finite.
        device, dtype: of the parameters.

    Shape:
        Input (N, C_in, H, W), output (N, C_out, H_out, W_out), as torch.nn.Conv2d.

    Raises:
        ValueError: if eps <= 0, gamma <= 0 or gain_init is not finite (plus torch.nn.Conv2d's own checks).

    Note:
        No running statistics and no batch dependence: training and eval are identical.

    Example:
        >>> import torch
        >>> from normlab.layers.weight_standardization import ScaledStdConv2d
        >>> conv = ScaledStdConv2d(3, 8, 3, gamma=2.0)
        >>> norms = torch.linalg.vector_norm(conv.standardized_weight(), dim=(1, 2, 3))
        >>> bool((norms - 2.0).abs().max() < 1e-3)  # eps makes it slightly smaller
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        gamma = check_positive_float(owner, "gamma", gamma)
        if isinstance(gain_init, bool) or not isinstance(gain_init, (int, float)) or not math.isfinite(gain_init):
            raise ValueError(f"{owner}: gain_init={gain_init!r} must be a finite number")
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            eps=eps,
            device=device,
            dtype=dtype,
        )
        self.gamma = gamma
        self.gain_init = float(gain_init)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.gain = nn.Parameter(torch.full((out_channels,), self.gain_init, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        """torch.nn.Conv2d's init for weight and bias; gain = gain_init."""
        super().reset_parameters()
        if getattr(self, "gain", None) is not None:
            nn.init.constant_(self.gain, self.gain_init)

    def standardized_weight(self) -> torch.Tensor:
        """The weight the convolution uses."""
        return kernels.call("standardize_weight", self.weight, self.eps, self.gain, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"
