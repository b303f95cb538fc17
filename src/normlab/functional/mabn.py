r"""Moving Average Batch Normalization (Yan, Wan, Zhang, Zhang, Wei & Sun, ICLR 2020, "Towards Stabilizing Batch
Statistics in Backward Propagation of Batch Normalization", arXiv 2001.06838) and weight centralization.

Batch norm uses four batch statistics. Two are in the forward pass: the mean and the variance. Two are in the
backward pass: :math:`g_B = \mathrm{E}_B[\partial L / \partial \hat x]` and
:math:`\Psi_B = \mathrm{E}_B[\hat x \, \partial L / \partial \hat x]`, in

.. math:: \frac{\partial L}{\partial x} = \frac{1}{\sigma_B}\left(\frac{\partial L}{\partial \hat x} - g_B
          - \hat x \, \Psi_B\right).

With batches of one or two samples all four are noisy. MABN does two things:

* It normalizes by the second moment :math:`\chi^2_B = \mathrm{E}_B[x^2]` alone, without subtracting the mean.
  This leaves one statistic in each pass (:math:`\chi` forward and :math:`\Psi` backward), since :math:`\mu_B` and
  :math:`g_B` drop out. A preceding convolution with centered weights (:func:`center_weight`) keeps the activations
  close to zero mean, so this loses little.
* It replaces each of the two with its simple moving average over the last ``m`` training batches.

The authors' reference implementation (github.com/megvii-model/MABN, ``MABN.py``) also renormalizes, as Batch
Renorm does, towards an exponential moving average that is then used for inference. This module follows it.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_batch_has_values, check_momentum
from ._stats import accumulation_dtype, affine, channel_view

__all__ = ["moving_average_batch_norm", "center_weight", "check_mabn_args"]


def _reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_mabn_args(owner: str, momentum, warmup_iters, r_max, renorm_after) -> tuple[float, int, float, int]:
    """Validate MABN's schedule and moving-average arguments (Python numbers). Returns them normalized.

    Raises:
        ValueError: naming the argument and the value, if momentum is not a number in [0, 1], warmup_iters or
            renorm_after is not an integer >= 0, or r_max is not a finite number >= 1.
    """
    if momentum is None:
        raise ValueError(
            f"{owner}: momentum=None is not supported (MABN keeps an exponential moving average); expected a number "
            "in [0, 1] in PyTorch's convention (the reference implementation's 0.98 is normlab's 0.02)"
        )
    momentum = check_momentum(owner, momentum)
    for name, value in (("warmup_iters", warmup_iters), ("renorm_after", renorm_after)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{owner}: {name}={value!r} must be an integer >= 0")
    if isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not math.isfinite(r_max) or r_max < 1:
        raise ValueError(f"{owner}: r_max={r_max!r} must be a finite number >= 1 (r is clipped to [1/r_max, r_max])")
    return momentum, warmup_iters, float(r_max), renorm_after


def _check_state(x: torch.Tensor, running_var, x2_window, psi_window, num_batches_tracked) -> None:
    """Training needs all of the state, each with the shape that the input's channel count implies."""
    state = {
        "running_var": running_var,
        "x2_window": x2_window,
        "psi_window": psi_window,
        "num_batches_tracked": num_batches_tracked,
    }
    missing = [name for name, t in state.items() if t is None]
    if missing:
        raise ValueError(
            f"moving_average_batch_norm: training needs running_var, x2_window, psi_window and num_batches_tracked; "
            f"got None for {', '.join(missing)}"
        )
    c = x.shape[1]
    if tuple(running_var.shape) != (c,):
        raise ValueError(
            f"moving_average_batch_norm: running_var has shape {tuple(running_var.shape)}, expected ({c},) for input "
            f"of shape {tuple(x.shape)}"
        )
    if x2_window.dim() != 2 or x2_window.shape[0] < 1 or x2_window.shape[1] != c:
        raise ValueError(
            f"moving_average_batch_norm: x2_window has shape {tuple(x2_window.shape)}, expected (buffer_size, {c}) "
            f"with buffer_size >= 1 for input of shape {tuple(x.shape)}"
        )
    if psi_window.shape != x2_window.shape:
        raise ValueError(
            f"moving_average_batch_norm: psi_window has shape {tuple(psi_window.shape)}, expected the shape of "
            f"x2_window {tuple(x2_window.shape)}"
        )
    if num_batches_tracked.numel() != 1 or num_batches_tracked.is_floating_point():
        raise ValueError(
            "moving_average_batch_norm: num_batches_tracked must be a one-element integer tensor, got "
            f"dtype={num_batches_tracked.dtype} shape={tuple(num_batches_tracked.shape)}"
        )


