"""OnlineNorm1d/2d: Online Normalization (Chiley et al., 2019, arXiv 1905.05894), batch-size independent."""

from __future__ import annotations

import torch

from .. import kernels
from ..functional._checks import check_decay
from ..functional._stats import accumulation_dtype
from ._base import NormBase

__all__ = ["OnlineNorm1d", "OnlineNorm2d"]


class _OnlineNorm(NormBase):
    """Shared body of OnlineNorm1d/2d: the stream state as buffers, the call into ``online_norm``."""

    def __init__(
        self,
        num_features: int,
        *,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        layer_scaling: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        owner = type(self).__name__
        self.alpha_fwd = check_decay(owner, "alpha_fwd", alpha_fwd)
        self.alpha_bkw = check_decay(owner, "alpha_bkw", alpha_bkw)
        self.layer_scaling = bool(layer_scaling)
        # the state moves by (1 - alpha) of a sample per step, below bfloat16/float16 resolution: keep it in
        # float32 (float64 for a float64 module)
        state = {"device": device, "dtype": accumulation_dtype(dtype or torch.get_default_dtype())}
        self.register_buffer("running_mean", torch.zeros(self.num_features, **state))
        self.register_buffer("running_var", torch.ones(self.num_features, **state))
        self.register_buffer("control_mean", torch.zeros(self.num_features, **state))
        self.register_buffer("control_proj", torch.zeros(self.num_features, **state))

    def reset_running_stats(self) -> None:
        """Restart the stream: running_mean = 0, running_var = 1, control_mean = control_proj = 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.control_mean.zero_()
        self.control_proj.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call(
            "online_norm",
            x,
            self.running_mean,
            self.running_var,
            self.control_mean,
            self.control_proj,
            self.weight,
            self.bias,
            self.alpha_fwd,
            self.alpha_bkw,
            self.eps,
            self.training,
            self.layer_scaling,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, eps={self.eps}, "
            f"affine={self.affine}, layer_scaling={self.layer_scaling}"
        )


_DOC = r"""Online Normalization over {shape} input: running statistics forward, a control process backward.

    .. math::

        y_t = \frac{{x_t - \mu_{{t-1}}}}{{\sqrt{{\sigma^2_{{t-1}} + \epsilon}}}}, \qquad
        z_t = \mathrm{{LS}}(\gamma y_t + \beta), \qquad
        \mathrm{{LS}}(h) = \frac{{h}}{{\sqrt{{\mathrm{{E}}_{{c,*}}[h^2] + \epsilon}}}}

    Per channel, :math:`\mu` and :math:`\sigma^2` are exponential running estimates (decay ``alpha_fwd``)
    updated after every sample;
    {spatial}.
    The backward pass replaces the gradient of :math:`y` by the paper's control process (decay ``alpha_bkw``),
    which removes its projection on :math:`y` and its mean using the accumulators ``control_proj`` and
    ``control_mean``; see :func:`normlab.functional.online_norm.online_norm` for the recurrences. Layer scaling
    (LS, divide by the sample's RMS over all features) is the paper's guard against compounding estimation errors
    and is on by default, as in the paper's experiments (the authors' later code defaults to activation clamping
    instead). Paper: Chiley et al., 2019, "Online Normalization for Training Neural Networks", NeurIPS,
    arXiv 1905.05894.

    A mini-batch is a stream in batch order, as in the authors' implementation: sample i is normalized with the
    statistics after samples 0..i-1, so any batch size works, 1 included, and it may change every step.

    Args:
        num_features: C, the number of channels.
        alpha_fwd: decay of the forward statistics, in [0, 1). Default 0.999.
        alpha_bkw: decay of the backward control process, in [0, 1). Default 0.99.
        eps: added to the running variance and to the mean square in layer scaling. Must be > 0.
        affine: learn a per-channel scale (weight) and shift (bias), applied before layer scaling.
        layer_scaling: divide each sample's output by its RMS over all features.
        device, dtype: of the parameters. The state buffers (running_mean, running_var, control_mean,
            control_proj) are float32, or float64 for a float64 module, since a step moves them by a fraction
            (1 - alpha) of a sample that half precision cannot represent.

    Shape:
        Input and output: {io}.

    Raises:
        ValueError: on an input of the wrong rank or channel count, or on an invalid argument (num_features not a
            positive integer, alpha_fwd or alpha_bkw outside [0, 1), eps <= 0).

    Note:
        Training and eval normalize the same way (each sample with the state as it stands before it); only
        training advances the state: the statistics in the forward pass, the control accumulators in the backward
        pass. For a batch of one, train and eval outputs are equal. In eval the gradient is the plain derivative of
        the fixed normalization. The buffers are persistent, so a checkpoint resumes the stream.

    Example:
        >>> import torch
        >>> from normlab.layers.online_norm import {name}
        >>> norm = {name}(4)
        >>> y = norm(torch.randn({example}))
        >>> tuple(y.shape), float(norm.running_var.min()) > 0
        ({out_shape}, True)
    """


class OnlineNorm1d(_OnlineNorm):
    _input_dims = (2, 3)


class OnlineNorm2d(_OnlineNorm):
    _input_dims = (4,)


OnlineNorm1d.__doc__ = _DOC.format(
    shape="an (N, C) or (N, C, L)",
    spatial="with an (N, C, L) input, each sample contributes its mean and variance over L",
    io="(N, C) or (N, C, L)",
    name="OnlineNorm1d",
    example="1, 4",
    out_shape="(1, 4)",
)
OnlineNorm2d.__doc__ = _DOC.format(
    shape="an (N, C, H, W)",
    spatial="each sample contributes its mean and variance over H, W (the paper's convolutional version)",
    io="(N, C, H, W)",
    name="OnlineNorm2d",
    example="3, 4, 5, 5",
    out_shape="(3, 4, 5, 5)",
)
