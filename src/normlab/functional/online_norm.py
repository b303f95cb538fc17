r"""Online Normalization (Chiley et al., 2019, "Online Normalization for Training Neural Networks", NeurIPS,
arXiv 1905.05894): batch-free normalization with running statistics in the forward pass and a control process
that normalizes the gradient in the backward pass.

Per feature (channel) c and sample t, with :math:`\mu(x_t)`, :math:`\sigma^2(x_t)` the sample's own mean and
biased variance over its spatial positions (a plain value and 0 for an (N, C) input):

.. math::

    y_t &= (x_t - \mu_{t-1}) / \sqrt{\sigma^2_{t-1} + \epsilon} \\
    \mu_t &= \alpha_f \mu_{t-1} + (1 - \alpha_f) \mu(x_t) \\
    \sigma^2_t &= \alpha_f \sigma^2_{t-1} + (1 - \alpha_f) \sigma^2(x_t)
                  + \alpha_f (1 - \alpha_f) (\mu(x_t) - \mu_{t-1})^2

and, given the output gradient :math:`y'_t`, with the control variables :math:`\varepsilon^{(y)}`,
:math:`\varepsilon^{(1)}` (``control_proj``, ``control_mean``; the authors' ``v`` and ``u``):

.. math::

    \tilde{x}'_t &= y'_t - (1 - \alpha_b) \varepsilon^{(y)}_{t-1} y_t \\
    \varepsilon^{(y)}_t &= \varepsilon^{(y)}_{t-1} + \mu(\tilde{x}'_t y_t) \\
    x'_t &= \tilde{x}'_t / \sqrt{\sigma^2_{t-1} + \epsilon} - (1 - \alpha_b) \varepsilon^{(1)}_{t-1} \\
    \varepsilon^{(1)}_t &= \varepsilon^{(1)}_{t-1} + \mu(x'_t)

:math:`(1 - \alpha_b) \varepsilon^{(y)}` and :math:`(1 - \alpha_b) \varepsilon^{(1)}` track exponential averages of
the gradient's projection on :math:`y` and of its mean; subtracting them makes the back-propagated gradient
orthogonal to :math:`y` and zero-mean over the stream (the accumulators stay bounded, so their per-step increments
average to 0), which is what the exact gradient of a normalization with the true statistics satisfies.

Mini-batches follow the authors' implementation (Cerebras ``online-normalization``, ``norm_fwd``/``norm_bwd``):
the N samples of a batch are a stream in batch order. Sample i is normalized with the statistics after samples
0..i-1 of the batch (the first with the state the batch found), and the backward pass runs the control process
over the samples in the same order. A batch of N is therefore exactly N consecutive steps of batch size 1.

The recurrences are evaluated as first-order linear scans (Hillis-Steele, log2(N) vectorized steps) instead of a
Python loop over samples, so the cost is O(N log N) elementwise work and torch.compile traces a small graph. The
number of steps is ceil(log2 N): under torch.compile a dynamic batch size recompiles when it crosses a power of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_decay, check_positive_float
from ._stats import accumulation_dtype, affine, var_mean

__all__ = ["online_norm", "layer_scale"]


def _linear_scan(coeff: torch.Tensor, inc: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """Every state of ``h[i + 1] = coeff[i] * h[i] + inc[i]`` over dim 0, starting at ``h[0] = h0``.

    Args:
        coeff, inc: (N, C) (``coeff`` may broadcast, e.g. a 0-dim tensor).
        h0: (C,).

    Returns:
        (N + 1, C): ``h[0] = h0`` through ``h[N]``.
    """
    # Each step is the affine map h -> a * h + b; composing a prefix of them is associative, so an inclusive
    # Hillis-Steele scan gives every prefix in ceil(log2 N) rounds: (a2, b2) after (a1, b1) = (a2 a1, a2 b1 + b2).
    # The earlier partner of each row is the row ``shift`` above, the identity map (1, 0) where there is none.
    # Padding, then cutting to N rows, never forms a tensor of N - shift rows: that is size 1 for some N, and
    # torch.compile would specialize a dynamic batch size to it.
    a = coeff.expand_as(inc)
    b = inc
    n = inc.shape[0]
    shift = 1
    while shift < n:
        b = a * F.pad(b, (0, 0, shift, 0))[:n] + b
        a = a * F.pad(a, (0, 0, shift, 0), value=1.0)[:n]
        shift *= 2
    return torch.cat([h0.unsqueeze(0), a * h0 + b])


def _batch_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View an (N, C) tensor so it broadcasts against an (N, C, *) tensor of ``ndim`` dimensions."""
    return t.reshape(t.shape + (1,) * (ndim - 2))


