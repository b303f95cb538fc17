"""filter_response_norm, evonorm_b0 and evonorm_s0 against float64 closed-form oracles, torch.nn.functional
equivalences (B0 without v == batch norm, S0 without v == group norm), properties and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import evonorm_b0, evonorm_s0, filter_response_norm
from tests.helpers import assert_all_close, forward_backward
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
SHAPES_4D = [(1, 3, 5, 7), (2, 6, 3, 3), (5, 4, 1, 2), (3, 10, 7, 1)]


def _view(p, ndim):
    return p.double().reshape((1, -1) + (1,) * (ndim - 2))


def _spatial(x):
    return tuple(range(2, x.dim()))


def _centered_var(x, dims):
    """Biased variance by the two-pass definition, in float64 (not torch.var, which the code under test uses)."""
    x = x.double()
    return (x - x.mean(dims, keepdim=True)).square().mean(dims, keepdim=True)


def frn_oracle(x, weight=None, bias=None, tau=None, eps=1e-6, learned_eps=None):
    x = x.double()
    size = math.prod(x.shape[2:])
    nu2 = torch.linalg.vector_norm(x, dim=_spatial(x), keepdim=True).square() / size
    total_eps = eps + (_view(learned_eps, x.dim()).abs() if learned_eps is not None else 0.0)
    y = x / torch.sqrt(nu2 + total_eps)
    if weight is not None:
        y = y * _view(weight, x.dim())
    if bias is not None:
        y = y + _view(bias, x.dim())
    if tau is not None:
        y = torch.where(y > _view(tau, x.dim()), y, _view(tau, x.dim()))
    return y


def b0_oracle(x, batch_var, weight, bias, v, eps):
    """EvoNorm-B0 with a given per-channel batch variance (C,)."""
    x = x.double()
    left = torch.sqrt(_view(batch_var, x.dim()) + eps)
    right = _view(v, x.dim()) * x + torch.sqrt(_centered_var(x, _spatial(x)) + eps)
    y = x / torch.where(left > right, left, right)
    return y * _view(weight, x.dim()) + _view(bias, x.dim())


def batch_var_oracle(x):
    return _centered_var(x, (0,) + _spatial(x)).flatten()


def group_std_oracle(x, groups, eps):
    n, c = x.shape[:2]
    flat = x.double().reshape(n, groups, -1)
    std = torch.sqrt(_centered_var(flat, (2,)) + eps)
    return std.repeat_interleave(c // groups, dim=1).reshape((n, c) + (1,) * (x.dim() - 2))


def s0_oracle(x, groups, weight, bias, v, eps):
    x = x.double()
    y = x * torch.sigmoid(_view(v, x.dim()) * x) / group_std_oracle(x, groups, eps)
    return y * _view(weight, x.dim()) + _view(bias, x.dim())


def _params(c, dtype=torch.float32, n=3):
    return [torch.empty(c, dtype=dtype).uniform_(-1.5, 1.5) for _ in range(n)]


def _to_format(x, channels_last):
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _assert_layout(y, x):
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- filter response norm


@pytest.mark.parametrize("shape", SHAPES_4D + [(2, 3, 6), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("learned", [False, True])
def test_frn_matches_oracle(shape, dtype, learned):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype)
    weight, bias, tau = _params(c)
    learned_eps = torch.empty(c).uniform_(-0.2, 0.2) if learned else None
    y = filter_response_norm(x, weight, bias, tau, 1e-6, learned_eps)
    assert_close(y, frn_oracle(x, weight, bias, tau, 1e-6, learned_eps))


def test_frn_gradients_match_oracle():
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    params = [*_params(4, torch.float64), torch.empty(4, dtype=torch.float64).uniform_(0.05, 0.3)]
    g = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    ours = forward_backward(lambda x, *p: filter_response_norm(x, *p[:3], 1e-6, p[3]), x, *params, g=g)
    ref = forward_backward(lambda x, *p: frn_oracle(x, *p[:3], 1e-6, p[3]), x, *params, g=g)
    assert_all_close(ours[1:], ref[1:])


@given(
    n=st.sampled_from([1, 2, 3]),
    c=st.sampled_from([1, 3, 7]),
    hw=st.sampled_from([(1, 2), (3, 5), (7, 7), (2, 11)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_frn_output_has_unit_mean_square(n, c, hw, dtype, channels_last):
    x = _to_format(torch.randn(n, c, *hw, dtype=torch.float64).mul(3).add(1).to(dtype), channels_last)
    y = filter_response_norm(x)
    _assert_layout(y, x)
    nu2 = x.double().square().mean((2, 3))
    expected = nu2 / (nu2 + 1e-6)
    assert_close(y.double().square().mean((2, 3)), expected, dtype=dtype)


def test_frn_is_invariant_to_positive_per_slice_scaling_but_not_to_shifts():
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    weight, bias, tau = _params(4, torch.float64)
    s = torch.empty(3, 4, 1, 1, dtype=torch.float64).uniform_(0.1, 10.0)
    y = filter_response_norm(x, weight, bias, tau, eps=1e-12)
    assert_close(filter_response_norm(x * s, weight, bias, tau, eps=1e-12), y)
    shifted = filter_response_norm(x + 1.0, weight, bias, tau, eps=1e-12)
    assert (shifted - y).abs().max() > 0.1


def test_frn_tlu_clamps_at_tau():
    x = torch.randn(2, 3, 6, 6)
    tau = torch.tensor([-0.5, 0.0, 0.7])
    linear = filter_response_norm(x)
    y = filter_response_norm(x, tau=tau)
    view = tau.view(1, 3, 1, 1)
    assert (y >= view).all()
    clamped = linear < view
    assert clamped.any() and (~clamped).any()
    assert torch.equal(y[clamped], view.expand_as(y)[clamped])
    assert torch.equal(y[~clamped], linear[~clamped])


def test_frn_learned_eps_adds_its_absolute_value_and_has_a_gradient():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    learned = torch.tensor([0.3, -0.3, 0.1], dtype=torch.float64, requires_grad=True)
    y = filter_response_norm(x, eps=1e-3, learned_eps=learned)
    expected = torch.cat(
        [filter_response_norm(x[:, i : i + 1], eps=1e-3 + abs(float(learned.detach()[i]))) for i in range(3)], dim=1
    )
    assert_close(y, expected)
    y.square().sum().backward()
    # a larger |eps| shrinks every output: the gradient pushes |eps| down, i.e. against the sign of the parameter
    assert torch.equal(torch.sign(learned.grad), -torch.sign(learned.detach()))


# ---------------------------------------------------------------- EvoNorm-B0


@pytest.mark.parametrize("shape", SHAPES_4D[1:] + [(2, 3, 6), (2, 3, 2, 3, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_b0_training_matches_oracle_and_updates_running_stats(shape, dtype, channels_last):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64).mul(2).add(0.5).to(dtype)
    if channels_last and len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    weight, bias, v = _params(c)
    running_mean, running_var = torch.zeros(c), torch.full((c,), 2.0)
    y = evonorm_b0(x, running_var, weight, bias, v, True, 0.25, 1e-5, running_mean=running_mean)
    _assert_layout(y, x)
    var = batch_var_oracle(x)
    assert_close(y, b0_oracle(x, var, weight, bias, v, 1e-5))
    count = x.numel() // c
    assert_close(running_var, 0.75 * 2.0 + 0.25 * var * count / (count - 1), dtype=torch.float32)
    mean = x.double().mean((0,) + _spatial(x))
    assert_close(running_mean, 0.25 * mean, dtype=torch.float32)


def test_b0_without_running_mean_updates_running_var_only():
    x = torch.randn(4, 3, 5, 5)
    running_var = torch.ones(3)
    evonorm_b0(x, running_var, v=torch.ones(3), training=True, momentum=1.0)
    assert_close(running_var, x.double().var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_b0_eval_uses_running_var_and_leaves_it(dtype):
    x = torch.randn(2, 4, 5, 3, dtype=dtype)
    weight, bias, v = _params(4)
    running_var = torch.tensor([0.5, 1.0, 2.0, 4.0])
    before = running_var.clone()
    y = evonorm_b0(x, running_var, weight, bias, v, False, 0.1, 1e-5)
    assert_close(y, b0_oracle(x, running_var, weight, bias, v, 1e-5))
    assert torch.equal(running_var, before)
    # a batch of one is fine in eval: nothing is estimated from the batch
    assert evonorm_b0(x[:1, :, :1, :1], running_var, v=v).shape == (1, 4, 1, 1)


def test_b0_without_running_var_uses_batch_stats_in_eval():
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    weight, bias, v = _params(4, torch.float64)
    y = evonorm_b0(x, None, weight, bias, v, training=False)
    assert_close(y, b0_oracle(x, batch_var_oracle(x), weight, bias, v, 1e-5))


def test_b0_gradients_match_oracle():
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    params = _params(4, torch.float64)
    g = torch.randn_like(x)
    ours = forward_backward(lambda x, *p: evonorm_b0(x, None, *p, training=True), x, *params, g=g)
    ref = forward_backward(lambda x, *p: b0_oracle(x, batch_var_oracle(x).flatten(), *p, 1e-5), x, *params, g=g)
    assert_all_close(ours[1:], ref[1:])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_b0_without_v_is_batch_norm(training, dtype):
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64).mul(2).add(1).to(dtype)
    weight, bias = _params(3, n=2)
    stats = [torch.randn(3), torch.rand(3) + 0.5]
    torch_stats = [s.double() for s in stats]
    y = evonorm_b0(x, stats[1], weight, bias, None, training, 0.1, 1e-5, running_mean=stats[0])
    expected = F.batch_norm(x.double(), *torch_stats, weight.double(), bias.double(), training, 0.1, 1e-5)
    assert_close(y, expected)
    for ours, ref in zip(stats, torch_stats, strict=True):
        assert_close(ours, ref)


@given(
    n=st.sampled_from([2, 3, 5]),
    c=st.sampled_from([1, 3, 7]),
    hw=st.sampled_from([(1, 2), (3, 5), (7, 7), (2, 11)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_b0_with_v_zero_divides_each_slice_by_the_larger_std(n, c, hw, dtype, channels_last):
    x = _to_format(torch.randn(n, c, *hw, dtype=torch.float64).mul(3).add(1).to(dtype), channels_last)
    y = evonorm_b0(x, None, v=torch.zeros(c), training=True)
    _assert_layout(y, x)
    xd = x.double()
    std_b = (batch_var_oracle(xd).view(1, c, 1, 1) + 1e-5).sqrt()
    std_i = (_centered_var(xd, (2, 3)) + 1e-5).sqrt()
    # y = x / max(std_b, std_i) per (n, c): its spatial std is std_i' / max(std_b, std_i)
    expected = _centered_var(xd, (2, 3)).sqrt() / torch.maximum(std_b, std_i)
    assert_close(_centered_var(y, (2, 3)).sqrt(), expected, dtype=dtype)
    assert (y.double().std((2, 3), unbiased=False) <= 1 + 2e-2).all()


@given(
    n=st.sampled_from([1, 2, 5]),
    c=st.sampled_from([1, 3, 7]),
    hw=st.sampled_from([(2, 2), (3, 5), (7, 7)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_b0_without_v_output_has_zero_mean_unit_var(n, c, hw, dtype, channels_last):
    x = _to_format(torch.randn(n, c, *hw, dtype=torch.float64).mul(2).add(1).to(dtype), channels_last)
    y = evonorm_b0(x, None, training=True)
    _assert_layout(y, x)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert y.double().mean((0, 2, 3)).abs().max() < tol
    var = batch_var_oracle(x)
    assert_close(_centered_var(y, (0, 2, 3)).flatten(), var / (var + 1e-5), dtype=torch.float32, scale=tol / 1e-5)


# ---------------------------------------------------------------- EvoNorm-S0


@pytest.mark.parametrize("shape,groups", [((1, 6, 5, 7), 3), ((2, 6, 3, 3), 1), ((3, 4, 1, 2), 4), ((2, 6, 5), 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_s0_matches_oracle(shape, groups, dtype, channels_last):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64).mul(2).add(0.5).to(dtype)
    if channels_last and len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    weight, bias, v = _params(c)
    y = evonorm_s0(x, groups, weight, bias, v, 1e-5)
    _assert_layout(y, x)
    assert_close(y, s0_oracle(x, groups, weight, bias, v, 1e-5))


def test_s0_gradients_match_oracle():
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    params = _params(6, torch.float64)
    g = torch.randn_like(x)
    ours = forward_backward(lambda x, *p: evonorm_s0(x, 3, *p), x, *params, g=g)
    ref = forward_backward(lambda x, *p: s0_oracle(x, 3, *p, 1e-5), x, *params, g=g)
    assert_all_close(ours[1:], ref[1:])


@given(
    n=st.sampled_from([1, 2, 3]),
    cg=st.sampled_from([(1, 1), (6, 3), (7, 7), (12, 4), (10, 5)]),
    hw=st.sampled_from([(1, 2), (3, 5), (7, 7)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_s0_with_v_zero_is_half_x_over_group_std(n, cg, hw, dtype, channels_last):
    c, groups = cg
    x = _to_format(torch.randn(n, c, *hw, dtype=torch.float64).mul(3).add(1).to(dtype), channels_last)
    y = evonorm_s0(x, groups, v=torch.zeros(c))
    _assert_layout(y, x)
    expected = 0.5 * x.double() / group_std_oracle(x, groups, 1e-5)
    assert_close(y, expected)


@given(
    n=st.sampled_from([1, 2, 3]),
    cg=st.sampled_from([(6, 3), (7, 7), (12, 4), (10, 1)]),
    hw=st.sampled_from([(2, 2), (3, 5), (7, 7)]),
    dtype=st.sampled_from(DTYPES),
    channels_last=st.booleans(),
)
def test_s0_without_v_is_group_norm_with_zero_mean_unit_var(n, cg, hw, dtype, channels_last):
    c, groups = cg
    x = _to_format(torch.randn(n, c, *hw, dtype=torch.float64).mul(2).add(1).to(dtype), channels_last)
    weight, bias = _params(c, n=2)
    y = evonorm_s0(x, groups, weight, bias, None, 1e-5)
    _assert_layout(y, x)
    assert_close(y, F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-5))
    plain = evonorm_s0(x, groups).double().reshape(n, groups, -1)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert plain.mean(-1).abs().max() < tol
    var = _centered_var(x.reshape(n, groups, -1), (2,)).squeeze(-1)
    assert_close(_centered_var(plain, (2,)).squeeze(-1), var / (var + 1e-5), dtype=torch.float32, scale=tol / 1e-5)


# ---------------------------------------------------------------- numerical robustness (mean/var based)

OFFSETS = [(torch.float32, 1e4), (torch.bfloat16, 100.0)]


def _offset_input(dtype, offset, shape=(8, 4, 8, 8)):
    return (torch.randn(shape, dtype=torch.float64) + offset).to(dtype)


@pytest.mark.parametrize("dtype,offset", OFFSETS)
@pytest.mark.parametrize("layer", ["b0", "s0"])
def test_large_offset_normalizes_without_v(layer, dtype, offset):
    x = _offset_input(dtype, offset)
    y = evonorm_b0(x, None, training=True) if layer == "b0" else evonorm_s0(x, 2)
    y = y.double()
    assert y.mean().abs() < 1e-2
    assert (y.std() - 1).abs() < 1e-2


@pytest.mark.parametrize("dtype,offset", OFFSETS)
def test_large_offset_keeps_the_nonlinear_variances(dtype, offset):
    x = _offset_input(dtype, offset)
    zeros, ones = torch.zeros(4), torch.ones(4)
    # v = 0 makes B0 depend on nothing but the two variances (the v * x term would otherwise dominate)
    b0 = evonorm_b0(x, None, v=zeros, training=True)
    assert_close(b0, b0_oracle(x, batch_var_oracle(x), ones, zeros, zeros, 1e-5))
    s0 = evonorm_s0(x, 2, v=ones)
    assert_close(s0, s0_oracle(x, 2, ones, zeros, ones, 1e-5))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda x: filter_response_norm(x), "filter_response_norm"),
        (lambda x: evonorm_b0(x, None, v=torch.ones(3), training=True), "evonorm_b0"),
        (lambda x: evonorm_s0(x, 1), "evonorm_s0"),
    ],
)
def test_functional_rejects_inputs_without_spatial_dims(call, name):
    with pytest.raises(ValueError, match=rf"{name}: expected 3D or 4D or 5D input .*\(4, 3\)"):
        call(torch.randn(4, 3))


def test_s0_bad_groups_raise():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"evonorm_s0: num_groups=4 must divide channels=6"):
        evonorm_s0(x, 4)
    with pytest.raises(ValueError, match=r"evonorm_s0: num_groups=0 must be a positive integer"):
        evonorm_s0(x, 0)


def test_b0_one_value_per_channel_in_training_raises():
    with pytest.raises(ValueError, match=r"evonorm_b0: expected more than 1 value per channel.*\(1, 3, 1, 1\)"):
        evonorm_b0(torch.randn(1, 3, 1, 1), torch.ones(3), v=torch.ones(3), training=True)


def test_b0_without_v_needs_both_running_buffers():
    with pytest.raises(ValueError, match=r"evonorm_b0: .*running_mean=None and running_var=a tensor"):
        evonorm_b0(torch.randn(2, 3, 2, 2), torch.ones(3))
