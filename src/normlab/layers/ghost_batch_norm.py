"""GhostBatchNorm2d: batch norm whose training statistics come from chunks ("ghost batches") of the batch."""

from __future__ import annotations

from .. import kernels
from ..functional._checks import check_positive_int
from .batch_norm import _BatchNorm

__all__ = ["GhostBatchNorm2d"]


class GhostBatchNorm2d(_BatchNorm):
    r"""Ghost batch normalization over a 4D input (Hoffer, Hubara & Soudry, 2017, arXiv 1705.08741).

    .. math:: y_i = \frac{x_i - \mathrm{E}_{g(i)}[x]}{\sqrt{\mathrm{Var}_{g(i)}[x] + \epsilon}} \gamma + \beta

    In training the batch is cut along N into ghost batches of ``virtual_batch_size`` samples (the last one smaller
    when N is not a multiple), and each is normalized with its own per-channel statistics over (samples, H, W):
    large batches keep the noise, and the generalization, of small-batch BatchNorm ("Train longer, generalize
    better"). Eval uses the running statistics exactly as torch.nn.BatchNorm2d does.

    The running statistics get ONE update per training call, towards the average over ghost batches of their means
    and of their unbiased variances, so ``momentum`` means what it means for BatchNorm regardless of the number of
    ghost batches; with ``virtual_batch_size >= N`` the layer is exactly torch.nn.BatchNorm2d. Buffers and
    state_dict keys are torch.nn.BatchNorm2d's, so its checkpoints load unchanged. ``nan_guard`` and
    ``momentum=None`` behave as in :class:`~normlab.layers.batch_norm.BatchNorm2d`. There is no ``sync``: ghost
    batches are slices of each rank's local batch, so nothing would be synchronized.

    Args:
        num_features: C, the number of channels.
        virtual_batch_size: samples per ghost batch, a positive int.
        eps: added to the variance. Must be > 0.
        momentum: PyTorch convention, ``running = (1 - momentum) * running + momentum * batch``; None is the
            cumulative average. Keras/Flax momentum 0.9 equals PyTorch momentum 0.1.
        affine: learn a per-channel scale (weight) and shift (bias).
        track_running_stats: keep running statistics for eval; if False, eval also uses ghost-batch statistics.
        nan_guard: skip running-statistics updates for non-finite batches.
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: (N, C, H, W).

    Raises:
        ValueError: on an input of the wrong rank or channel count, on a ghost batch with one value per channel in
            training, or on an invalid argument (num_features <= 0, virtual_batch_size <= 0, eps <= 0, momentum
            outside [0, 1]).

    Note:
        Training normalizes each ghost batch with its own statistics; eval uses the running statistics, so a model
        is evaluated exactly as with BatchNorm2d.

    Example:
        >>> import torch
        >>> from normlab.layers.ghost_batch_norm import GhostBatchNorm2d
        >>> gbn = GhostBatchNorm2d(3, virtual_batch_size=4)
        >>> y = gbn(torch.randn(12, 3, 5, 5))
        >>> tuple(y.shape), int(gbn.num_batches_tracked)
        ((12, 3, 5, 5), 1)
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        *,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        nan_guard: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        virtual_batch_size = check_positive_int(type(self).__name__, "virtual_batch_size", virtual_batch_size)
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            nan_guard=nan_guard,
            device=device,
            dtype=dtype,
        )
        self.virtual_batch_size = virtual_batch_size

    def _normalize(self, x, running_mean, running_var, use_batch_stats: bool, momentum: float, group):
        return kernels.call(
            "ghost_batch_norm",
            x,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            virtual_batch_size=self.virtual_batch_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"
