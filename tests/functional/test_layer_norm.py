"""layer_norm / layer_norm2d / rms_norm / rms_norm2d references and their native versions, against torch and
closed-form statistics."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from normlab.functional import group_norm, layer_norm, layer_norm2d, rms_norm, rms_norm2d
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
SHAPES = [(5, 6), (2, 6, 7), (3, 6, 5, 4), (2, 6, 3, 2, 5)]


def per_channel(p: torch.Tensor, ndim: int) -> torch.Tensor:
    return p.reshape((-1,) + (1,) * (ndim - 2))


def channels_last_view(fn):
    """Apply a last-dimension norm ``fn(t, *params)`` over dim 1 of an (N, C, *) tensor (the timm LayerNorm2d way)."""
    return lambda x, *params: fn(x.movedim(1, -1), *params).movedim(-1, 1)


# ---- oracles: torch.nn.functional ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_is_torch_layer_norm_over_all_but_batch_then_per_channel_affine(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)

    def oracle(x, w, b):
        return F.layer_norm(x, x.shape[1:], eps=1e-3) * per_channel(w, x.dim()) + per_channel(b, x.dim())

    assert_all_close(forward_backward(lambda *a: layer_norm(*a, eps=1e-3), x, w, b), forward_backward(oracle, x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_of_2d_input_is_torch_layer_norm(dtype):
    x, w, b = torch.randn(7, 6, dtype=dtype), torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    actual = forward_backward(layer_norm, x, w, b)
    expected = forward_backward(lambda x, w, b: F.layer_norm(x, (6,), w, b, 1e-5), x, w, b)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm2d_is_torch_layer_norm_over_permuted_channels(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    w, b = torch.randn(6, dtype=dtype), torch.randn(6, dtype=dtype)
    oracle = channels_last_view(lambda t, w, b: F.layer_norm(t, (6,), w, b, 1e-6))
    assert_all_close(forward_backward(layer_norm2d, x, w, b), forward_backward(oracle, x, w, b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_is_torch_rms_norm_over_all_but_batch_then_per_channel_scale(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    w = torch.randn(6, dtype=dtype)

    def oracle(x, w):
        return F.rms_norm(x, x.shape[1:], eps=1e-6) * per_channel(w, x.dim())

    assert_all_close(forward_backward(rms_norm, x, w), forward_backward(oracle, x, w))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm2d_is_torch_rms_norm_over_permuted_channels(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3 + 2
    w = torch.randn(6, dtype=dtype)
    oracle = channels_last_view(lambda t, w: F.rms_norm(t, (6,), w, 1e-6))
    assert_all_close(forward_backward(rms_norm2d, x, w), forward_backward(oracle, x, w))


def test_rms_norm_does_not_subtract_the_mean():
    x = torch.full((2, 3, 4), 5.0)
    assert_close(rms_norm(x), torch.ones_like(x))
    assert_close(rms_norm2d(x), torch.ones_like(x))


def test_layer_norm_equals_group_norm_with_one_group():
    x, w, b = torch.randn(2, 6, 5, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64), torch.randn(6)
    assert_all_close(
        forward_backward(layer_norm, x, w, b), forward_backward(lambda *a: group_norm(a[0], 1, *a[1:]), x, w, b)
    )


# ---- closed-form statistics ---------------------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3, 5, 8]), st.lists(st.integers(1, 7), max_size=3))


def _input(shape, dtype, channels_last):
    n, c, spatial = shape
    x = seeded_randn((n, c, *spatial), dtype) * 5 + 3
    assume(not channels_last or x.dim() in CHANNELS_LAST)
    return in_format(x, channels_last)


@given(shape=shapes, dtype=st.sampled_from(DTYPES), channels_last=st.booleans())
def test_layer_norm_standardizes_each_sample(shape, dtype, channels_last):
    x = _input(shape, dtype, channels_last)
    assume(x[0].numel() >= 4)
    y = layer_norm(x, eps=1e-20)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    var, mean = torch.var_mean(y.double().flatten(1), dim=1, correction=0)
    assert mean.abs().max() < STAT_TOL[dtype] and (var - 1).abs().max() < STAT_TOL[dtype]


@given(shape=shapes, dtype=st.sampled_from(DTYPES), channels_last=st.booleans())
def test_layer_norm2d_standardizes_each_position(shape, dtype, channels_last):
    x = _input(shape, dtype, channels_last)
    assume(x.shape[1] >= 3)
    y = layer_norm2d(x, eps=1e-20)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    var, mean = torch.var_mean(y.double(), dim=1, correction=0)
    assert mean.abs().max() < STAT_TOL[dtype] and (var - 1).abs().max() < STAT_TOL[dtype]


@given(shape=shapes, dtype=st.sampled_from(DTYPES), channels_last=st.booleans())
def test_rms_norm_gives_unit_mean_square_per_sample(shape, dtype, channels_last):
    x = _input(shape, dtype, channels_last)
    y = rms_norm(x, eps=1e-20)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    assert (y.double().square().flatten(1).mean(1) - 1).abs().max() < STAT_TOL[dtype]


@given(shape=shapes, dtype=st.sampled_from(DTYPES), channels_last=st.booleans())
def test_rms_norm2d_gives_unit_mean_square_per_position(shape, dtype, channels_last):
    x = _input(shape, dtype, channels_last)
    y = rms_norm2d(x, eps=1e-20)
    assert y.dtype == dtype
    assert_same_memory_format(y, x)
    assert (y.double().square().mean(1) - 1).abs().max() < STAT_TOL[dtype]


# ---- native vs reference ------------------------------------------------------------------------------------------

OPS = {
    "layer_norm": (layer_norm, native.layer_norm, True),
    "layer_norm2d": (layer_norm2d, native.layer_norm2d, True),
    "rms_norm": (rms_norm, native.rms_norm, False),
    "rms_norm2d": (rms_norm2d, native.rms_norm2d, False),
}


def _native_cases():
    for op in OPS:
        for dtype in DTYPES:
            for shape in [(3, 6, 5, 7), (2, 6, 3, 4, 5)]:
                for channels_last in (False, True):
                    yield pytest.param(
                        op, dtype, shape, channels_last, id=f"{op}-{dtype}-{len(shape)}d-cl{int(channels_last)}"
                    )
            for shape in [(5, 6), (2, 6, 11)]:
                yield pytest.param(op, dtype, shape, False, id=f"{op}-{dtype}-{len(shape)}d")


@pytest.mark.parametrize("op,dtype,shape,channels_last", list(_native_cases()))
def test_native_matches_reference(op, dtype, shape, channels_last):
    reference_fn, native_fn, has_bias = OPS[op]
    x = in_format((torch.randn(shape) * 2 + 1).to(dtype), channels_last)
    params = [torch.randn(6, dtype=dtype)] + ([torch.randn(6, dtype=dtype)] if has_bias else [])
    actual = forward_backward(lambda *a: native_fn(*a, eps=1e-4), x, *params)
    expected = forward_backward(lambda *a: reference_fn(*a, eps=1e-4), x, *params)
    assert actual[0].dtype == dtype
    assert_same_memory_format(actual[0], x)
    assert_all_close(actual, expected, scale=2)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(4096, 8), (16, 8, 16, 16)])
def test_native_bfloat16_parameter_gradients_match_float64(op, shape):
    """Summing a weight or bias gradient over thousands of positions must not accumulate in bfloat16."""
    reference_fn, native_fn, has_bias = OPS[op]
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    params = [torch.randn(8, dtype=torch.float64) for _ in range(2 if has_bias else 1)]
    exact = forward_backward(reference_fn, x, *params)
    actual = forward_backward(native_fn, x.bfloat16(), *(p.bfloat16() for p in params))
    for a, e in zip(actual[2:], exact[2:], strict=True):
        assert ((a.double() - e).abs().max() / e.abs().max()).item() < 1e-2
