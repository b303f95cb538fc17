"""Shared validators. Each raises ValueError naming the owner, the argument, the value and what was expected.

User input is never validated with ``assert`` (it vanishes under ``python -O``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

import torch

__all__ = [
    "check_positive_int",
    "check_positive_float",
    "check_nonnegative_float",
    "check_momentum",
    "check_decay",
    "check_divides",
    "check_input",
    "check_batch_has_values",
    "check_spatial_has_values",
    "unknown_name_error",
]


def check_positive_int(owner: str, name: str, value) -> int:
    """Return ``value`` if it is an int > 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive integer")
    return value


def check_positive_float(owner: str, name: str, value) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name}={value!r} must be a finite number > 0")
    return float(value)


def check_nonnegative_float(owner: str, name: str, value) -> float:
    """Return ``float(value)`` if it is a finite number >= 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name}={value!r} must be a finite number >= 0")
    return float(value)


def check_momentum(owner: str, value) -> float | None:
    """Momentum in PyTorch's convention: None (cumulative average) or a number in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{owner}: momentum={value!r} must be None (cumulative average) or a number in [0, 1] "
            "(PyTorch convention: new = (1 - momentum) * old + momentum * batch; Keras' 0.9 is PyTorch's 0.1)"
        )
    return float(value)


def check_decay(owner: str, name: str, value) -> float:
    """Return ``float(value)`` if it is an exponential-average decay factor in [0, 1), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name}={value!r} must be a decay factor in [0, 1)")
    return float(value)


def check_divides(owner: str, name: str, value: int, total_name: str, total: int) -> None:
    """Raise unless ``value`` divides ``total``."""
    if total % value != 0:
        raise ValueError(f"{owner}: {name}={value} must divide {total_name}={total}")


def check_input(owner: str, x: torch.Tensor, dims: int | Iterable[int], num_features: int | None) -> None:
    """Check that ``x`` has one of the allowed numbers of dimensions and ``num_features`` channels in dim 1.

    Args:
        owner: name used in messages, usually the class name.
        x: the input tensor.
        dims: allowed values of ``x.dim()``.
        num_features: expected ``x.shape[1]``; None skips the check.
    """
    allowed = (dims,) if isinstance(dims, int) else tuple(dims)
    if x.dim() not in allowed:
        expected = " or ".join(f"{d}D" for d in allowed)
        raise ValueError(f"{owner}: expected {expected} input (N, C, ...), got input of shape {tuple(x.shape)}")
    if num_features is not None and x.shape[1] != num_features:
        raise ValueError(
            f"{owner}: input has {x.shape[1]} channels (shape {tuple(x.shape)}), expected num_features={num_features}"
        )


def check_batch_has_values(owner: str, x: torch.Tensor) -> None:
    """Batch statistics need more than one value per channel: raise if ``x`` (N, C, *) has only one."""
    if x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(
            f"{owner}: expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}"
        )


def check_spatial_has_values(owner: str, x: torch.Tensor) -> None:
    """Per-instance statistics need more than one spatial value: raise if ``x`` (N, C, *) has only one per channel."""
    if math.prod(x.shape[2:]) <= 1:
        raise ValueError(
            f"{owner}: expected more than 1 spatial value per channel when training, got input of shape "
            f"{tuple(x.shape)}"
        )


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> ValueError:
    """Build the error for an unknown name: list the valid names and suggest the closest one."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid names: {', '.join(valid)}")
