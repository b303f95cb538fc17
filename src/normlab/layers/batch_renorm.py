"""BatchRenorm2d: batch renormalization (Ioffe, 2017), with a linear warm-up of its clipping bounds."""

from __future__ import annotations

import torch

from .. import kernels
from ..functional.batch_renorm import check_renorm_limits
from .batch_norm import _BatchNorm

__all__ = ["BatchRenorm2d"]


class BatchRenorm2d(_BatchNorm):
    r"""Batch renormalization over a 4D input (Ioffe, 2017, arXiv 1702.03275).

    .. math::
        r = \mathrm{sg}(\mathrm{clip}_{[1/r_{max},\, r_{max}]}(\sigma_B / \sigma)), \quad
        d = \mathrm{sg}(\mathrm{clip}_{[-d_{max},\, d_{max}]}((\mu_B - \mu) / \sigma)), \quad
        y = \left(\frac{x - \mu_B}{\sigma_B} r + d\right) \gamma + \beta

    with the batch statistics :math:`\mu_B, \sigma_B = \sqrt{\mathrm{Var}_B + \epsilon}` per channel over (N, H, W),
    the running ones :math:`\mu, \sigma = \sqrt{\mathrm{running\_var} + \epsilon}`, and sg a stopped gradient.
    Training thus sees the inference-time normalization wherever the clipping allows, which makes small or
    non-i.i.d. batches hurt less than with BatchNorm ("Batch Renormalization: Towards Reducing Minibatch
    Dependence in Batch-Normalized Models"). With ``r_max=1, d_max=0`` it is exactly torch.nn.BatchNorm2d.

    Warm-up: the paper starts as plain BatchNorm and relaxes the bounds gradually. With ``warmup_steps > 0`` the
    bounds in force ramp linearly with the number of training batches seen so far (``num_batches_tracked``, so a
    loaded checkpoint resumes the ramp): at step t, ``r_max_t = 1 + (r_max - 1) * min(t / warmup_steps, 1)`` and
    ``d_max_t = d_max * min(t / warmup_steps, 1)``; the first batch (t = 0) is plain BatchNorm. The ramp is computed
    as tensors, so torch.compile does not recompile at every step.

    ``momentum``: kept at PyTorch's 0.1 by default (so that the layer reduces to BatchNorm2d exactly). The paper
    stresses that r and d are only as good as the running statistics and uses a faster moving-average update than
    its BatchNorm baseline; set ``momentum`` for your schedule. Running statistics are always tracked (BRN needs
    them), so there is no ``track_running_stats`` argument. Buffers and state_dict keys are torch.nn.BatchNorm2d's,
    so its checkpoints load unchanged; ``sync``, ``nan_guard`` and ``momentum=None`` behave as in
    :class:`~normlab.layers.batch_norm.BatchNorm2d`.

    Args:
        num_features: C, the number of channels.
        r_max: bound of r, >= 1 (the paper reaches 3).
        d_max: bound of d, >= 0 (the paper reaches 5).
        warmup_steps: training batches over which the bounds ramp from (1, 0) to (r_max, d_max); 0 disables the
            ramp.
        eps: added to the variances. Must be > 0.
        momentum: PyTorch convention, ``running = (1 - momentum) * running + momentum * batch``; None is the
            cumulative average. Keras/Flax momentum 0.9 equals PyTorch momentum 0.1.
        affine: learn a per-channel scale (weight) and shift (bias).
        nan_guard: skip running-statistics updates for non-finite batches.
        sync: synchronize the batch statistics over ``process_group`` (default: the world group).
        process_group: a torch.distributed group; implies ``sync=True``.
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input of the wrong rank or channel count, on one value per channel in training, or on an
            invalid argument (num_features <= 0, r_max < 1, d_max < 0, warmup_steps < 0, eps <= 0, momentum outside
            [0, 1]).

    Note:
        Training normalizes with the batch statistics corrected by r and d; eval uses the running statistics
        exactly as torch.nn.BatchNorm2d does.

    Example:
        >>> import torch
        >>> from normlab.layers.batch_renorm import BatchRenorm2d
        >>> brn = BatchRenorm2d(3, r_max=3.0, d_max=5.0, warmup_steps=1000)
        >>> y = brn(torch.randn(8, 3, 5, 5))
        >>> tuple(y.shape), int(brn.num_batches_tracked)
        ((8, 3, 5, 5), 1)
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        nan_guard: bool = True,
        sync: bool = False,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        if isinstance(r_max, torch.Tensor) or isinstance(d_max, torch.Tensor):
            raise ValueError(f"{owner}: r_max and d_max must be Python numbers, got r_max={r_max!r}, d_max={d_max!r}")
        r_max, d_max = check_renorm_limits(owner, r_max, d_max)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"{owner}: warmup_steps={warmup_steps!r} must be an integer >= 0 (0 disables warm-up)")
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=True,
            nan_guard=nan_guard,
            sync=sync,
            process_group=process_group,
            device=device,
            dtype=dtype,
        )
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps

    def current_limits(self) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """The (r_max, d_max) in force for the next training batch: Python floats without warm-up, 0-dim tensors
        during (and after) a warm-up, computed from ``num_batches_tracked`` without reading it on the host."""
        if self.warmup_steps == 0:
            return self.r_max, self.d_max
        progress = (self.num_batches_tracked.to(torch.float32) / self.warmup_steps).clamp(max=1.0)
        return 1.0 + (self.r_max - 1.0) * progress, self.d_max * progress

    def _normalize(self, x, running_mean, running_var, use_batch_stats: bool, momentum: float, group):
        r_max, d_max = self.current_limits() if use_batch_stats else (self.r_max, self.d_max)
        return kernels.call(
            "batch_renorm",
            x,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            r_max=r_max,
            d_max=d_max,
            process_group=group,
        )

    def extra_repr(self) -> str:
        extra = f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"
        if self.warmup_steps:
            extra += f", warmup_steps={self.warmup_steps}"
        return extra
