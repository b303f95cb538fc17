"""GroupNorm and InstanceNorm1d/2d/3d: per-sample statistics, so they behave the same at any batch size."""

from __future__ import annotations

import torch

from .. import kernels
from ..functional._checks import check_divides, check_positive_int, check_spatial_has_values
from ._base import NormBase, RunningStatsNormBase

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]

_DEFAULT_NUM_GROUPS = 32


def _resolve_num_groups(owner: str, num_features: int, num_groups: int | None, group_size: int | None) -> int:
    """The number of groups given ``num_groups`` and/or ``group_size`` (at most one needs to be set)."""
    if group_size is None:
        num_groups = _DEFAULT_NUM_GROUPS if num_groups is None else num_groups
        check_positive_int(owner, "num_groups", num_groups)
        check_divides(owner, "num_groups", num_groups, "num_features", num_features)
        return num_groups
    check_positive_int(owner, "group_size", group_size)
    check_divides(owner, "group_size", group_size, "num_features", num_features)
    from_size = num_features // group_size
    if num_groups is not None and num_groups != from_size:
        raise ValueError(
            f"{owner}: num_groups={num_groups!r} and group_size={group_size} disagree for num_features={num_features} "
            f"(group_size={group_size} means num_groups={from_size}); give only one of them"
        )
    return from_size


class GroupNorm(NormBase):
    r"""Group normalization over an (N, C, *) input, a batch-independent replacement for BatchNorm.

    .. math:: y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma_c + \beta_c

    The C channels are split into ``num_groups`` groups of consecutive channels; mean and biased variance are
    taken per sample and group over (C / num_groups, *), the affine parameters are per channel. Paper: Wu & He,
    2018, "Group Normalization", arXiv 1803.08494. Outputs and gradients equal torch.nn.GroupNorm's.

    Unlike torch.nn.GroupNorm(num_groups, num_channels), the channel count comes first and the group count is
    keyword-only, as in every normlab norm: ``GroupNorm(64, num_groups=32)``, so ``norm_layer(C)`` works and the
    two counts cannot be swapped silently.

    Args:
        num_features: C, the number of channels.
        num_groups: the number of groups; must divide C. Default 32 unless ``group_size`` is given.
        group_size: channels per group instead (``num_groups = C // group_size``); must divide C. Giving both is
            allowed only when they agree.
        eps: added to the variance. Must be > 0.
        affine: learn a per-channel scale (weight) and shift (bias).
        device, dtype: of the parameters.

    Shape:
        Input and output: (N, C, *) with 0 to 3 spatial dimensions.

    Raises:
        ValueError: on an input of the wrong rank or channel count, or on an invalid argument (num_features or
            num_groups or group_size not a positive integer dividing C, both given and disagreeing, eps <= 0).

    Note:
        Training and eval compute the same thing: the statistics are each sample's own, nothing is tracked.

    Example:
        >>> import torch
        >>> from normlab.layers.group_norm import GroupNorm
        >>> gn = GroupNorm(64, group_size=16)
        >>> y = gn(torch.randn(2, 64, 5, 5))
        >>> gn.num_groups, tuple(y.shape)
        (4, (2, 64, 5, 5))
    """

    _input_dims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, device=device, dtype=dtype)
        self.num_groups = _resolve_num_groups(type(self).__name__, self.num_features, num_groups, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("group_norm", x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"


class _InstanceNorm(RunningStatsNormBase):
    """Shared body of InstanceNorm1d/2d/3d."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        use_input_stats = self._uses_batch_stats()
        if use_input_stats:
            check_spatial_has_values(type(self).__name__, x)
        update = self._updates_running_stats()
        momentum = self._momentum_factor() if update else 0.0
        # Buffers are None exactly when batch statistics are used without being recorded (no tracking).
        y = kernels.call(
            "instance_norm",
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            momentum,
            self.eps,
        )
        if update:
            self.num_batches_tracked.add_(1)
        return y


_DOC = r"""Instance normalization over a {rank} input, a batch-independent replacement for BatchNorm.

    .. math:: y = \frac{{x - \mu_{{n,c}}}}{{\sqrt{{\sigma^2_{{n,c}} + \epsilon}}}} \gamma_c + \beta_c

    The mean :math:`\mu_{{n,c}}` and biased variance :math:`\sigma^2_{{n,c}}` are per sample and channel over the
    spatial dimensions. Paper: Ulyanov, Vedaldi & Lempitsky, 2016, "Instance Normalization: The Missing Ingredient
    for Fast Stylization", arXiv 1607.08022.
    Outputs, gradients and running statistics equal torch.nn.{name}'s, with these differences:

    * ``affine=True`` by default (torch: False), because normlab norms replace BatchNorm in ``norm_layer(C)``,
      which is affine. Pass ``affine=False`` for torch's default.
    * Only batched input {shape}; torch also takes unbatched input.
    * ``momentum=None`` is the cumulative average and ``num_batches_tracked`` counts training batches, as in
      BatchNorm (torch's InstanceNorm treats None as 0, never updating, and leaves the counter at 0).

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Must be > 0.
        momentum: PyTorch convention, ``running = (1 - momentum) * running + momentum * batch``; None is the
            cumulative average. Keras/Flax momentum 0.9 equals PyTorch momentum 0.1.
        affine: learn a per-channel scale (weight) and shift (bias).
        track_running_stats: record the batch average of the per-instance mean and unbiased variance, and
            normalize with them in eval.
        device, dtype: of the parameters and buffers.

    Shape:
        Input and output: {shape}.

    Raises:
        ValueError: on an input of the wrong rank or channel count, on one spatial value per channel when the
            input's own statistics are used, or on an invalid argument (num_features <= 0, eps <= 0, momentum
            outside [0, 1]).

    Note:
        Without ``track_running_stats`` (the default) training and eval compute the same thing. With it, training
        normalizes each instance by its own statistics and records their batch average; eval normalizes every
        instance by the recorded statistics.

    Example:
        >>> import torch
        >>> from normlab.layers.group_norm import {name}
        >>> norm = {name}(3)
        >>> y = norm(torch.randn({example}))
        >>> bool(y.mean({mean_dims}).abs().max() < 1e-5)
        True
    """


class InstanceNorm1d(_InstanceNorm):
    _input_dims = (3,)


class InstanceNorm2d(_InstanceNorm):
    _input_dims = (4,)


class InstanceNorm3d(_InstanceNorm):
    _input_dims = (5,)


InstanceNorm1d.__doc__ = _DOC.format(
    rank="3D", name="InstanceNorm1d", shape="(N, C, L)", example="2, 3, 7", mean_dims="2"
)
InstanceNorm2d.__doc__ = _DOC.format(
    rank="4D", name="InstanceNorm2d", shape="(N, C, H, W)", example="2, 3, 5, 5", mean_dims="(2, 3)"
)
InstanceNorm3d.__doc__ = _DOC.format(
    rank="5D", name="InstanceNorm3d", shape="(N, C, D, H, W)", example="2, 3, 2, 4, 4", mean_dims="(2, 3, 4)"
)
