"""standardize_weight against a float64 oracle written with torch.nn.functional.batch_norm, its closed-form
statistics, the NF-Net scaling and robustness to a large offset."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import standardize_weight
from tests.helpers import assert_all_close, forward_backward
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def oracle(weight, eps=1e-6, gain=None, scale=1.0):
    """Per-output-channel standardization as a batch norm over a (1, C_out, fan_in) view, in float64."""
    w = weight.double()
    factor = torch.full((w.shape[0],), float(scale), dtype=torch.float64)
    if gain is not None:
        factor = factor * gain.double()
    flat = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=factor, training=True, eps=eps)
    return flat.reshape(w.shape)


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (5, 1, 1, 7), (1, 4, 2, 2), (6, 10), (4, 2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(shape, dtype):
    w = torch.randn(shape, dtype=torch.float64).mul(0.1).add(0.02).to(dtype)
    gain = torch.empty(shape[0]).uniform_(0.5, 2.0)
    assert_close(standardize_weight(w), oracle(w))
    assert_close(standardize_weight(w, 1e-3, gain, 0.25), oracle(w, 1e-3, gain, 0.25))


def test_gradients_match_oracle():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    gain = torch.rand(6, dtype=torch.float64) + 0.5
    upstream = torch.randn_like(w)
    ours = forward_backward(lambda w, gain: standardize_weight(w, 1e-6, gain, 0.3), w, gain, g=upstream)
    ref = forward_backward(lambda w, gain: oracle(w, 1e-6, gain, 0.3), w, gain, g=upstream)
    assert_all_close(ours[1:], ref[1:])


@given(
    out=st.sampled_from([1, 3, 7, 16]),
    fan=st.sampled_from([(1, 1, 2), (3, 3, 3), (5, 1, 1), (2, 7, 1)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_each_output_channel_has_zero_mean_unit_var(out, fan, dtype, channels_last):
    w = torch.randn(out, *fan, dtype=torch.float64).mul(0.5).add(0.3).to(dtype)
    if channels_last:
        w = w.to(memory_format=torch.channels_last)
    y = standardize_weight(w)
    assert y.dtype == dtype and y.shape == w.shape
    if channels_last and not w.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    yd = y.double().flatten(1)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert yd.mean(1).abs().max() < tol
    var = w.double().flatten(1).var(1, unbiased=False)
    assert_close(yd.var(1, unbiased=False), var / (var + 1e-6), dtype=torch.float32, scale=tol / 1e-5)


def test_scale_and_gain_set_each_output_channel_norm():
    fan_in = 3 * 3 * 3
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    gain = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0], dtype=torch.float64)
    gamma = 1.7
    y = standardize_weight(w, 1e-12, gain, gamma * fan_in**-0.5)
    # fan_in values of variance 1 have L2 norm sqrt(fan_in); the scale cancels it, leaving |gamma * gain|
    assert_close(torch.linalg.vector_norm(y, dim=(1, 2, 3)), (gamma * gain).abs())


def test_invariant_to_per_channel_affine_reparameterization():
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    a = torch.tensor([0.01, 1.0, 30.0, 5.0], dtype=torch.float64).view(4, 1, 1, 1)
    b = torch.tensor([-3.0, 0.0, 2.0, 100.0], dtype=torch.float64).view(4, 1, 1, 1)
    assert_close(standardize_weight(a * w + b, eps=1e-14), standardize_weight(w, eps=1e-14))


def test_single_fan_in_element_standardizes_to_zero():
    y = standardize_weight(torch.randn(4, 1, 1, 1))
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_large_offset_is_stable(dtype, offset):
    w = (torch.randn(4, 16, 4, 4, dtype=torch.float64) + offset).to(dtype)
    y = standardize_weight(w).double().flatten(1)
    assert y.mean(1).abs().max() < 1e-2
    assert (y.std(1) - 1).abs().max() < 1e-2
