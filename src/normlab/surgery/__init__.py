"""Tools that take a model and fix its normalization: they return the model and a report of what they changed."""

from ._report import SurgeryReport
from .accumulating_bn import AccumulatingBN, accumulating_bn
from .fold import fold_bn, fold_bn_weights
from .freeze import freeze_bn, unfreeze_bn
from .momentum import momentum_from_keras, momentum_to_keras
from .recalibrate import merge_batch_stats, recalibrate_bn
from .swap import swap_norm
from .sync import from_sync_bn, infer_batch_norm_dim, to_sync_bn

__all__ = [
    "SurgeryReport",
    "AccumulatingBN",
    "accumulating_bn",
    "fold_bn",
    "fold_bn_weights",
    "freeze_bn",
    "from_sync_bn",
    "infer_batch_norm_dim",
    "merge_batch_stats",
    "momentum_from_keras",
    "momentum_to_keras",
    "recalibrate_bn",
    "swap_norm",
    "to_sync_bn",
    "unfreeze_bn",
]
