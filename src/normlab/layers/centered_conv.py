"""CenteredConv2d: a convolution with weight centralization, the partner of MovingAverageBatchNorm2d."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels

__all__ = ["CenteredConv2d"]


class CenteredConv2d(nn.Conv2d):
    r"""A Conv2d with weight centralization: each output channel's weight has its mean subtracted at every forward.

    .. math:: \hat W_o = W_o - \mathrm{E}[W_o], \qquad y = \hat W \star x + b

    The mean is per output channel :math:`o` over its fan-in (C_in / groups, kH, kW), recomputed from the stored
    ``weight`` at every forward, and gradients flow through the centering. If the input features that a filter
    sees share one mean, each output channel has zero mean. That lets
    :class:`~normlab.layers.mabn.MovingAverageBatchNorm2d` normalize by the second moment alone. Paper: Yan, Wan,
    Zhang, Zhang, Wei & Sun, 2020, "Towards Stabilizing Batch Statistics in Backward Propagation of Batch
    Normalization", arXiv 2001.06838 (the reference code's ``CenConv2d``).

    The arguments and defaults are torch.nn.Conv2d's, so the layer is a drop-in replacement. With a following MABN,
    pass ``bias=False``, as the reference code does: a bias moves the output's mean away from zero.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as torch.nn.Conv2d.

    Shape:
        Input (N, C_in, H, W), output (N, C_out, H_out, W_out), as torch.nn.Conv2d.

    Raises:
        ValueError: torch.nn.Conv2d's own argument checks.

    Note:
        No statistics and no batch dependence: training and eval are identical. A filter with a single fan-in
        element (a depthwise 1x1 conv) centers to zero.

    Example:
        >>> import torch
        >>> from normlab.layers.centered_conv import CenteredConv2d
        >>> conv = CenteredConv2d(3, 8, 3, padding=1, bias=False)
        >>> bool(conv.centered_weight().mean((1, 2, 3)).abs().max() < 1e-6)
        True
    """

    def centered_weight(self) -> torch.Tensor:
        """The weight the convolution uses."""
        return kernels.call("center_weight", self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centered_weight(), self.bias)
