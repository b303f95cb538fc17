"""Normalization modules (nn.Module): they hold parameters and buffers and compute through normlab.kernels."""

from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batch_renorm import BatchRenorm2d
from .centered_conv import CenteredConv2d
from .evonorm import EvoNorm2dB0, EvoNorm2dS0
from .filter_response_norm import FilterResponseNorm2d
from .frozen_batch_norm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .ghost_batch_norm import GhostBatchNorm2d
from .group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer_norm import LayerNorm, LayerNorm2d, RMSNorm, RMSNorm2d
from .mabn import MovingAverageBatchNorm2d
from .norm_act import BatchNormAct2d, GroupNormAct
from .online_norm import OnlineNorm1d, OnlineNorm2d
from .recurrent_batch_norm import RecurrentBatchNorm1d
from .rnn import NormGRU, NormGRUCell, NormLSTM, NormLSTMCell
from .weight_standardization import ScaledStdConv2d, StdConv2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct2d",
    "BatchRenorm2d",
    "CenteredConv2d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "FilterResponseNorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm2d",
    "GroupNorm",
    "GroupNormAct",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "MovingAverageBatchNorm2d",
    "NormGRU",
    "NormGRUCell",
    "NormLSTM",
    "NormLSTMCell",
    "OnlineNorm1d",
    "OnlineNorm2d",
    "RMSNorm",
    "RMSNorm2d",
    "RecurrentBatchNorm1d",
    "ScaledStdConv2d",
    "StdConv2d",
]
