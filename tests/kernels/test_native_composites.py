"""normlab.kernels.native's hand-derived autograd Function for FRN + TLU against the functional reference: output
and every gradient (input, weight, bias, tau, learned_eps) in float64 at float64 tolerance,
float32 and bfloat16 against the float64 reference, layouts and ranks, batch 1, one position, optional parameters
left out, TLU ties, gradcheck, dispatch, bad input and torch.compile(fullgraph=True) of the layers."""

import itertools

import pytest
import torch

from normlab import functional as reference
from normlab import kernels
from normlab.kernels import native
from normlab.layers.filter_response_norm import FilterResponseNorm2d
from tests.helpers import (
    assert_all_close,
    assert_same_memory_format,
    forward_backward,
    grad_like,
    in_layout,
    randomize_affine,
    run,
)

FRN_NAMES = ("weight", "bias", "tau", "learned_eps")
# (shape, groups): batch 1, a single position (nu^2 = x^2), primes, 3-D and 5-D.
SHAPES = [
    ((2, 6, 5, 3), 2),
    ((1, 4, 7, 7), 4),
    ((3, 6, 1, 1), 3),
    ((1, 5, 1, 1), 1),
    ((3, 6, 7), 3),
    ((2, 4, 3, 2, 2), 2),
]
LAYOUTS = ["nchw", "channels_last"]


def make_x(shape, dtype=torch.float64, layout="nchw"):
    gen = torch.Generator().manual_seed(0)
    return in_layout((2 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype), layout)


def make_params(names, c, present, dtype=torch.float64):
    """weight around 1, the others around 0 (tau clips part of the output; learned_eps and v of both signs)."""
    gen = torch.Generator().manual_seed(3)
    values = {name: 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) for name in names}
    values["weight"] = values["weight"] + 1
    return [values[name].to(dtype) if name in present else None for name in names]


def frn(impl, eps=1e-4):
    return lambda x, weight, bias, tau, learned_eps: impl.filter_response_norm(x, weight, bias, tau, eps, learned_eps)


def subsets(names):
    return [set(c) for k in range(len(names) + 1) for c in itertools.combinations(names, k)]


def compare(make_fn, x, params, scale=1.0):
    """Native at x's dtype vs the float64 reference, same inputs and output gradient: [y, x.grad, *param grads]."""
    g = grad_like(x)
    actual = forward_backward(make_fn(native), x, *params, g=g)
    doubled = [None if p is None else p.double() for p in params]
    expected = forward_backward(make_fn(reference), x.double(), *doubled, g=g.double())
    assert len(actual) == 2 + sum(p is not None for p in params)
    assert_all_close(actual, expected, dtype=x.dtype, scale=scale)
    assert actual[0].dtype == x.dtype and actual[1].dtype == x.dtype
    assert_same_memory_format(actual[0], x)
    return actual


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_frn_matches_reference_float64(shape, groups, layout):
    x = make_x(shape, layout=layout)
    for present in subsets(FRN_NAMES):
        compare(frn, x, make_params(FRN_NAMES, shape[1], present))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1.0), (torch.bfloat16, 1.0)])
def test_low_precision_matches_float64_reference(dtype, scale, layout):
    """Statistics in float32, one rounding of the output and gradients: within the dtype's tolerance."""
    x = make_x((4, 8, 6, 5), dtype, layout)
    compare(frn, x, make_params(FRN_NAMES, 8, set(FRN_NAMES), dtype), scale)


def test_float32_params_with_bfloat16_input_get_float32_gradients():
    x = make_x((2, 4, 5, 5), torch.bfloat16)
    out = compare(frn, x, make_params(FRN_NAMES, 4, set(FRN_NAMES), torch.float32))
    assert all(grad.dtype == torch.float32 for grad in out[2:])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tlu_ties_split_the_gradient_like_torch_maximum(layout):
    """x = 0 and bias = tau make z == tau exactly: there tau and bias each receive half the output gradient."""
    x = make_x((2, 3, 4, 4), layout=layout)
    x[:, :, :2] = 0
    weight, bias, _, learned_eps = make_params(FRN_NAMES, 3, set(FRN_NAMES))
    tau = bias.clone()
    out = compare(frn, x, [weight, bias, tau, learned_eps])
    z = reference.filter_response_norm(x, weight, bias, None, 1e-4, learned_eps)
    g = grad_like(x)
    tau_view = tau.view(1, -1, 1, 1)
    expected_tau_grad = (g * ((z < tau_view) + 0.5 * (z == tau_view))).sum((0, 2, 3))
    assert (z == tau_view).sum() == x.numel() // 2
    assert_all_close(out[4:5], [expected_tau_grad])


def test_gradcheck_float64():
    x = make_x((2, 4, 3, 2))
    frn_params = make_params(FRN_NAMES, 4, set(FRN_NAMES))
    inputs = [t.detach().requires_grad_() for t in (x, *frn_params)]
    assert torch.autograd.gradcheck(frn(native), inputs)


def test_auto_dispatch_on_cpu_picks_native():
    x = torch.randn(2, 4, 3, 3)
    assert kernels.resolve("filter_response_norm", x, "auto") is native.filter_response_norm
    assert kernels.resolve("evonorm_s0", x, "auto") is reference.evonorm_s0  # a native S0 was not faster


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: native.filter_response_norm(torch.randn(2, 3)), "filter_response_norm"),
    ],
)
def test_bad_input_raises_like_the_reference(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("make", [lambda: FilterResponseNorm2d(8, learnable_eps=True), lambda: FilterResponseNorm2d(8)])
def test_layer_compiles_fullgraph_with_native_backward(make):
    torch._dynamo.reset()
    eager = randomize_affine(make()).double()
    twin = make().double()
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = make_x((2, 8, 5, 5), layout="channels_last")
    assert_all_close(run(compiled, x), run(eager, x))


def test_native_group_norm_with_a_bias_and_no_weight_trains():
    x = make_x((2, 4, 3, 3)).float()
    bias = torch.randn(4)
    out = forward_backward(lambda x, b: native.group_norm(x, 2, None, b), x, bias)
    expected = forward_backward(lambda x, b: reference.group_norm(x, 2, None, b), x, bias)
    assert_all_close(out, expected)
