"""Recurrent batch normalization (Cooijmans, Ballas, Laurent, Gulcehre & Courville, 2017, "Recurrent Batch
Normalization", arXiv 1603.09025): batch normalization inside a recurrence, with statistics kept per time step.

A recurrent net's pre-activations have different distributions in the initial transient than in the steady state, so
averaging statistics over time hurts (the paper's Figure 5). Each time step therefore has its own batch statistics in
training and its own population statistics for eval: the running buffers are (max_steps, C), one row per step, and
steps at or beyond ``max_steps`` share the last row (the paper uses the statistics of T_max for every later step).
"""

from __future__ import annotations

import torch

from .batch_norm import batch_norm

__all__ = ["recurrent_batch_norm", "check_step", "step_slot"]


def check_step(owner: str, step) -> int:
    """Return ``step`` if it is a Python int >= 0, else raise ValueError.

    The step picks a row of the running buffers in Python, so it must be an int, not a tensor: torch.compile
    specializes on it (a sequence loop ``for t in range(T)`` unrolls with constant steps).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{owner}: step={step!r} must be a non-negative Python int (the time step)")
    return step


def step_slot(step: int, max_steps: int) -> int:
    """The row of the (max_steps, C) running buffers that time step ``step`` uses: steps beyond the last share it."""
    return min(step, max_steps - 1)


def recurrent_batch_norm(
    x: torch.Tensor,
    step: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch normalization of the activations of time step ``step``, with that step's statistics.

    .. math:: y_t = \frac{x_t - \mathrm{E}[x_t]}{\sqrt{\mathrm{Var}[x_t] + \epsilon}} \gamma + \beta

    In training the statistics are the batch's at this step, per feature over N; the row
    ``min(step, max_steps - 1)`` of the running buffers is updated in place (unbiased variance). In eval that row
    normalizes. :math:`\gamma` and :math:`\beta` are shared by all steps, as in the paper's BN-LSTM equations: only
    the statistics are per step. This is :func:`normlab.functional.batch_norm` applied with one row of the buffers.

    Args:
        x: activations of one time step, (N, C).
        step: the time step, a Python int >= 0 (torch.compile specializes on it).
        running_mean, running_var: (max_steps, C) buffers, or both None (batch statistics, nothing recorded).
        weight, bias: optional (C,) affine parameters, shared across steps.
        training: use (and record) batch statistics.
        momentum: PyTorch convention, weight of the new batch (Keras' 0.9 is PyTorch's 0.1).
        eps: added to the variance.

    Raises:
        ValueError: if ``step`` is not an int >= 0, or in training the batch has one sample.

    Example:
        >>> running_mean, running_var = torch.zeros(3, 4), torch.ones(3, 4)
        >>> y = recurrent_batch_norm(torch.randn(8, 4) + 5, 1, running_mean, running_var, training=True)
        >>> bool(running_mean[0].eq(0).all()), bool(running_mean[1].gt(0.3).all())
        (True, True)
    """
    check_step("recurrent_batch_norm", step)
    if running_mean is None or running_var is None:
        return batch_norm(x, None, None, weight, bias, training, momentum, eps)
    slot = step_slot(step, running_mean.shape[0])
    return batch_norm(x, running_mean[slot], running_var[slot], weight, bias, training, momentum, eps)
