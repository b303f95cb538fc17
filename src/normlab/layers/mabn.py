"""MovingAverageBatchNorm2d: Moving Average Batch Normalization (Yan et al., ICLR 2020, arXiv 2001.06838)."""

from __future__ import annotations

import torch

from .. import kernels
from ..functional._checks import check_batch_has_values, check_positive_int
from ..functional.mabn import check_mabn_args
from ._base import NormBase

__all__ = ["MovingAverageBatchNorm2d"]


class MovingAverageBatchNorm2d(NormBase):
    r"""Moving Average Batch Normalization (MABN) over a 4D input, for training with batches of one or two samples.

    .. math::
        \hat x = r \frac{x}{\sqrt{\bar\chi^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta, \qquad
        \frac{\partial L}{\partial x} = \frac{1}{\sqrt{\bar\chi^2 + \epsilon}}\left(r \frac{\partial L}{\partial
        \hat x} - \frac{x}{\sqrt{\bar\chi^2 + \epsilon}} \bar\Psi\right)

    Here :math:`\bar\chi^2` and :math:`\bar\Psi` are simple moving averages over the last ``buffer_size`` training
    batches of the per-channel second moment :math:`\mathrm{E}_B[x^2]` (forward) and of
    :math:`\Psi_B = \mathrm{E}_B[\hat x \, \partial L / \partial \hat x]` (backward). The input is not centered:
    pair the layer with a preceding :class:`~normlab.layers.centered_conv.CenteredConv2d`, as the paper does.
    :math:`r` renormalizes towards the EMA ``running_var`` (Batch Renorm's trick, clipped to [1/r_max, r_max], no
    gradient). Statistics are per channel over (N, H, W). See
    :func:`~normlab.functional.mabn.moving_average_batch_norm` for the full equations. Paper: Yan, Wan, Zhang,
    Zhang, Wei & Sun, 2020, "Towards Stabilizing Batch Statistics in Backward Propagation of Batch Normalization",
    arXiv 2001.06838. Code: github.com/megvii-model/MABN.

    Schedule, counted in training steps :math:`t` = ``num_batches_tracked`` after the step:

    * :math:`t \le \max(\text{warmup\_iters}, \text{buffer\_size})`: batch statistics and the exact gradient
      (batch norm without centering). The windows fill meanwhile.
    * later: the moving averages in both passes.
    * :math:`t > \max(\text{renorm\_after}, \text{warmup\_iters})`: renormalization by r (before that r = 1).

    Buffers: ``running_var`` (C,), an EMA of the second moment (ones), ``num_batches_tracked`` (0),
    ``x2_window`` and ``psi_window`` (buffer_size, C) (zeros). The training forward writes x2_window and the
    backward writes psi_window. All of them are saved in the state_dict, so training resumes exactly.

    ``momentum``: the PyTorch convention, ``running_var = (1 - momentum) * running_var + momentum * chi_bar^2``.
    The default 0.02 is the reference code's ``momentum=0.98``, which is written the other way round (as in Keras).

    Defaults and where they come from: ``buffer_size=16`` (the paper's ImageNet setting, a normalization batch of 2
    averaged to an effective 32, and the reference code's default); ``warmup_iters=100``, ``momentum`` 0.98 in the
    reference's convention, ``r_max=5`` and ``renorm_after=1000``, all from the reference code, which hard-codes the
    last two; ``eps=1e-5`` as in the reference and torch.nn.BatchNorm2d.

    Args:
        num_features: C, the number of channels.
        eps: added to the second moments. Must be > 0.
        momentum: weight of the new statistic in the EMA ``running_var``, in [0, 1] (PyTorch convention).
        buffer_size: m, the number of recent batches in each simple moving average. Must be > 0.
        warmup_iters: training steps that use batch statistics, >= 0.
        r_max: clip of the renormalization factor, >= 1; 1 disables renormalization.
        renorm_after: training steps before renormalization starts, >= 0.
        affine: learn a per-channel scale (weight) and shift (bias).
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input of the wrong rank or channel count, on one value per channel in training, or on an
            invalid argument (num_features <= 0, eps <= 0, buffer_size <= 0, momentum outside [0, 1] or None,
            warmup_iters < 0, r_max < 1, renorm_after < 0).

    Note:
        Training uses (and updates) the moving averages. Eval computes
        :math:`y = \gamma x / \sqrt{\mathrm{running\_var} + \epsilon} + \beta`, a fixed per-channel affine map like
        batch norm's eval with a zero running mean, which folds into the preceding convolution, and changes no
        buffer. Only training steps that run a backward pass record :math:`\Psi`.

    Example:
        >>> import torch
        >>> from normlab.layers.mabn import MovingAverageBatchNorm2d
        >>> mabn = MovingAverageBatchNorm2d(3, buffer_size=4, warmup_iters=10)
        >>> y = mabn(torch.randn(2, 3, 5, 5, requires_grad=True))
        >>> y.sum().backward()
        >>> tuple(y.shape), int(mabn.num_batches_tracked), tuple(mabn.psi_window.shape)
        ((2, 3, 5, 5), 1, (4, 3))
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.02,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        r_max: float = 5.0,
        renorm_after: int = 1000,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        buffer_size = check_positive_int(owner, "buffer_size", buffer_size)
        momentum, warmup_iters, r_max, renorm_after = check_mabn_args(
            owner, momentum, warmup_iters, r_max, renorm_after
        )
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.momentum = momentum
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.r_max = r_max
        self.renorm_after = renorm_after
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_var", torch.ones(self.num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("x2_window", torch.zeros(buffer_size, self.num_features, **factory))
        self.register_buffer("psi_window", torch.zeros(buffer_size, self.num_features, **factory))

    def reset_running_stats(self) -> None:
        """running_var = 1, num_batches_tracked = 0, both windows = 0: the next step starts the warm-up again."""
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()
        self.x2_window.zero_()
        self.psi_window.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training:
            check_batch_has_values(type(self).__name__, x)
        return kernels.call(
            "moving_average_batch_norm",
            x,
            self.running_var,
            self.x2_window,
            self.psi_window,
            self.num_batches_tracked,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
            warmup_iters=self.warmup_iters,
            r_max=self.r_max,
            renorm_after=self.renorm_after,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, buffer_size={self.buffer_size}, "
            f"warmup_iters={self.warmup_iters}, r_max={self.r_max}, renorm_after={self.renorm_after}"
        )
