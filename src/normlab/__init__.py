"""normlab: normalization beyond BatchNorm for PyTorch.

Drop-in normalization layers (``normlab.layers``), a factory that turns a spec string into a ``norm_layer``
(``get_norm_layer("gn32")``), stateless references (``normlab.functional``) and backend dispatch
(``normlab.kernels``).
"""

from . import functional, kernels, layers
from .factory import NormLayerFactory, create_norm_layer, get_norm_layer, list_norms, register_norm
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm2d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    RMSNorm2d,
    ScaledStdConv2d,
    StdConv2d,
)
from .surgery import AccumulatingBN, accumulating_bn

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "functional",
    "kernels",
    "layers",
    # surgery
    "AccumulatingBN",
    "accumulating_bn",
    # factory
    "NormLayerFactory",
    "create_norm_layer",
    "get_norm_layer",
    "list_norms",
    "register_norm",
    # layers
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm2d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "FilterResponseNorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "GhostBatchNorm2d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "RMSNorm2d",
    "ScaledStdConv2d",
    "StdConv2d",
]