# The statistics that depend on the state are computed in an opaque custom op, so that torch.compile saves them for
# the backward. As plain ops, AOTAutograd's partitioner (torch 2.13, inductor) may recompute them in the backward
# from the buffers, which by then hold the *updated* values (the step count, the EMA), and the input gradient comes
# out wrong (see batch_renorm's correction for the same problem).
@torch.library.custom_op("normlab::mabn_statistics", mutates_args=())
def _mabn_statistics(
    x2: torch.Tensor,
    x2_window: torch.Tensor,
    running_var: torch.Tensor,
    step: torch.Tensor,
    eps: float,
    r_max: float,
    warmup_iters: int,
    renorm_after: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chi_bar^2, r, slot, use_average) for the training step after ``step`` earlier ones; nothing is mutated."""
    buffer_size = x2_window.shape[0]
    step = step.reshape(())
    slot = torch.remainder(step, buffer_size).reshape(1)
    window = x2_window.to(x2.dtype).index_copy(0, slot, x2.unsqueeze(0))
    use_average = step >= max(warmup_iters, buffer_size)
    x2_bar = torch.where(use_average, window.mean(0), x2)
    ratio = ((x2_bar + eps) / (running_var.to(x2.dtype) + eps)).sqrt()
    renormalize = step >= max(renorm_after, warmup_iters)
    r = torch.where(renormalize, ratio.clamp(1.0 / r_max, r_max), torch.ones_like(ratio))
    return x2_bar, r, slot, use_average


@_mabn_statistics.register_fake
def _(x2, x2_window, running_var, step, eps, r_max, warmup_iters, renorm_after):
    slot = torch.empty(1, dtype=step.dtype, device=step.device)
    use_average = torch.empty((), dtype=torch.bool, device=step.device)
    return torch.empty_like(x2), torch.empty_like(x2), slot, use_average


class _MovingAverageNormalize(torch.autograd.Function):
    r"""x -> x_hat = r x / sqrt(chi_bar^2 + eps): the forward and backward of MABN's training step, without affine.

    Forward: records the batch's second moment in the window, advances the EMA and the step count. Backward: records
    the batch's Psi in the window and uses the moving average of Psi in place of the batch's.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        running_var,
        x2_window,
        psi_window,
        num_batches_tracked,
        momentum,
        eps,
        warmup_iters,
        r_max,
        renorm_after,
    ):
        x2 = x.to(accumulation_dtype(x.dtype)).square().mean(_reduce_dims(x))
        x2_bar, r, slot, use_average = _mabn_statistics(
            x2, x2_window, running_var, num_batches_tracked, eps, r_max, warmup_iters, renorm_after
        )
        x2_window.index_copy_(0, slot, x2.to(x2_window.dtype).unsqueeze(0))
        running_var.lerp_(x2_bar.to(running_var.dtype), momentum)
        num_batches_tracked.add_(1)
        invstd = torch.rsqrt(x2_bar + eps)
        # the window is not a saved tensor: a second call's backward in the same graph writes it after this one's
        ctx.psi_window = psi_window
        ctx.save_for_backward(x, invstd, r, slot, use_average)
        return x.to(x2.dtype) * channel_view(invstd * r, x.dim())

    @staticmethod
    def backward(ctx, grad_xhat):
        x, invstd, r, slot, use_average = ctx.saved_tensors
        psi_window = ctx.psi_window
        dims = _reduce_dims(x)
        acc = invstd.dtype
        g = grad_xhat.to(acc)
        z = x.to(acc) * channel_view(invstd, x.dim())
        psi = (g * z).mean(dims) * r  # E_B[x_hat * dL/dx_hat], with x_hat = r z
        psi_window.index_copy_(0, slot, psi.to(psi_window.dtype).unsqueeze(0))
        psi_bar = torch.where(use_average, psi_window.to(acc).mean(0), psi)
        grad_x = (g * channel_view(r, x.dim()) - z * channel_view(psi_bar, x.dim())) * channel_view(invstd, x.dim())
        return grad_x.to(x.dtype), None, None, None, None, None, None, None, None, None


