"""Tools that take a model and fix its normalization: they return the model and a report of what they changed."""

from .accumulating_bn import AccumulatingBN, accumulating_bn

__all__ = ["AccumulatingBN", "accumulating_bn"]
