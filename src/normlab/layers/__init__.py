"""Normalization modules (nn.Module): they hold parameters and buffers and compute through normlab.kernels."""

from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
