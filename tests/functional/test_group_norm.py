"""group_norm / instance_norm references and their native versions, against torch and closed-form statistics."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from normlab.functional import group_norm, instance_norm
from normlab.kernels import native
from tests.helpers import (
    CHANNELS_LAST,
    assert_all_close,
    assert_same_memory_format,
    forward_backward,
    in_format,
    seeded_randn,
)
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# |statistic - target| allowed for a normalized output; bfloat16 output rounding alone moves values by 2**-9.
STAT_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2}


def assert_standardized(y: torch.Tensor, dims, dtype: torch.dtype):
    """Mean 0 and biased variance 1 over ``dims``."""
    var, mean = torch.var_mean(y.double(), dim=dims, correction=0)
    tol = STAT_TOL[dtype]
    assert mean.abs().max().item() < tol
    assert (var - 1).abs().max().item() < tol


# ---- oracle: torch.nn.functional ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 6), (1, 6, 7), (3, 6, 5, 4), (2, 6, 3, 2, 5)])
@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_matches_torch(shape, num_groups, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    actual = forward_backward(lambda x, w, b: group_norm(x, num_groups, w, b, eps=1e-3), x, w, b)
    expected = forward_backward(lambda x, w, b: F.group_norm(x, num_groups, w, b, eps=1e-3), x, w, b)
    assert_all_close(actual, expected)


def test_group_norm_without_affine_matches_torch():
    x = torch.randn(2, 6, 4, 4)
    assert_close(group_norm(x, 3), F.group_norm(x, 3))


@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 4, 3, 5), (2, 4, 2, 3, 3)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_instance_norm_matches_torch(shape, affine, use_input_stats):
    x = torch.randn(shape, dtype=torch.float64) * 2 - 1
    w, b = (torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) if affine else (None, None)
    buffers = {}

    def run(fn, key):
        running_mean = torch.linspace(-1, 1, 4, dtype=torch.float64)
        running_var = torch.linspace(0.5, 2, 4, dtype=torch.float64)
        out = forward_backward(
            lambda x, w, b: fn(x, running_mean, running_var, w, b, use_input_stats, 0.3, 1e-4), x, w, b
        )
        buffers[key] = (running_mean, running_var)
        return out

    actual, expected = run(instance_norm, "ours"), run(F.instance_norm, "torch")
    assert_all_close([*actual, *buffers["ours"]], [*expected, *buffers["torch"]])


def test_instance_norm_without_buffers_matches_torch():
    x = torch.randn(2, 3, 5, 5)
    assert_close(instance_norm(x), F.instance_norm(x))


def test_instance_norm_updates_running_stats_with_batch_average_of_unbiased_instance_stats():
    x = torch.randn(3, 2, 10, dtype=torch.float64) * 4 + 1
    running_mean, running_var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    instance_norm(x, running_mean, running_var, momentum=0.25)
    assert_close(running_mean, 0.75 * 0 + 0.25 * x.mean(2).mean(0))
    assert_close(running_var, 0.75 * 1 + 0.25 * x.var(2, correction=1).mean(0))


# ---- closed-form statistics ---------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 3),
    num_groups=st.sampled_from([1, 2, 3]),
    per_group=st.sampled_from([1, 2, 3, 5]),
    spatial=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_group_norm_standardizes_each_group(n, num_groups, per_group, spatial, dtype, channels_last):
    shape = (n, num_groups * per_group, *spatial)
    assume(per_group * torch.Size(spatial).numel() >= 4)
    assume(not channels_last or len(shape) in CHANNELS_LAST)
    x = in_format(seeded_randn(shape, dtype) * 5 + 3, channels_last)
    y = group_norm(x, num_groups, eps=1e-20)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    assert_standardized(y.reshape(n, num_groups, -1), (2,), dtype)


@given(
    n=st.integers(1, 3),
    c=st.sampled_from([1, 2, 3, 5]),
    spatial=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_instance_norm_standardizes_each_instance(n, c, spatial, dtype, channels_last):
    shape = (n, c, *spatial)
    assume(torch.Size(spatial).numel() >= 4)
    assume(not channels_last or len(shape) in CHANNELS_LAST)
    x = in_format(seeded_randn(shape, dtype) * 5 + 3, channels_last)
    y = instance_norm(x, eps=1e-20)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    assert_standardized(y.flatten(2), (2,), dtype)


def test_instance_norm_with_running_stats_normalizes_by_them():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean, var = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64)
    y = instance_norm(x, mean, var, use_input_stats=False, eps=0.0)
    assert_close(y, (x - mean.view(1, 3, 1, 1)) / var.sqrt().view(1, 3, 1, 1))


# ---- native vs reference ------------------------------------------------------------------------------------------


def _native_cases():
    for dtype in DTYPES:
        for shape in [(3, 6, 5, 7), (2, 6, 3, 4, 5)]:
            for channels_last in (False, True):
                yield pytest.param(dtype, shape, channels_last, id=f"{dtype}-{len(shape)}d-cl{int(channels_last)}")
    yield pytest.param(torch.float32, (1, 6, 11), False, id="float32-3d")


@pytest.mark.parametrize("dtype,shape,channels_last", list(_native_cases()))
def test_native_group_norm_matches_reference(dtype, shape, channels_last):
    x = in_format((torch.randn(shape) * 2 + 1).to(dtype), channels_last)
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    actual = forward_backward(lambda x, w, b: native.group_norm(x, 3, w, b, 1e-4), x, w, b)
    expected = forward_backward(lambda x, w, b: group_norm(x, 3, w, b, 1e-4), x, w, b)
    assert actual[0].dtype == dtype
    assert_same_memory_format(actual[0], x)
    assert_same_memory_format(expected[0], x)
    assert_all_close(actual, expected, scale=2)


@pytest.mark.parametrize("dtype,shape,channels_last", list(_native_cases()))
@pytest.mark.parametrize("use_input_stats", [True, False])
def test_native_instance_norm_matches_reference(dtype, shape, channels_last, use_input_stats):
    x = in_format((torch.randn(shape) * 2 + 1).to(dtype), channels_last)
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    buffers = {}

    def run(fn, key):
        running_mean = torch.linspace(-1, 1, 6, dtype=dtype)
        running_var = torch.linspace(0.5, 2, 6, dtype=dtype)
        out = forward_backward(
            lambda x, w, b: fn(x, running_mean, running_var, w, b, use_input_stats, 0.2, 1e-4), x, w, b
        )
        buffers[key] = (running_mean, running_var)
        return out

    actual, expected = run(native.instance_norm, "native"), run(instance_norm, "reference")
    assert actual[0].dtype == dtype
    assert_same_memory_format(actual[0], x)
    assert_same_memory_format(expected[0], x)
    assert_all_close([*actual, *buffers["native"]], [*expected, *buffers["reference"]], scale=2)


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_group_norm_rejects_num_groups_not_dividing_channels():
    with pytest.raises(ValueError, match=r"num_groups=4 must divide num_channels=6"):
        group_norm(torch.randn(2, 6, 3), 4)


def test_group_norm_rejects_non_positive_num_groups():
    with pytest.raises(ValueError, match=r"num_groups=0 must be a positive integer"):
        group_norm(torch.randn(2, 6, 3), 0)


def test_instance_norm_rejects_a_single_spatial_value():
    with pytest.raises(ValueError, match=r"more than 1 spatial value.*shape \(2, 3, 1, 1\)"):
        instance_norm(torch.randn(2, 3, 1, 1))


def test_instance_norm_without_input_stats_needs_running_stats():
    with pytest.raises(ValueError, match=r"use_input_stats=False.*got None"):
        instance_norm(torch.randn(2, 3, 4), use_input_stats=False)


def test_instance_norm_rejects_a_single_running_buffer():
    with pytest.raises(ValueError, match=r"running_mean=Tensor, running_var=NoneType"):
        instance_norm(torch.randn(2, 3, 4), torch.zeros(3), None)


@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_native_bfloat16_parameter_gradients_match_float64(op):
    """Summing a weight or bias gradient over thousands of positions must not accumulate in bfloat16."""
    fns = {
        "group_norm": (lambda x, w, b: group_norm(x, 2, w, b), lambda x, w, b: native.group_norm(x, 2, w, b)),
        "instance_norm": (
            lambda x, w, b: instance_norm(x, None, None, w, b),
            lambda x, w, b: native.instance_norm(x, None, None, w, b),
        ),
    }
    reference_fn, native_fn = fns[op]
    x = torch.randn(16, 8, 16, 16, dtype=torch.float64) * 2 + 1
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    exact = forward_backward(reference_fn, x, w, b)
    actual = forward_backward(native_fn, x.bfloat16(), w.bfloat16(), b.bfloat16())
    for a, e in zip(actual[2:], exact[2:], strict=True):
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < 1e-2
