"""FrozenBatchNorm1d/2d: batch norm with fixed statistics and affine, all buffers (torchvision style)."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..functional._checks import check_input, check_positive_float, check_positive_int
from .batch_norm import _BatchNorm

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(nn.Module):
    """Shared body of the frozen batch norms.

    Not a :class:`~normlab.layers._base.NormBase`: that base owns ``weight``/``bias`` as Parameters, while here they
    are buffers (nothing is learned), so this is a plain nn.Module that validates its arguments and inputs with the
    same checks.
    """

    _input_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, *, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_positive_int(owner, "num_features", num_features)
        self.eps = check_positive_float(owner, "eps", eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(self.num_features, **factory))
        self.register_buffer("bias", torch.zeros(self.num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
        self.register_buffer("running_var", torch.ones(self.num_features, **factory))

    @classmethod
    def from_batch_norm(cls, bn: nn.Module):
        """A frozen copy of a batch norm's running statistics and affine (weight 1, bias 0 when it has none).

        Args:
            bn: a torch.nn.BatchNorm*d / SyncBatchNorm, a normlab batch norm (incl. GhostBatchNorm2d and
                BatchRenorm2d) or a frozen batch norm. The copy is on the statistics' device and dtype and keeps
                ``bn``'s training flag (which changes nothing here).

        Raises:
            ValueError: if ``bn`` is not a batch norm or keeps no running statistics (``track_running_stats=False``),
                since there would be nothing to freeze.
        """
        name = cls.__name__
        if not isinstance(bn, (nn.modules.batchnorm._BatchNorm, _BatchNorm, _FrozenBatchNorm)):
            raise ValueError(
                f"{name}.from_batch_norm: expected a batch norm module (torch.nn.BatchNorm*d, SyncBatchNorm or a "
                f"normlab batch norm), got {type(bn).__name__}"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{name}.from_batch_norm: {type(bn).__name__} has track_running_stats=False, so it keeps no running "
                "statistics to freeze (it normalizes with batch statistics even in eval); train it with "
                "track_running_stats=True or recalibrate its statistics first"
            )
        stats = bn.running_mean
        frozen = cls(bn.num_features, eps=bn.eps, device=stats.device, dtype=stats.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(type(self).__name__, x, self._input_dims, self.num_features)
        return kernels.call(
            "frozen_batch_norm", x, self.running_mean, self.running_var, self.weight, self.bias, self.eps
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # a batch norm's step counter means nothing here; dropped as torchvision.ops.FrozenBatchNorm2d does
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


_DOC = r"""Batch normalization over a {rank} input with frozen statistics and affine, as in torchvision.

    .. math::
        y = \frac{{x - \mathrm{{running\_mean}}}}{{\sqrt{{\mathrm{{running\_var}} + \epsilon}}}} \gamma + \beta

    torch.nn.{bn} in eval mode, folded into one per-channel scale and shift (Ioffe & Szegedy, 2015, "Batch
    Normalization", arXiv 1502.03167). ``weight`` (gamma), ``bias`` (beta), ``running_mean`` and ``running_var`` are
    all buffers, never updated and never learned: the standard choice for fine-tuning detection/segmentation
    backbones whose per-GPU batches are too small for batch statistics.

    Checkpoints: a torch.nn.{bn} or normlab batch norm state_dict loads directly (``num_batches_tracked`` is ignored,
    as in torchvision), and so does a torchvision.ops.FrozenBatchNorm2d one (the same four keys). From a module, use
    :meth:`from_batch_norm`.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Must be > 0.
        device, dtype: of the buffers.

    Shape:
        Input and output: {shape}.

    Raises:
        ValueError: on an input of the wrong rank or channel count, or on an invalid argument (num_features <= 0,
            eps <= 0).

    Note:
        train() and eval() compute exactly the same function: the statistics never come from the batch. The module
        has no parameters; gradients flow only to the input.

    Example:
        >>> import torch
        >>> from normlab.layers.frozen_batch_norm import {name}
        >>> bn = torch.nn.{bn}(3).eval()
        >>> frozen = {name}.from_batch_norm(bn)
        >>> x = torch.randn({example})
        >>> torch.allclose(frozen(x), bn(x), atol=1e-6), len(list(frozen.parameters()))
        (True, 0)
    """


class FrozenBatchNorm1d(_FrozenBatchNorm):
    _input_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    _input_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    _input_dims = (5,)


FrozenBatchNorm1d.__doc__ = _DOC.format(
    rank="2D or 3D", name="FrozenBatchNorm1d", bn="BatchNorm1d", shape="(N, C) or (N, C, L)", example="4, 3, 5"
)
FrozenBatchNorm2d.__doc__ = _DOC.format(
    rank="4D", name="FrozenBatchNorm2d", bn="BatchNorm2d", shape="(N, C, H, W)", example="4, 3, 5, 5"
)
FrozenBatchNorm3d.__doc__ = _DOC.format(
    rank="5D", name="FrozenBatchNorm3d", bn="BatchNorm3d", shape="(N, C, D, H, W)", example="2, 3, 2, 4, 4"
)
