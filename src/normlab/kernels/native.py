"""torch's own ops behind normlab's functional signatures, for ops where torch computes exactly the same thing, and
a hand-derived autograd Function for FRN + TLU, which torch lacks: a few fused passes and a closed-form backward
instead of autograd's chain of a dozen elementwise ops (3.4x faster on CPU). EvoNorm-S0 got no faster that way (it
recomputes a sigmoid in its backward), so it keeps the reference.

Each function here has the signature of its namesake in normlab.functional and is tested against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as reference
from ..functional._checks import check_input
from ..functional._stats import accumulation_dtype, channel_view

__all__ = [
    "batch_norm",
    "filter_response_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "rms_norm",
    "rms_norm2d",
]


def _half_on_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def batch_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    process_group=None,
) -> torch.Tensor:
    """torch.nn.functional.batch_norm.

    Falls back to the reference for a process group (torch has no CPU sync) and for half-precision CPU inputs:
    torch's CPU kernel applies ``x * scale + shift`` in bfloat16, which cancels (a 2-value batch normalizes to
    0.95 / -1.05 instead of 1 / -1); the reference computes in float32 and rounds once.
    """
    if process_group is not None or _half_on_cpu(x):
        return reference.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, eps, process_group=process_group
        )
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of ``x`` that the reference's elementwise math carries over to its output."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _laid_out_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in the memory format of ``x`` (a no-op when it already is); under torch.compile ``y`` as it is, so that
    the compiled graph is the one torch's own layer gives (the compiler then chooses the layout)."""
    if torch.compiler.is_compiling():
        return y
    return y.contiguous(memory_format=_memory_format(x))


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """torch.nn.functional.group_norm, returned in the input's memory format; on the CPU, of a contiguous copy.

    torch's channels-last CPU kernel takes the variance as ``E[x^2] - E[x]^2``, which cancels at a large offset
    (float32 input with mean 1e4 and std 1 comes out with std ~300); its contiguous kernel is stable. Its
    channels-last CPU backward also crashes the process (segmentation fault, torch 2.13) when the input does not
    require grad and the affine does; the copy avoids that too. Other devices (torch's CUDA kernel makes its own
    contiguous copy) and torch.compile (which decomposes the op, and where the copies are passes of their own that
    torch's layer does not make) take the input as it is. A bias without a weight takes the reference: torch
    2.13's group_norm backward fails there ("tensor does not have a device").
    """
    if weight is None and bias is not None:
        return reference.group_norm(x, num_groups, weight, bias, eps)
    on_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    return _laid_out_like(F.group_norm(x.contiguous() if on_cpu else x, num_groups, weight, bias, eps), x)


def instance_norm(
    x: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """torch.nn.functional.instance_norm, returned in the input's memory format.

    torch computes it with its batch_norm kernel, so half-precision CPU inputs fall back to the reference for the
    reason given in :func:`batch_norm` (measured here: mean 100 std 1 in bfloat16 normalizes to means up to 0.35).
    """
    if _half_on_cpu(x):
        return reference.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    y = F.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    return _laid_out_like(y, x)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """:func:`group_norm` with one group, for every rank (also (N, C), which F.layer_norm would do).

    torch's CPU layer_norm backward sums the weight and bias gradients of half-precision inputs with 10-20%
    error (measured at 20000 x 8 in bfloat16); its group_norm does not.
    """
    return group_norm(x, 1, weight, bias, eps)


def layer_norm2d(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """torch.nn.functional.layer_norm over C of the channels-last permutation, returned in the input's format.

    Half-precision CPU inputs fall back to the reference: torch's CPU layer_norm backward sums the weight and bias
    gradients with 10-20% error there (measured at 16 x 8 x 56 x 56 in bfloat16).
    """
    if _half_on_cpu(x):
        return reference.layer_norm2d(x, weight, bias, eps)
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), weight, bias, eps).movedim(-1, 1)
    return _laid_out_like(y, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """torch.nn.functional.rms_norm over (C, *), the per-channel weight broadcast to (C, *) so bf16 rounds once."""
    if weight is not None:
        weight = weight.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[1:])
    return _laid_out_like(F.rms_norm(x, x.shape[1:], weight, eps), x)


