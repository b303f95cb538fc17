"""Norm + activation in one module (timm's ``BatchNormAct2d`` / ``GroupNormAct``): the Triton kernels apply the
activation in the pass that writes the normalized output, saving a read and a write of the activation map.

On other backends the activation runs after the norm, so the result is the same everywhere:
``BatchNormAct2d(C, act="relu")(x) == relu(BatchNorm2d(C)(x))`` with the same parameters and state (state_dicts are
interchangeable, so a model's ``BatchNorm2d`` + ``ReLU`` pair can be replaced by one module).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..functional._checks import unknown_name_error
from .batch_norm import BatchNorm2d
from .group_norm import GroupNorm

__all__ = ["BatchNormAct2d", "GroupNormAct"]


def _check_act(owner: str, act) -> str:
    name = "none" if act is None else act
    if name not in kernels.ACTIVATIONS:
        raise ValueError(f"{owner}: {unknown_name_error('act', str(name), kernels.ACTIVATIONS)} (got {act!r})")
    return name


class BatchNormAct2d(BatchNorm2d):
    """:class:`normlab.BatchNorm2d` followed by an activation, fused into the normalizing pass on the Triton path.

    Args:
        num_features: C.
        act: ``"relu"`` (default), ``"silu"`` or ``"none"``.
        **kwargs: as for :class:`normlab.BatchNorm2d` (eps, momentum, affine, track_running_stats, nan_guard, sync,
            process_group, device, dtype).

    Shape:
        Input and output (N, C, H, W).

    Raises:
        ValueError: for an unknown ``act`` (the valid ones are listed) and as BatchNorm2d does.

    Note:
        Training uses batch statistics and updates the running ones, eval uses the running statistics, as in
        BatchNorm2d; the activation is applied in both.

    Example:
        >>> import torch
        >>> from normlab.layers.norm_act import BatchNormAct2d
        >>> y = BatchNormAct2d(4, act="relu")(torch.randn(8, 4, 3, 3))
        >>> bool((y >= 0).all())
        True
    """

    def __init__(self, num_features: int, *, act: str | None = "relu", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = _check_act(type(self).__name__, act)

    def _normalize(self, x, running_mean, running_var, use_batch_stats: bool, momentum: float, group, **kwargs):
        kwargs["act"] = self.act
        return super()._normalize(x, running_mean, running_var, use_batch_stats, momentum, group, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


class GroupNormAct(GroupNorm):
    """:class:`normlab.GroupNorm` followed by an activation, fused into the normalizing pass on the Triton path.

    Args:
        num_features: C.
        act: ``"relu"`` (default), ``"silu"`` or ``"none"``.
        **kwargs: as for :class:`normlab.GroupNorm` (num_groups, group_size, eps, affine, device, dtype).

    Shape:
        Input and output (N, C, *) with 0 to 3 spatial dimensions.

    Raises:
        ValueError: for an unknown ``act`` (the valid ones are listed) and as GroupNorm does.

    Note:
        Training and eval compute the same thing.

    Example:
        >>> import torch
        >>> from normlab.layers.norm_act import GroupNormAct
        >>> y = GroupNormAct(8, num_groups=2, act="silu")(torch.randn(2, 8, 3, 3))
        >>> tuple(y.shape)
        (2, 8, 3, 3)
    """

    def __init__(self, num_features: int, *, act: str | None = "relu", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = _check_act(type(self).__name__, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return kernels.call("group_norm", x, self.num_groups, self.weight, self.bias, self.eps, act=self.act)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"
