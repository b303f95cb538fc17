"""Keras/Flax <-> PyTorch momentum conversion."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab.surgery.momentum import momentum_from_keras, momentum_to_keras


@pytest.mark.parametrize("keras,torch_m", [(0.99, 0.01), (0.9, 0.1), (0.999, 0.001), (0.0, 1.0), (1.0, 0.0), (1, 0.0)])
def test_known_values(keras, torch_m):
    assert momentum_from_keras(keras) == torch_m
    assert momentum_to_keras(torch_m) == float(keras)


@given(st.floats(0.0, 1.0))
def test_round_trip(m):
    assert momentum_to_keras(momentum_from_keras(m)) == pytest.approx(m, abs=1e-15)
    assert momentum_from_keras(momentum_to_keras(m)) == pytest.approx(m, abs=1e-15)
    assert 0.0 <= momentum_from_keras(m) <= 1.0


def test_same_update_in_both_conventions():
    running, batch, keras = torch.tensor(2.0), torch.tensor(5.0), 0.9
    keras_update = keras * running + (1 - keras) * batch
    bn = torch.nn.BatchNorm1d(1, momentum=momentum_from_keras(keras))
    bn.running_mean.fill_(running)
    bn(torch.full((4, 1), batch.item()) + torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]))
    torch.testing.assert_close(bn.running_mean, keras_update.reshape(1))


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf"), True, None, "0.9", torch.tensor(0.9)])
@pytest.mark.parametrize("fn", [momentum_from_keras, momentum_to_keras])
def test_bad_values(fn, bad):
    with pytest.raises(ValueError, match=re.escape(f"{fn.__name__}: m={bad!r}") + r" must be a number in \[0, 1\]"):
        fn(bad)
