"""normlab: normalization beyond BatchNorm for PyTorch.

Drop-in normalization layers (``normlab.layers``), a factory that turns a spec string into a ``norm_layer``
(``get_norm_layer("gn32")``), tools that fix existing models (``normlab.surgery``: swap, freeze, fold, recalibrate,
sync, accumulate), a BatchNorm doctor (``normlab.diagnose``), ONNX export, stateless references
(``normlab.functional``) and backend dispatch (``normlab.kernels``).
"""

from . import functional, kernels, layers, surgery
from .doctor import Report, diagnose
from .export import export_onnx
from .factory import NormLayerFactory, create_norm_layer, get_norm_layer, list_norms, register_norm
from .layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm2d,
    CenteredConv2d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    FilterResponseNorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm2d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    MovingAverageBatchNorm2d,
    NormGRU,
    NormGRUCell,
    NormLSTM,
    NormLSTMCell,
    OnlineNorm1d,
    OnlineNorm2d,
    RecurrentBatchNorm1d,
    RMSNorm,
    RMSNorm2d,
    ScaledStdConv2d,
    StdConv2d,
)
from .surgery import (
    AccumulatingBN,
    SurgeryReport,
    accumulating_bn,
    fold_bn,
    freeze_bn,
    from_sync_bn,
    momentum_from_keras,
    momentum_to_keras,
    recalibrate_bn,
    swap_norm,
    to_sync_bn,
    unfreeze_bn,
)

__version__ = "0.1.0"


__all__ = [
    "__version__",
    "functional",
    "kernels",
    "layers",
    "surgery",
    # factory
    "NormLayerFactory",
    "create_norm_layer",
    "get_norm_layer",
    "list_norms",
    "register_norm",
    # surgery, doctor, deployment
    "AccumulatingBN",
    "Report",
    "SurgeryReport",
    "accumulating_bn",
    "diagnose",
    "export_onnx",
    "fold_bn",
    "freeze_bn",
    "from_sync_bn",
    "momentum_from_keras",
    "momentum_to_keras",
    "recalibrate_bn",
    "swap_norm",
    "to_sync_bn",
    "unfreeze_bn",
    # layers
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
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