def moving_average_batch_norm(
    x: torch.Tensor,
    running_var: torch.Tensor | None,
    x2_window: torch.Tensor | None = None,
    psi_window: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.02,
    eps: float = 1e-5,
    *,
    warmup_iters: int = 100,
    r_max: float = 5.0,
    renorm_after: int = 1000,
) -> torch.Tensor:
    r"""Moving Average Batch Normalization (MABN), in its reduced form: no centering, one statistic per pass.

    Per channel over (N, *), at training step :math:`t` (1-based; ``num_batches_tracked`` is :math:`t - 1` on
    entry), with window length :math:`m` (``buffer_size``, the first dim of the windows) and
    :math:`K = \max(\text{warmup\_iters}, m)`:

    .. math::
        \chi^2_{B_t} = \mathrm{E}_B[x^2], \qquad
        \bar\chi^2_t = \begin{cases} \frac{1}{m}\sum_{s=0}^{m-1} \chi^2_{B_{t-s}} & t > K \\
                                      \chi^2_{B_t} & t \le K \end{cases}

        r_t = \mathrm{sg}\left(\mathrm{clip}_{[1/r_{max},\, r_{max}]}
              \sqrt{\frac{\bar\chi^2_t + \epsilon}{\hat\chi^2_{t-1} + \epsilon}}\right)
              \text{ if } t > \max(\text{renorm\_after}, \text{warmup\_iters}), \text{ else } 1

        \hat x = r_t \frac{x}{\sqrt{\bar\chi^2_t + \epsilon}}, \qquad y = \gamma \hat x + \beta, \qquad
        \hat\chi^2_t = (1 - \text{momentum})\, \hat\chi^2_{t-1} + \text{momentum}\, \bar\chi^2_t

    where :math:`\hat\chi^2` is ``running_var`` (an EMA of the second moment, not of the variance) and sg stops the
    gradient. The backward pass uses the moving average of :math:`\Psi` (window ``psi_window``, same switch at
    :math:`K`) in place of the batch's:

    .. math::
        \Psi_{B_t} = \mathrm{E}_B\left[\hat x \frac{\partial L}{\partial \hat x}\right], \qquad
        \frac{\partial L}{\partial x} = \frac{1}{\sqrt{\bar\chi^2_t + \epsilon}}
            \left(r_t \frac{\partial L}{\partial \hat x} - \frac{x}{\sqrt{\bar\chi^2_t + \epsilon}}\,
            \bar\Psi_t\right)

    For :math:`t \le K` (warm-up) this is the exact gradient of :math:`x / \sqrt{\mathrm{E}_B[x^2] + \epsilon}`,
    which is batch norm without centering (batch norm itself for inputs with zero batch mean). Paper: Yan, Wan,
    Zhang, Zhang, Wei & Sun, ICLR 2020, arXiv 2001.06838. The schedule (the switch at :math:`K`, the renormalization
    clip and its start) follows the authors' code, github.com/megvii-model/MABN, ``MABN.py``. That code switches to
    the moving averages at :math:`t \ge` warmup_iters, one step earlier than here.

    Statistics are computed in float32 (float64 for float64 input); the output has x's dtype and memory format.
    A mean of squares needs no centering, so it is free of the cancellation that a one-pass variance suffers.

    Args:
        x: input (N, C, *).
        running_var: (C,) EMA of the second moment. It normalizes in eval, and in training it is the target of the
            renormalization; updated in place in training. In eval, None normalizes with the batch's second moment.
        x2_window, psi_window: (m, C) windows of the last m batches' :math:`\chi^2_B` and :math:`\Psi_B`, written
            in place at slot ``(t - 1) % m``: x2_window in the forward, psi_window in the backward (a training
            forward without a backward leaves that slot of psi_window as it was).
        num_batches_tracked: 0-dim integer tensor, the number of training steps so far; incremented in place. All
            switches are computed from it as tensors, so torch.compile neither recompiles nor breaks the graph.
        weight, bias: optional (C,) affine parameters :math:`\gamma, \beta`.
        training: use and update the moving averages; otherwise normalize with ``running_var``.
        momentum: PyTorch convention, the weight of the new statistic in the EMA. The reference code's
            ``momentum=0.98`` is the weight of the old one, so it is 0.02 here.
        eps: added to the second moments.
        warmup_iters: training steps that use the batch's statistics (plain batch norm without centering).
        r_max: clip of the renormalization factor r, >= 1. 1 disables renormalization.
        renorm_after: r is 1 for the first max(renorm_after, warmup_iters) training steps.

    Returns:
        Tensor of x's shape, dtype and memory format.

    Raises:
        ValueError: in training, on a batch with one value per channel or missing or misshapen state; on invalid
            momentum, warmup_iters, r_max or renorm_after.

    Note:
        Training normalizes with the moving averages (after warm-up, rescaled towards the EMA by r) and updates
        every buffer. Eval computes :math:`y = \gamma x / \sqrt{\hat\chi^2 + \epsilon} + \beta`, the same
        per-channel affine map as a batch norm in eval, and leaves the state alone. While r is in force and not
        clipped, the training forward equals the eval forward with the running_var from before the step.

    Example:
        >>> c = 3
        >>> var, nbt = torch.ones(c), torch.zeros((), dtype=torch.long)
        >>> x2_window, psi_window = torch.zeros(4, c), torch.zeros(4, c)
        >>> x = torch.randn(2, c, 5, 5, requires_grad=True)
        >>> y = moving_average_batch_norm(x, var, x2_window, psi_window, nbt, training=True, warmup_iters=0)
        >>> y.sum().backward()
        >>> int(nbt), bool(y.square().mean((0, 2, 3)).sub(1).abs().max() < 1e-3)
        (1, True)
    """
    if not torch.compiler.is_compiling():
        # under torch.compile these may be symbolic numbers (after a recompilation for a new value), which the
        # checks cannot inspect; modules validate them once, at construction
        momentum, warmup_iters, r_max, renorm_after = check_mabn_args(
            "moving_average_batch_norm", momentum, warmup_iters, r_max, renorm_after
        )
    if training:
        check_batch_has_values("moving_average_batch_norm", x)
        _check_state(x, running_var, x2_window, psi_window, num_batches_tracked)
        xhat = _MovingAverageNormalize.apply(
            x,
            running_var,
            x2_window,
            psi_window,
            num_batches_tracked,
            momentum,
            eps,
            warmup_iters,
            r_max,
            renorm_after,
        )
    else:
        xf = x.to(accumulation_dtype(x.dtype))
        x2 = xf.square().mean(_reduce_dims(x)) if running_var is None else running_var.to(xf.dtype)
        xhat = xf * channel_view(torch.rsqrt(x2 + eps), x.dim())
    return affine(xhat, weight, bias).to(x.dtype)


def center_weight(weight: torch.Tensor) -> torch.Tensor:
    r"""Weight centralization: subtract from each output channel's weight its mean over the fan-in.

    .. math:: \hat W_o = W_o - \mathrm{E}[W_o]

    The mean is over all dims but 0 (C_in / groups, kH, kW for a conv weight), accumulated in float32 (float64 for
    float64 weights). A convolution with centered weights gives every output channel zero mean over the samples
    when its input features share one mean, which is what lets MABN normalize without centering. Paper: Yan et al.,
    ICLR 2020, arXiv 2001.06838 (its reference code's ``CenConv2d``).

    Args:
        weight: (C_out, *) weight.

    Returns:
        Tensor of weight's shape, dtype and memory format.

    Note:
        A stateless transform of the parameter: identical in training and eval. An output channel with a single
        fan-in element centers to zero.

    Example:
        >>> w = torch.randn(4, 3, 3, 3) + 2
        >>> bool(center_weight(w).mean((1, 2, 3)).abs().max() < 1e-6)
        True
    """
    wf = weight.to(accumulation_dtype(weight.dtype))
    return (wf - wf.mean(tuple(range(1, weight.dim())), keepdim=True)).to(weight.dtype)
