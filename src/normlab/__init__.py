"""normlab: normalization beyond BatchNorm for PyTorch."""

from . import functional, kernels, layers
from .layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = ["functional", "kernels", "layers", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "__version__"]
