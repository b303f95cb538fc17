"""RecurrentBatchNorm1d: batch normalization with per-time-step statistics for recurrent cells (BN-LSTM)."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..functional._checks import check_batch_has_values, check_momentum, check_positive_float, check_positive_int
from ..functional.recurrent_batch_norm import check_step, step_slot
from ._base import NormBase

__all__ = ["RecurrentBatchNorm1d"]


class RecurrentBatchNorm1d(NormBase):
    r"""Batch normalization of one time step's (N, C) activations with statistics kept per time step.

    .. math:: y_t = \frac{x_t - \mathrm{E}[x_t]}{\sqrt{\mathrm{Var}[x_t] + \epsilon}} \gamma + \beta

    Paper: Cooijmans, Ballas, Laurent, Gulcehre & Courville, 2017, "Recurrent Batch Normalization", arXiv
    1603.09025. Call it as ``bn(x, step)`` at every step of a recurrence. Each step has its own batch statistics in
    training and its own running statistics (row ``step`` of the (max_steps, C) buffers ``running_mean`` and
    ``running_var``; ``num_batches_tracked`` counts per step). Steps at or beyond ``max_steps`` use the last row,
    the paper's rule for sequences longer than the longest seen in training (activations reach a steady state).

    :math:`\gamma` and :math:`\beta` are shared across steps: the paper's BN-LSTM equations give them no time index,
    only the statistics differ by step. :math:`\gamma` starts at 0.1 (``weight_init``), the paper's recommendation:
    with :math:`\gamma = 1` the tanh/sigmoid units saturate and gradients vanish through time. In the paper's BN-LSTM
    :math:`\beta` is fixed at 0 for the input and recurrent terms because the LSTM bias already shifts them; here it
    starts at 0 and stays learnable (harmlessly redundant there, needed for the cell-state term).

    Args:
        num_features: C, the number of features.
        max_steps: number of per-step statistics rows (T_max, the longest training sequence). Must be > 0.
        eps: added to the variance. Must be > 0.
        momentum: PyTorch convention, ``running = (1 - momentum) * running + momentum * batch``, per step; None is
            the cumulative average per step. Keras/Flax momentum 0.9 equals PyTorch momentum 0.1.
        affine: learn the shared scale (weight) and shift (bias).
        weight_init: initial value of the scale :math:`\gamma` (0.1 as in the paper). Must be > 0.
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: (N, C). ``step``: a Python int >= 0; torch.compile specializes on it (a loop
        ``for t in range(T)`` unrolls with constant steps), so it cannot be a tensor.

    Raises:
        ValueError: on an input that is not 2-D or has the wrong C, a step that is not an int >= 0, one sample in
            training, or an invalid argument (num_features, max_steps <= 0, eps <= 0, momentum outside [0, 1]).

    Note:
        Training uses the batch's statistics at this step and updates row ``min(step, max_steps - 1)`` of the running
        buffers; eval normalizes with that row. Rows of steps never seen in training keep mean 0 / variance 1.

    Example:
        >>> import torch
        >>> from normlab.layers.recurrent_batch_norm import RecurrentBatchNorm1d
        >>> bn = RecurrentBatchNorm1d(4, max_steps=3)
        >>> ys = [bn(torch.randn(8, 4) + t, step=t) for t in range(5)]
        >>> bn.num_batches_tracked.tolist(), round(bn.weight.detach()[0].item(), 6)
        ([1, 1, 3], 0.1)
    """

    _input_dims = (2,)

    def __init__(
        self,
        num_features: int,
        *,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        weight_init: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        # set before NormBase.__init__, which calls reset_parameters
        self.weight_init = check_positive_float(owner, "weight_init", weight_init)
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.max_steps = check_positive_int(owner, "max_steps", max_steps)
        self.momentum = check_momentum(owner, momentum)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(self.max_steps, self.num_features, **factory))
        self.register_buffer("running_var", torch.ones(self.max_steps, self.num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.zeros(self.max_steps, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        """weight = weight_init (0.1), bias = 0."""
        if self.weight is not None:
            nn.init.constant_(self.weight, self.weight_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reset_running_stats(self) -> None:
        """Every step's running_mean = 0, running_var = 1, num_batches_tracked = 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        owner = type(self).__name__
        self._check_input(x)
        check_step(owner, step)
        slot = step_slot(step, self.max_steps)
        momentum = 0.0
        if self.training:
            check_batch_has_values(owner, x)
            momentum = self._momentum_factor(slot)
        y = kernels.call(
            "recurrent_batch_norm",
            x,
            step,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            momentum,
            self.eps,
        )
        if self.training:
            self.num_batches_tracked[slot] += 1
        return y

    def _momentum_factor(self, slot: int) -> float:
        """Weight of the current batch in row ``slot``'s running average (the cumulative one when momentum is None)."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked[slot] + 1)
        return self.momentum

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_steps={self.max_steps}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, weight_init={self.weight_init}"
        )
