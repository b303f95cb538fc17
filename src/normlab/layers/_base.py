"""Shared parameter and buffer handling for normlab's normalization modules."""

from __future__ import annotations

import torch
from torch import nn

from ..functional._checks import check_input, check_momentum, check_positive_float, check_positive_int

__all__ = ["NormBase", "RunningStatsNormBase"]


class NormBase(nn.Module):
    """Base of every per-channel norm: ``num_features``, ``eps`` and the optional affine ``weight``/``bias``.

    A disabled parameter is registered as None, as in torch.nn. Subclasses set ``_input_dims`` (the allowed input
    ranks) and may override :meth:`reset_parameters`.
    """

    _input_dims: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float,
        affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = check_positive_int(owner, "num_features", num_features)
        self.eps = check_positive_float(owner, "eps", eps)
        self.affine = bool(affine)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight = 1, bias = 0."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        check_input(type(self).__name__, x, self._input_dims, self.num_features)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class RunningStatsNormBase(NormBase):
    """A norm with PyTorch-compatible running statistics.

    Buffers ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked`` when
    ``track_running_stats`` is True, else registered as None. ``momentum`` follows PyTorch:
    ``running = (1 - momentum) * running + momentum * batch``; None is the cumulative average. Keras/Flax write the
    same update with ``1 - momentum`` (their 0.9/0.99 is PyTorch's 0.1/0.01).
    """

    _version = 2  # torch.nn.BatchNorm's state_dict version: its checkpoints load unchanged

    def __init__(
        self,
        num_features: int,
        *,
        eps: float,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps=eps, affine=affine, bias=bias, device=device, dtype=dtype)
        self.momentum = check_momentum(type(self).__name__, momentum)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
            self.register_buffer("running_var", torch.ones(self.num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _momentum_factor(self) -> float:
        """Weight of the current training batch in the running average (it becomes batch number
        ``num_batches_tracked + 1``; the caller counts it)."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return self.momentum

    def _updates_running_stats(self) -> bool:
        return self.training and self.track_running_stats

    def _uses_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if self.track_running_stats and (version is None or version < 2) and key not in state_dict:
            # checkpoints from before num_batches_tracked existed (torch < 0.4.1), as torch.nn.BatchNorm does
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
