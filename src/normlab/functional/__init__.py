"""Stateless reference implementations in plain PyTorch: the oracle every kernel and module is tested against.

One file per family; each name here is also the op name that normlab.kernels dispatches.
"""

from .batch_norm import all_reduce_sum, batch_norm, batch_stats, update_running_stats

__all__ = [
    "all_reduce_sum",
    "batch_norm",
    "batch_stats",
    "update_running_stats",
]