def _forward_states(
    mean: torch.Tensor, var: torch.Tensor, mu0: torch.Tensor, var0: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running (mean, variance) before each sample and after the last: two (N + 1, C) tensors.

    ``mean``/``var`` are the samples' own (N, C) statistics. The mean is scanned as an offset from ``mu0`` (the
    update form ``mu += (1 - alpha) (m - mu)``), so a large common offset cancels before any accumulation.
    """
    decay = mean.new_tensor(alpha)
    offset = mean - mu0
    shift = _linear_scan(decay, (1 - alpha) * offset, torch.zeros_like(mu0))
    surprise = offset - shift[:-1]  # mu(x_t) - mu_{t-1}
    var_inc = (1 - alpha) * var + alpha * (1 - alpha) * surprise.square()
    # Both results end in a cat (as _linear_scan does) rather than in an add on ``mu0``: torch.compile's
    # partitioner may recompute cheap pointwise ops in the backward, and an add reading the state buffer would
    # then read it after this forward updated it in place (pytorch/pytorch PR 197039). cat is never recomputed.
    return torch.cat([mu0.unsqueeze(0), mu0 + shift[1:]]), _linear_scan(decay, var_inc, var0)


class _OnlineNormalize(torch.autograd.Function):
    """``y = (x - center) / scale`` with per-sample (N, C, 1...) ``center``/``scale``; the backward pass is the
    paper's control process, which updates ``control_mean`` and ``control_proj`` in place."""

    @staticmethod
    def forward(ctx, x, center, scale, control_mean, control_proj, alpha_bkw):
        y = (x - center) / scale
        ctx.save_for_backward(y, scale)
        ctx.controls = (control_mean, control_proj)
        ctx.alpha_bkw = alpha_bkw
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        y, scale = ctx.saved_tensors
        control_mean, control_proj = ctx.controls
        beta = ctx.alpha_bkw
        dims = tuple(range(2, y.dim()))
        acc = y.dtype
        grad_y = grad_y.to(acc)
        proj = _linear_scan(1 - (1 - beta) * y.square().mean(dims), (grad_y * y).mean(dims), control_proj.to(acc))
        grad_tilde = (grad_y - (1 - beta) * _batch_view(proj[:-1], y.dim()) * y) / scale
        mean = _linear_scan(grad_y.new_tensor(beta), grad_tilde.mean(dims), control_mean.to(acc))
        grad_x = grad_tilde - (1 - beta) * _batch_view(mean[:-1], y.dim())
        with torch.no_grad():
            control_proj.copy_(proj[-1])
            control_mean.copy_(mean[-1])
        return grad_x, None, None, None, None, None


