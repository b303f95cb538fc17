"""frozen_batch_norm, ghost_batch_norm and batch_renorm against torch's batch norm and float64 closed forms."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import batch_norm, batch_renorm, frozen_batch_norm, ghost_batch_norm
from tests.helpers import assert_all_close, forward_backward
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
EPS = 1e-5


def _input(shape, dtype=torch.float32, channels_last=False, scale=2.0, shift=1.0):
    x = torch.randn(shape, dtype=torch.float64).mul(scale).add(shift).to(dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _affine(c, dtype=torch.float32):
    return torch.empty(c, dtype=dtype).uniform_(0.5, 1.5), torch.empty(c, dtype=dtype).uniform_(-0.5, 0.5)


def _view(t, ndim):
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _bn64(x, weight=None, bias=None, eps=EPS):
    """Float64 batch norm with batch statistics, differentiable."""
    x = x.double()
    dims = _reduce_dims(x)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * _view(weight.double(), x.dim()) + _view(bias.double(), x.dim())
    return y


# ----------------------------------------------------------------------------------------------- frozen_batch_norm


@given(
    shape=st.sampled_from([(1, 3), (5, 7), (2, 3, 11), (1, 5, 3, 2), (3, 4, 7, 5), (2, 3, 2, 3, 5)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
    with_affine=st.booleans(),
)
def test_frozen_matches_float64_formula(shape, dtype, channels_last, with_affine):
    x = _input(shape, dtype, channels_last)
    c = shape[1]
    mean, var = torch.randn(c), torch.rand(c) + 0.1
    weight, bias = _affine(c) if with_affine else (None, None)
    y = frozen_batch_norm(x, mean, var, weight, bias, eps=EPS)
    expected = (x.double() - _view(mean.double(), x.dim())) / torch.sqrt(_view(var.double(), x.dim()) + EPS)
    if with_affine:
        expected = expected * _view(weight.double(), x.dim()) + _view(bias.double(), x.dim())
    assert y.dtype == dtype
    assert y.is_contiguous(
        memory_format=torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    )
    assert_close(y, expected, dtype=dtype)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (3, 3, 5, 7), (2, 3, 2, 3, 4)])
def test_frozen_equals_torch_batch_norm_eval(shape):
    x, g = _input(shape), torch.randn(shape)
    mean, var = torch.randn(3), torch.rand(3) + 0.1
    weight, bias = _affine(3)
    ours = forward_backward(lambda x: frozen_batch_norm(x, mean, var, weight, bias, EPS), x, g=g)
    ref = forward_backward(lambda x: F.batch_norm(x, mean, var, weight, bias, False, 0.0, EPS), x, g=g)
    assert_all_close(ours, ref)


def test_frozen_gradients_reach_weight_and_bias_when_they_require_grad():
    x, g = _input((3, 4, 5, 2)), torch.randn(3, 4, 5, 2)
    mean, var = torch.randn(4), torch.rand(4) + 0.1
    weight, bias = _affine(4)
    ours = forward_backward(lambda x, w, b: frozen_batch_norm(x, mean, var, w, b, EPS), x, weight, bias, g=g)
    ref = forward_backward(
        lambda x, w, b: (
            (x - _view(mean.double(), 4)) / torch.sqrt(_view(var.double(), 4) + EPS) * _view(w, 4) + _view(b, 4)
        ),
        x.double(),
        weight.double(),
        bias.double(),
        g=g,
    )
    assert_all_close(ours, ref, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ ghost_batch_norm


def _ghost64(x, vbs, weight=None, bias=None, eps=EPS):
    """Float64 ghost batch norm as a loop over chunks, each normalized with its own statistics."""
    return torch.cat([_bn64(chunk, weight, bias, eps) for chunk in x.double().split(vbs)])


@pytest.mark.parametrize("vbs", [6, 50])
def test_ghost_with_one_ghost_batch_equals_torch_batch_norm(vbs):
    x, g = _input((6, 3, 4, 5)), torch.randn(6, 3, 4, 5)
    weight, bias = _affine(3)
    rm1, rv1 = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    ours = forward_backward(
        lambda x, w, b: ghost_batch_norm(x, rm1, rv1, w, b, True, 0.3, EPS, virtual_batch_size=vbs),
        x,
        weight,
        bias,
        g=g,
    )
    ref = forward_backward(lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, True, 0.3, EPS), x, weight, bias, g=g)
    assert_all_close(ours, ref)
    assert_close(rm1, rm2)
    assert_close(rv1, rv2)


@pytest.mark.parametrize("n,vbs", [(12, 4), (7, 3), (11, 4), (5, 2)])
def test_ghost_normalizes_each_chunk_on_its_own(n, vbs):
    """Even split (N = 3 * vbs) and an uneven last chunk, against the float64 chunk-by-chunk formula."""
    x, g = _input((n, 3, 3, 2)), torch.randn(n, 3, 3, 2)
    weight, bias = _affine(3)
    ours = forward_backward(
        lambda x, w, b: ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=vbs), x, weight, bias, g=g
    )
    ref = forward_backward(lambda x, w, b: _ghost64(x, vbs, w, b), x.double(), weight.double(), bias.double(), g=g)
    assert_all_close(ours, ref, dtype=torch.float32)
    assert not torch.allclose(ours[0], _bn64(x, weight, bias).float(), atol=1e-2)  # ghost batches do matter


@pytest.mark.parametrize("n,vbs", [(12, 4), (7, 3)])
def test_ghost_running_stats_are_one_update_towards_the_chunks_average(n, vbs):
    x = _input((n, 3, 2, 5), torch.float64) + torch.arange(n, dtype=torch.float64).reshape(n, 1, 1, 1)
    running_mean, running_var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    old_mean, old_var = running_mean.clone(), running_var.clone()
    ghost_batch_norm(x, running_mean, running_var, training=True, momentum=0.3, virtual_batch_size=vbs)
    chunks = x.split(vbs)
    avg_mean = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    avg_var = torch.stack([c.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for c in chunks]).mean(0)
    assert_close(running_mean, 0.7 * old_mean + 0.3 * avg_mean)
    assert_close(running_var, 0.7 * old_var + 0.3 * avg_var)
    whole_var = x.transpose(0, 1).reshape(3, -1).var(1)
    assert not torch.allclose(running_var, 0.7 * old_var + 0.3 * whole_var)  # not the whole batch's statistics


@given(
    n=st.sampled_from([1, 2, 5, 7, 12]),
    vbs=st.sampled_from([1, 2, 3, 5, 16]),
    c=st.sampled_from([1, 3, 5]),
    hw=st.sampled_from([(1, 2), (3, 1), (2, 5)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_ghost_chunks_have_mean_zero_and_closed_form_variance(n, vbs, c, hw, dtype, channels_last):
    x = _input((n, c, *hw), dtype, channels_last)
    y = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=vbs)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for xc, yc in zip(x.double().split(vbs), y.double().split(vbs), strict=True):
        in_var = xc.var((0, 2, 3), unbiased=False)
        assert_close(yc.mean((0, 2, 3)), torch.zeros(c), dtype=dtype)
        assert_close(yc.var((0, 2, 3), unbiased=False), in_var / (in_var + EPS), dtype=dtype)


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_ghost_is_robust_to_a_large_offset(dtype, offset):
    x = (torch.randn(12, 3, 6, 6) + offset).to(dtype)
    y = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=4).double()
    for yc in y.split(4):
        assert yc.mean((0, 2, 3)).abs().max() < 1e-2
        assert (yc.std((0, 2, 3)) - 1).abs().max() < 1e-2


def test_ghost_eval_uses_running_stats_like_batch_norm():
    x = _input((7, 3, 4, 4))
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    weight, bias = _affine(3)
    y = ghost_batch_norm(x, mean, var, weight, bias, False, virtual_batch_size=2)
    assert_close(y, F.batch_norm(x, mean, var, weight, bias, False, 0.1, EPS))


def test_ghost_without_running_stats_uses_ghost_statistics_in_eval():
    x = _input((8, 3, 2, 2))
    assert_close(ghost_batch_norm(x, None, None, training=False, virtual_batch_size=4), _ghost64(x, 4))


def test_ghost_batch_of_one_value_per_channel_raises():
    with pytest.raises(ValueError, match=r"virtual_batch_size=4.*\(5, 3\)"):
        ghost_batch_norm(torch.randn(5, 3), None, None, training=True, virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=1.*\(6, 2, 1, 1\)"):
        ghost_batch_norm(torch.randn(6, 2, 1, 1), None, None, training=True, virtual_batch_size=1)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_ghost_bad_virtual_batch_size_raises(bad):
    with pytest.raises(ValueError, match=rf"virtual_batch_size={bad!r}"):
        ghost_batch_norm(torch.randn(4, 3, 2, 2), None, None, training=True, virtual_batch_size=bad)


# --------------------------------------------------------------------------------------------------- batch_renorm


def _renorm64(x, running_mean, running_var, r_max, d_max, weight=None, bias=None, eps=EPS, *, clip=True):
    """Float64 batch renorm; r and d are constants (computed without autograd) and, unless clip=False, clipped."""
    x = x.double()
    dims = _reduce_dims(x)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    sigma_batch = torch.sqrt(var + eps)
    with torch.no_grad():
        sigma = torch.sqrt(_view(running_var.double(), x.dim()) + eps)
        r = sigma_batch / sigma
        d = (mean - _view(running_mean.double(), x.dim())) / sigma
        if clip:
            r, d = r.clamp(1 / r_max, r_max), d.clamp(-d_max, d_max)
    y = (x - mean) / sigma_batch * r + d
    if weight is not None:
        y = y * _view(weight.double(), x.dim()) + _view(bias.double(), x.dim())
    return y


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (3, 3, 5, 2)])
def test_renorm_without_room_to_correct_equals_torch_batch_norm(shape):
    x, g = _input(shape, scale=3.0, shift=2.0), torch.randn(shape)
    weight, bias = _affine(3)
    rm1, rv1 = torch.tensor([5.0, -4.0, 0.0]), torch.tensor([0.01, 30.0, 1.0])  # far from the batch's statistics
    rm2, rv2 = rm1.clone(), rv1.clone()
    ours = forward_backward(
        lambda x, w, b: batch_renorm(x, rm1, rv1, w, b, True, 0.2, EPS, r_max=1.0, d_max=0.0), x, weight, bias, g=g
    )
    ref = forward_backward(lambda x, w, b: F.batch_norm(x, rm2, rv2, w, b, True, 0.2, EPS), x, weight, bias, g=g)
    assert_all_close(ours, ref)
    assert_close(rm1, rm2)
    assert_close(rv1, rv2)


def test_renorm_clips_r_and_d_closed_form():
    # channel 0: r and d clipped from above; 1: from below; 2: neither (running stats near the batch's)
    x = _input((6, 3, 4, 4), scale=1.0, shift=0.0)
    running_mean = torch.tensor([-20.0, 20.0, 0.05])
    running_var = torch.tensor([0.01, 100.0, 1.1])
    r_max, d_max = 2.0, 1.5
    sigma = torch.sqrt(running_var.double() + EPS)
    var, mean = torch.var_mean(x.double(), (0, 2, 3), unbiased=False)
    r_raw, d_raw = torch.sqrt(var + EPS) / sigma, (mean - running_mean.double()) / sigma
    assert r_raw[0] > r_max and r_raw[1] < 1 / r_max and 1 / r_max < r_raw[2] < r_max
    assert d_raw[0] > d_max and d_raw[1] < -d_max and abs(d_raw[2]) < d_max
    weight, bias = _affine(3)
    y = batch_renorm(x, running_mean.clone(), running_var.clone(), weight, bias, True, r_max=r_max, d_max=d_max)
    assert_close(y, _renorm64(x, running_mean, running_var, r_max, d_max, weight, bias))
    y_unit = batch_renorm(x, running_mean.clone(), running_var.clone(), training=True, r_max=r_max, d_max=d_max)
    y_unit = y_unit.double()
    assert_close(y_unit.mean((0, 2, 3)), torch.tensor([d_max, -d_max, d_raw[2]]), dtype=torch.float32)
    expected_std = torch.tensor([r_max, 1 / r_max, r_raw[2]]) * torch.sqrt(var / (var + EPS))
    assert_close(y_unit.std((0, 2, 3), unbiased=False), expected_std, dtype=torch.float32)


def test_renorm_has_no_gradient_through_r_and_d():
    # running statistics near the batch's, so r and d are inside their bounds, where a gradient could flow
    x, g = _input((5, 3, 3, 4)), torch.randn(5, 3, 3, 4)
    var, mean = torch.var_mean(x, (0, 2, 3), unbiased=False)
    running_mean, running_var = mean + torch.tensor([0.3, -0.2, 0.1]), var * torch.tensor([1.5, 0.6, 1.2])
    weight, bias = _affine(3)
    ours = forward_backward(
        lambda x, w, b: batch_renorm(x, running_mean.clone(), running_var.clone(), w, b, True),
        x,
        weight,
        bias,
        g=g,
    )
    ref = forward_backward(
        lambda x, w, b: _renorm64(x, running_mean, running_var, 3.0, 5.0, w, b),
        x.double(),
        weight.double(),
        bias.double(),
        g=g,
    )
    assert_all_close(ours, ref, dtype=torch.float32)

    def through_r_and_d(x):  # the same function with gradients through r and d: a different input gradient
        x = x.double()
        var, mean = torch.var_mean(x, (0, 2, 3), unbiased=False, keepdim=True)
        sigma = torch.sqrt(_view(running_var.double(), 4) + EPS)
        r, d = torch.sqrt(var + EPS) / sigma, (mean - _view(running_mean.double(), 4)) / sigma
        return ((x - mean) / torch.sqrt(var + EPS) * r + d) * _view(weight.double(), 4)

    assert not torch.allclose(ours[1], forward_backward(through_r_and_d, x, g=g)[1], atol=1e-3)


def test_renorm_updates_running_stats_like_batch_norm_whatever_the_bounds():
    x = _input((4, 3, 5, 5), scale=3.0, shift=2.0)
    rm1, rv1 = torch.tensor([5.0, -4.0, 0.0]), torch.tensor([0.01, 30.0, 1.0])
    rm2, rv2 = rm1.clone(), rv1.clone()
    batch_renorm(x, rm1, rv1, training=True, momentum=0.25)
    F.batch_norm(x, rm2, rv2, training=True, momentum=0.25)
    assert_close(rm1, rm2)
    assert_close(rv1, rv2)


def test_renorm_tensor_bounds_equal_python_bounds():
    x = _input((4, 3, 5, 5))
    mean, var = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.2, 5.0, 1.0])
    y_float = batch_renorm(x, mean.clone(), var.clone(), training=True, r_max=1.7, d_max=0.4)
    y_tensor = batch_renorm(
        x, mean.clone(), var.clone(), training=True, r_max=torch.tensor(1.7), d_max=torch.tensor(0.4)
    )
    assert_close(y_tensor, y_float)


@given(
    n=st.sampled_from([1, 2, 3, 8]),
    c=st.sampled_from([1, 3, 7]),
    hw=st.sampled_from([(1, 2), (3, 5), (4, 1)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_renorm_output_has_mean_d_and_std_r(n, c, hw, dtype, channels_last):
    x = _input((n, c, *hw), dtype, channels_last)
    running_mean, running_var = torch.randn(c), torch.rand(c) * 4 + 0.05
    y = batch_renorm(x, running_mean.clone(), running_var.clone(), training=True, r_max=2.0, d_max=1.0)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    var, mean = torch.var_mean(x.double(), (0, 2, 3), unbiased=False)
    sigma = torch.sqrt(running_var.double() + EPS)
    r = (torch.sqrt(var + EPS) / sigma).clamp(0.5, 2.0)
    d = ((mean - running_mean.double()) / sigma).clamp(-1.0, 1.0)
    y = y.double()
    assert_close(y.mean((0, 2, 3)), d, dtype=dtype, scale=2)
    assert_close(y.std((0, 2, 3), unbiased=False), r * torch.sqrt(var / (var + EPS)), dtype=dtype, scale=2)


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_renorm_is_robust_to_a_large_offset(dtype, offset):
    x = (torch.randn(8, 3, 8, 8) + offset).to(dtype)
    y = batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, r_max=1.0, d_max=0.0).double()
    assert y.mean((0, 2, 3)).abs().max() < 1e-2
    assert (y.std((0, 2, 3)) - 1).abs().max() < 1e-2


def test_renorm_eval_equals_batch_norm_eval():
    x = _input((5, 3, 4, 4))
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    weight, bias = _affine(3)
    y = batch_renorm(x, mean, var, weight, bias, False, r_max=1.5, d_max=0.5)
    assert_close(y, batch_norm(x, mean, var, weight, bias, False, 0.1, EPS))
    assert_close(y, F.batch_norm(x, mean, var, weight, bias, False, 0.1, EPS))


def test_renorm_bad_arguments_raise():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        batch_renorm(x, None, None, training=True)
    with pytest.raises(ValueError, match=r"r_max=0\.5"):
        batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, r_max=0.5)
    with pytest.raises(ValueError, match=r"d_max=-1"):
        batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, d_max=-1)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        batch_renorm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)
