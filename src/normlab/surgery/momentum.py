"""Momentum conventions of running statistics: Keras/Flax (weight of the old value) <-> PyTorch (of the new batch).

Keras ``BatchNormalization(momentum=m)`` and Flax ``nn.BatchNorm(momentum=m)`` update
``running = m * running + (1 - m) * batch``; PyTorch's ``momentum`` is the weight of the batch,
``running = (1 - momentum) * running + momentum * batch``. The same update is therefore written m = 0.99 in Keras
and momentum = 0.01 in PyTorch.
"""

from __future__ import annotations

from decimal import Decimal
from numbers import Real

__all__ = ["momentum_from_keras", "momentum_to_keras"]


def _complement(owner: str, name: str, value, meaning: str) -> float:
    """``1 - value`` for ``value`` in [0, 1], computed on the shortest decimal of ``value`` so that 0.99 gives
    exactly 0.01 (binary ``1 - 0.99`` is 0.010000000000000009)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:  # NaN fails too
        raise ValueError(f"{owner}: {name}={value!r} must be a number in [0, 1] ({meaning})")
    return float(1 - Decimal(repr(float(value))))


def momentum_from_keras(m: float) -> float:
    r"""PyTorch momentum equal to Keras/Flax momentum ``m``: :math:`1 - m`.

    Keras/Flax: :math:`r \leftarrow m\, r + (1 - m)\, b` (m weighs the OLD running value, e.g. 0.99).
    PyTorch: :math:`r \leftarrow (1 - p)\, r + p\, b` (p weighs the NEW batch statistic, e.g. 0.01). Hence
    :math:`p = 1 - m`. The difference is taken on the shortest decimal form of ``m``, so ``0.99`` gives exactly
    ``0.01``.

    Args:
        m: Keras/Flax momentum in [0, 1].

    Returns:
        The PyTorch ``momentum`` (a float in [0, 1]) for torch.nn.BatchNorm*d and every normlab norm.

    Raises:
        ValueError: if ``m`` is not a real number in [0, 1] (NaN and bools included).

    Example:
        >>> from normlab.surgery.momentum import momentum_from_keras
        >>> momentum_from_keras(0.99)
        0.01
    """
    return _complement("momentum_from_keras", "m", m, "Keras/Flax momentum, the weight of the old running value")


def momentum_to_keras(m: float) -> float:
    r"""Keras/Flax momentum equal to PyTorch momentum ``m``: :math:`1 - m`.

    PyTorch: :math:`r \leftarrow (1 - m)\, r + m\, b` (m weighs the NEW batch statistic, e.g. 0.1).
    Keras/Flax: :math:`r \leftarrow k\, r + (1 - k)\, b` (k weighs the OLD running value, e.g. 0.9). Hence
    :math:`k = 1 - m`. PyTorch's ``momentum=None`` (cumulative average) has no Keras equivalent and is rejected.

    Args:
        m: PyTorch momentum in [0, 1].

    Returns:
        The Keras ``BatchNormalization(momentum=...)`` / Flax ``nn.BatchNorm(momentum=...)`` value.

    Raises:
        ValueError: if ``m`` is not a real number in [0, 1] (None, NaN and bools included).

    Example:
        >>> from normlab.surgery.momentum import momentum_to_keras
        >>> momentum_to_keras(0.1)
        0.9
    """
    return _complement("momentum_to_keras", "m", m, "PyTorch momentum, the weight of the new batch statistic")