def rms_norm2d(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """torch.nn.functional.rms_norm over C of the channels-last permutation, returned in the input's format."""
    y = F.rms_norm(x.movedim(1, -1), (x.shape[1],), weight, eps).movedim(-1, 1)
    return _laid_out_like(y, x)


# ---- composite ops with a hand-derived backward ---------------------------------------------------------------------


def _grad_for(p: torch.Tensor | None, needed: bool, value: torch.Tensor) -> torch.Tensor | None:
    """``value`` as the gradient of parameter ``p`` (its shape and dtype), or None where it has none."""
    return value.reshape(p.shape).to(p.dtype) if p is not None and needed else None


class _FilterResponseNorm(torch.autograd.Function):
    r"""FRN + TLU with a closed-form backward; saves ``x`` and ``r`` (one value per (sample, channel)).

    Per (sample, channel), over the :math:`S` spatial positions, with :math:`e = \epsilon + |\epsilon_l|`:

    .. math::
        r = (\nu^2 + e)^{-1/2},\quad \nu^2 = \tfrac{1}{S}\textstyle\sum_s x_s^2,\quad
        z_s = \gamma r x_s + \beta,\quad y_s = \max(z_s, \tau)

    Backward, with :math:`g = \partial L / \partial y`:

    * TLU: torch.maximum splits the gradient of a tie evenly, so
      :math:`g^z_s = g_s \, (1 + \mathrm{sign}(z_s - \tau)) / 2` and :math:`\partial L/\partial\tau = \sum g - g^z`.
    * Affine: :math:`\partial L/\partial\beta = \sum_{n,s} g^z_s`; with :math:`a = \sum_s g^z_s x_s` per
      (n, c), :math:`\partial L/\partial\gamma = \sum_n r a`.
    * Normalization: :math:`\partial r/\partial\nu^2 = \partial r/\partial e = -\tfrac12 r^3` and
      :math:`\partial\nu^2/\partial x_s = 2x_s/S`, so
      :math:`\partial L/\partial x_s = \gamma r g^z_s - \gamma r^3 a\, x_s / S` and
      :math:`\partial L/\partial\epsilon_l = \mathrm{sign}(\epsilon_l) \sum_n (-\tfrac12 \gamma r^3 a)`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, tau, eps, learned_eps):
        acc = accumulation_dtype(x.dtype)
        ndim, dims = x.dim(), tuple(range(2, x.dim()))
        xf = x.to(acc)
        nu2 = xf.square().mean(dim=dims, keepdim=True)
        if learned_eps is not None:
            r = torch.rsqrt(nu2 + channel_view(learned_eps.to(acc).abs() + eps, ndim))
        else:
            r = torch.rsqrt(nu2 + eps)
        scale = r if weight is None else r * channel_view(weight.to(acc), ndim)
        y = xf * scale if bias is None else torch.addcmul(channel_view(bias.to(acc), ndim), xf, scale)
        if tau is not None:
            y = torch.maximum(y, channel_view(tau.to(acc), ndim))
        ctx.save_for_backward(x, r, weight, bias, tau, learned_eps)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, r, weight, bias, tau, learned_eps = ctx.saved_tensors
        acc = r.dtype
        ndim, dims = x.dim(), tuple(range(2, x.dim()))
        size = x[0, 0].numel()
        xf, g = x.to(acc), grad.to(acc)
        scale = r if weight is None else r * channel_view(weight.to(acc), ndim)
        gz = g
        if tau is not None:
            z = xf * scale if bias is None else torch.addcmul(channel_view(bias.to(acc), ndim), xf, scale)
            tie_split = z.sub_(channel_view(tau.to(acc), ndim)).sign_()  # as in forward, then 1, 0 or -1
            gz = torch.addcmul(g, g, tie_split).mul_(0.5)
        a = (gz * xf).sum(dim=dims, keepdim=True)
        coef = scale * r.square() * a / size  # gamma r^3 a / S
        needs = ctx.needs_input_grad
        grad_x = torch.addcmul(gz * scale, xf, coef, value=-1).to(x.dtype) if needs[0] else None
        grad_bias = gz.sum(dim=(0, *dims)) if bias is not None or tau is not None else None
        return (
            grad_x,
            _grad_for(weight, needs[1], (r * a).sum(0)),
            _grad_for(bias, needs[2], grad_bias),
            _grad_for(tau, needs[3], g.sum(dim=(0, *dims)) - grad_bias if tau is not None else None),
            None,
            _grad_for(
                learned_eps,
                needs[5],
                -0.5 * size * coef.sum(0).flatten() * learned_eps.to(acc).sign() if learned_eps is not None else None,
            ),
        )


def filter_response_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tau: torch.Tensor | None = None,
    eps: float = 1e-6,
    learned_eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`normlab.functional.filter_response_norm` as one autograd Function (:class:`_FilterResponseNorm`).

    Covers every input the reference takes: one pass for the statistics and one or two for the output; the backward
    saves only ``x`` and one float32 (float64) value per (sample, channel).
    """
    check_input("filter_response_norm", x, (3, 4, 5), None)
    return _FilterResponseNorm.apply(x, weight, bias, tau, eps, learned_eps)
