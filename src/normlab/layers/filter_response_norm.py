"""FilterResponseNorm2d: filter response normalization with the TLU activation."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ._base import NormBase

__all__ = ["FilterResponseNorm2d"]

# |eps_l| has no gradient at exactly 0 (d|t|/dt = sign(0) = 0), so a zero-initialized learned eps would never move.
_LEARNED_EPS_INIT = 1e-4


class FilterResponseNorm2d(NormBase):
    r"""Filter response normalization with a thresholded linear unit (FRN + TLU) over a 4D input.

    .. math::
        \nu^2 = \frac{1}{HW}\sum_{h,w} x_{nchw}^2, \qquad
        y = \max\Big(\gamma \frac{x}{\sqrt{\nu^2 + \epsilon + |\epsilon_l|}} + \beta,\ \tau\Big)

    :math:`\nu^2` is the mean square of each (sample, channel) over its spatial positions: no batch statistics and
    no mean subtraction. Paper: Singh & Krishnan, 2020, "Filter Response Normalization Layer: Eliminating Batch
    Dependence in the Training of Deep Neural Networks", arXiv 1911.09737. FRN replaces both the norm and the
    activation (ReLU) that follows it.

    Args:
        num_features: C, the number of channels.
        eps: constant added to :math:`\nu^2`. Must be > 0.
        learnable_eps: learn an extra per-channel :math:`|\epsilon_l|` (parameter ``eps_param``, initialized to
            1e-4 so that its absolute value has a gradient) as the paper advises for small spatial sizes;
            otherwise ``eps_param`` is None.
        tlu: apply the TLU :math:`\max(\cdot, \tau)` with a learned per-channel ``tau`` (zeros); otherwise ``tau`` is
            None and no activation is applied.
        affine: learn a per-channel scale (weight, ones) and shift (bias, zeros).
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input that is not 4D or has the wrong channel count, or on an invalid argument
            (num_features <= 0, eps <= 0).

    Note:
        There are no running statistics: training and eval compute the same thing, at any batch size.

    Example:
        >>> import torch
        >>> from normlab.layers.filter_response_norm import FilterResponseNorm2d
        >>> frn = FilterResponseNorm2d(3)
        >>> y = frn(torch.randn(1, 3, 8, 8))
        >>> tuple(y.shape), bool((y >= 0).all())  # tau = 0 at init: TLU acts as a ReLU
        ((1, 3, 8, 8), True)
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-6,
        learnable_eps: bool = False,
        tlu: bool = True,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.tlu = bool(tlu)
        self.learnable_eps = bool(learnable_eps)
        if self.tlu:
            self.tau = nn.Parameter(torch.zeros(self.num_features, **factory))
        else:
            self.register_parameter("tau", None)
        if self.learnable_eps:
            self.eps_param = nn.Parameter(torch.full((self.num_features,), _LEARNED_EPS_INIT, **factory))
        else:
            self.register_parameter("eps_param", None)

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0, tau = 0, eps_param = 1e-4."""
        super().reset_parameters()
        if getattr(self, "tau", None) is not None:
            nn.init.zeros_(self.tau)
        if getattr(self, "eps_param", None) is not None:
            nn.init.constant_(self.eps_param, _LEARNED_EPS_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("filter_response_norm", x, self.weight, self.bias, self.tau, self.eps, self.eps_param)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learnable_eps={self.learnable_eps}, tlu={self.tlu}"
