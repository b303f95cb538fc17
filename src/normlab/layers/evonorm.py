"""EvoNorm2dB0 (batch dependent) and EvoNorm2dS0 (batch independent) normalization-activation layers."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..functional._checks import check_batch_has_values, check_divides, check_positive_int
from ._base import NormBase, RunningStatsNormBase

__all__ = ["EvoNorm2dB0", "EvoNorm2dS0"]


def _make_v(module: nn.Module, enabled: bool, num_features: int, factory: dict) -> None:
    if enabled:
        module.v = nn.Parameter(torch.ones(num_features, **factory))
    else:
        module.register_parameter("v", None)


class EvoNorm2dB0(RunningStatsNormBase):
    r"""EvoNorm-B0 over a 4D input: batch norm and a learned nonlinearity in one layer.

    .. math::
        y = \frac{x}{\max\big(\sqrt{s^2_b + \epsilon},\ v x + \sqrt{s^2_i + \epsilon}\big)} \gamma + \beta

    :math:`s^2_b` is the per-channel variance over (N, H, W) (the batch's in training, ``running_var`` in eval),
    :math:`s^2_i` the variance of each (sample, channel) over (H, W). Paper: Liu, Brock, Simonyan & Le, 2020,
    "Evolving Normalization-Activation Layers", arXiv 2004.02967. It replaces a BatchNorm2d followed by a ReLU.

    ``nonlinearity=False`` drops ``v`` and the layer is exactly BatchNorm2d (mean subtracted, batch statistics in
    training, running statistics in eval). The authors' TensorFlow code and timm apply only :math:`\gamma x + \beta`
    in that case; normlab keeps it a normalization so it can stand in for a BatchNorm without a ReLU.

    Buffers are BatchNorm's (``running_mean``, ``running_var``, ``num_batches_tracked``); ``running_mean`` is
    updated in training even though only the nonlinearity=False variant reads it, so a torch.nn.BatchNorm2d
    state_dict loads (strictly when ``nonlinearity=False``; otherwise ``v`` is missing and keeps its init).

    Args:
        num_features: C, the number of channels.
        eps: added to both variances. Must be > 0.
        momentum: PyTorch convention, ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
            batch variance; None is the cumulative average. Keras/Flax momentum 0.9 equals PyTorch momentum 0.1.
        nonlinearity: learn the per-channel ``v`` (ones) of the B0 nonlinearity; otherwise ``v`` is None.
        affine: learn a per-channel scale (weight, ones) and shift (bias, zeros).
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input that is not 4D or has the wrong channel count, on one value per channel in
            training, or on an invalid argument (num_features <= 0, eps <= 0, momentum outside [0, 1]).

    Note:
        Training uses (and records) the batch variance; eval uses ``running_var``, so, like BatchNorm, the layer
        behaves differently at small batches and between modes. EvoNorm2dS0 is the batch-independent sibling.

    Example:
        >>> import torch
        >>> from normlab.layers.evonorm import EvoNorm2dB0
        >>> norm = EvoNorm2dB0(3)
        >>> y = norm(torch.randn(4, 3, 5, 5))
        >>> tuple(y.shape), int(norm.num_batches_tracked)
        ((4, 3, 5, 5), 1)
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        nonlinearity: bool = True,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, device=device, dtype=dtype)
        self.nonlinearity = bool(nonlinearity)
        _make_v(self, self.nonlinearity, self.num_features, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0, v = 1."""
        super().reset_parameters()
        if getattr(self, "v", None) is not None:
            nn.init.ones_(self.v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training:
            check_batch_has_values(type(self).__name__, x)
        update = self._updates_running_stats()
        momentum = self._momentum_factor() if update else 0.0
        y = kernels.call(
            "evonorm_b0",
            x,
            self.running_var,
            self.weight,
            self.bias,
            self.v,
            self.training,
            momentum,
            self.eps,
            running_mean=self.running_mean,
        )
        if update:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity}"


class EvoNorm2dS0(NormBase):
    r"""EvoNorm-S0 over a 4D input: a SiLU-like gate divided by the group standard deviation; batch independent.

    .. math:: y = \frac{x \, \sigma(v x)}{\sqrt{s^2_g + \epsilon}} \gamma + \beta

    :math:`s^2_g` is the variance of each sample over the C/G channels of its group and (H, W); :math:`\sigma` is
    the logistic sigmoid. Paper: Liu, Brock, Simonyan & Le, 2020, "Evolving Normalization-Activation Layers",
    arXiv 2004.02967. It replaces a GroupNorm (or BatchNorm) followed by a ReLU/SiLU.

    ``nonlinearity=False`` drops ``v`` and the layer is exactly GroupNorm (mean subtracted). The authors'
    TensorFlow code and timm apply only :math:`\gamma x + \beta` in that case.

    Args:
        num_features: C, the number of channels.
        num_groups: G, the number of channel groups; must divide C. Ignored when ``group_size`` is given. The
            default 32 (as in timm) rejects C that is not a multiple of 32: pass num_groups or group_size then.
        group_size: channels per group; if given, G = C // group_size and it must divide C.
        eps: added to the group variance. Must be > 0.
        nonlinearity: learn the per-channel ``v`` (ones) of the S0 nonlinearity; otherwise ``v`` is None.
        affine: learn a per-channel scale (weight, ones) and shift (bias, zeros).
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input that is not 4D or has the wrong channel count, or on an invalid argument
            (num_features <= 0, eps <= 0, num_groups or group_size not a positive divisor of num_features).

    Note:
        There are no running statistics: training and eval compute the same thing, at any batch size.

    Example:
        >>> import torch
        >>> from normlab.layers.evonorm import EvoNorm2dS0
        >>> norm = EvoNorm2dS0(8, num_groups=2)
        >>> tuple(norm(torch.randn(1, 8, 5, 5)).shape)
        (1, 8, 5, 5)
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int = 32,
        group_size: int | None = None,
        eps: float = 1e-5,
        nonlinearity: bool = True,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        owner = type(self).__name__
        if group_size is not None:
            check_positive_int(owner, "group_size", group_size)
            check_divides(owner, "group_size", group_size, "num_features", self.num_features)
            num_groups = self.num_features // group_size
        else:
            check_positive_int(owner, "num_groups", num_groups)
            check_divides(owner, "num_groups", num_groups, "num_features", self.num_features)
        self.num_groups = num_groups
        self.nonlinearity = bool(nonlinearity)
        _make_v(self, self.nonlinearity, self.num_features, {"device": device, "dtype": dtype})

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0, v = 1."""
        super().reset_parameters()
        if getattr(self, "v", None) is not None:
            nn.init.ones_(self.v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("evonorm_s0", x, self.num_groups, self.weight, self.bias, self.v, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_groups={self.num_groups}, nonlinearity={self.nonlinearity}"
