"""Stateless reference implementations in plain PyTorch: the oracle every kernel and module is tested against.

One file per family; each name here is also the op name that normlab.kernels dispatches.
"""

from .batch_norm import all_reduce_sum, batch_norm, batch_stats, update_running_stats
from .batch_renorm import batch_renorm
from .evonorm import evonorm_b0, evonorm_s0
from .filter_response_norm import filter_response_norm
from .frozen_batch_norm import frozen_batch_norm
from .ghost_batch_norm import ghost_batch_norm
from .group_norm import group_norm, instance_norm
from .layer_norm import layer_norm, layer_norm2d, rms_norm, rms_norm2d
from .mabn import center_weight, moving_average_batch_norm
from .online_norm import layer_scale, online_norm
from .recurrent_batch_norm import recurrent_batch_norm
from .weight_standardization import standardize_weight

__all__ = [
    "all_reduce_sum",
    "batch_norm",
    "batch_renorm",
    "batch_stats",
    "center_weight",
    "evonorm_b0",
    "evonorm_s0",
    "filter_response_norm",
    "frozen_batch_norm",
    "ghost_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm2d",
    "layer_scale",
    "moving_average_batch_norm",
    "online_norm",
    "recurrent_batch_norm",
    "rms_norm",
    "rms_norm2d",
    "standardize_weight",
    "update_running_stats",
]