def layer_scale(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""The paper's layer scaling: divide each sample by its root mean square over all features.

    .. math:: z = \frac{h}{\sqrt{\mathrm{E}_{c,*}[h^2] + \epsilon}}

    Plain autograd (this is an ordinary per-sample function). Computed in ``x``'s dtype; callers pass float32/64.
    """
    dims = tuple(range(1, x.dim()))
    return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)


def online_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    control_mean: torch.Tensor,
    control_proj: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    training: bool = True,
    layer_scaling: bool = True,
) -> torch.Tensor:
    r"""Online Normalization (Chiley et al., 2019, arXiv 1905.05894), optionally with layer scaling.

    .. math::

        y_t = \frac{x_t - \mu_{t-1}}{\sqrt{\sigma^2_{t-1} + \epsilon}}, \qquad
        h_t = \gamma y_t + \beta, \qquad
        z_t = \frac{h_t}{\sqrt{\mathrm{E}_{c,*}[h_t^2] + \epsilon}} \ \text{(layer scaling)}

    with the running statistics updated after every sample (decay ``alpha_fwd``) and the gradient of :math:`y`
    replaced by the paper's control process (decay ``alpha_bkw``): its projection on :math:`y` and its mean are
    removed using the accumulators ``control_proj`` (:math:`\varepsilon^{(y)}`) and ``control_mean``
    (:math:`\varepsilon^{(1)}`). The full recurrences are in this module's docstring. Statistics are per channel
    (dim 1); for (N, C, *) inputs each sample contributes its own mean and variance over the spatial positions, as
    in the paper's convolutional version.

    Mini-batches (the authors' rule): the N samples are consecutive steps of the stream in batch order. Sample i
    is normalized with the statistics after samples 0..i-1; the backward pass runs the control process in the same
    order. So a batch of N equals N calls with batch size 1.

    Args:
        x: input (N, C) or (N, C, *).
        running_mean, running_var: (C,) state :math:`\mu`, :math:`\sigma^2`; updated in place when training.
        control_mean, control_proj: (C,) backward accumulators :math:`\varepsilon^{(1)}`, :math:`\varepsilon^{(y)}`
            (the authors' ``u``, ``v``; start at 0); updated in place by the backward pass when training.
        weight, bias: optional (C,) affine parameters, applied before layer scaling (the authors' order).
        alpha_fwd: decay of the forward statistics, in [0, 1).
        alpha_bkw: decay of the backward control process, in [0, 1).
        eps: added to the running variance, and to the mean square in layer scaling.
        training: update the statistics and use the control process in the backward pass. Otherwise every sample
            is normalized with the given state, nothing is updated, and the gradient is the plain derivative of
            that fixed affine map.
        layer_scaling: divide each sample's output by its RMS over all features (the paper's guard against
            compounding estimation errors, used in its experiments).

    Returns:
        The output, with ``x``'s shape, dtype and memory format. Computation is in float32 (float64 for float64
        input); the state keeps its own dtype.

    Raises:
        ValueError: if ``alpha_fwd`` or ``alpha_bkw`` is outside [0, 1) or ``eps`` <= 0.

    Note:
        Training and eval normalize the same way: a sample sees the state as it stands before it. Eval does not
        advance the state, so for a batch of one (or the first sample of a batch) both give the same output.
        The training gradient is the control-process estimate, not the derivative of the forward map; the
        backward pass may run at most once per forward (it updates the accumulators).

    Example:
        >>> mu, var, u, v = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3)
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> y = online_norm(x, mu, var, u, v, alpha_fwd=0.5, layer_scaling=False)
        >>> [round(t, 3) for t in y[0].tolist()], mu.tolist(), var.tolist()
        ([1.0, 2.0, 3.0], [0.5, 1.0, 1.5], [0.75, 1.5, 2.75])
    """
    check_decay("online_norm", "alpha_fwd", alpha_fwd)
    check_decay("online_norm", "alpha_bkw", alpha_bkw)
    check_positive_float("online_norm", "eps", eps)
    acc = accumulation_dtype(x.dtype)
    xs = x if x.dim() > 2 else x.unsqueeze(-1)
    mu0 = running_mean.to(acc)
    var0 = running_var.to(acc)
    if training:
        with torch.no_grad():
            sample_var, sample_mean = var_mean(xs.detach(), range(2, xs.dim()))
            mu, var = _forward_states(sample_mean.flatten(1), sample_var.flatten(1), mu0, var0, alpha_fwd)
            running_mean.copy_(mu[-1])
            running_var.copy_(var[-1])
            center = _batch_view(mu[:-1], xs.dim())
            scale = _batch_view(torch.sqrt(var[:-1] + eps), xs.dim())
        y = _OnlineNormalize.apply(xs.to(acc), center, scale, control_mean, control_proj, alpha_bkw)
    else:
        y = (xs.to(acc) - _batch_view(mu0.unsqueeze(0), xs.dim())) * _batch_view(
            torch.rsqrt(var0 + eps).unsqueeze(0), xs.dim()
        )
    out = affine(y, weight, bias)
    if layer_scaling:
        out = layer_scale(out, eps)
    if x.dim() == 2:
        out = out.squeeze(-1)
    return out.to(x.dtype)
