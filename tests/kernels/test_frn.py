"""Triton kernels of Filter Response Normalization + TLU (normlab.kernels.frn) against the float64 functional
reference: output, input gradient and the gradients of weight, bias, tau and learned_eps, dtypes, layouts and ranks,
odd sizes, positions split over programs, TLU ties, bad input, torch.compile and the custom-op registrations.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (the root conftest sets TRITON_INTERPRET),
so shapes stay small; the launch configuration is the GPU's unless a test forces small blocks.
"""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from normlab import functional as reference  # noqa: E402
from normlab.kernels import frn as kernels  # noqa: E402
from tests.helpers import assert_all_close, forward_backward, grad_like, in_layout  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

EPS = 1e-4
NAMES = ("weight", "bias", "tau", "learned_eps")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last"]


def make_x(shape, dtype=torch.float32, layout="nchw", scale=2.0, shift=0.5):
    return in_layout((torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype), layout)


def params_for(c, dtype=torch.float32, present=NAMES):
    """weight around 1, bias and tau around 0 (so the TLU clips part of the output), learned_eps of both signs
    (its gradient goes through |eps_l|); None for the names not in ``present``."""
    gen = torch.Generator().manual_seed(2)
    values = {
        "weight": 1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64),
        "bias": 0.5 * torch.randn(c, generator=gen, dtype=torch.float64),
        "tau": 0.5 * torch.randn(c, generator=gen, dtype=torch.float64) - 0.3,
        "learned_eps": 0.2 * torch.randn(c, generator=gen, dtype=torch.float64),
    }
    return {name: values[name].to(dtype) if name in present else None for name in NAMES}


def run(impl, x, params, g):
    """Output, input gradient and the gradient of each parameter that is not None."""
    names = [name for name in NAMES if params[name] is not None]

    def fn(x, *given_params):
        full = {**params, **dict(zip(names, given_params, strict=True))}
        return impl.filter_response_norm(x, full["weight"], full["bias"], full["tau"], EPS, full["learned_eps"])

    return forward_backward(fn, x, *(params[name] for name in names), g=g)


def assert_matches_reference(x, params, scale=1.0):
    """Kernel at x's dtype vs the float64 reference from the same inputs and output gradient."""
    g = grad_like(x)
    actual = run(kernels, x, params, g)
    doubled = {name: None if p is None else p.double() for name, p in params.items()}
    expected = run(reference, x.double(), doubled, g.double())
    assert_all_close(actual, expected, dtype=x.dtype, scale=scale)
    return actual


@contextlib.contextmanager
def forced_blocks(tile=8, block_s=4, block_c=4, programs=12):
    """Tiles of at most ``tile`` elements and many programs wanted: small shapes loop over position blocks and split
    the positions over programs, so the partial sums go through the second stage and the apply kernels."""
    with mock.patch.multiple(
        kernels, _TILE=tile, _MAX_BLOCK_S=block_s, _MAX_BLOCK_C_CHANNELS_LAST=block_c, _PROGRAMS_PER_SM=programs
    ):
        yield


# ---- against the reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, layout):
    x = make_x((2, 6, 5, 3), dtype, layout)
    y, dx = assert_matches_reference(x, params_for(6))[:2]
    assert y.dtype == dx.dtype == dtype
    assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize(
    "shape, layout",
    [((2, 6, 7), "nchw"), ((2, 6, 7), "channels_last"), ((2, 6, 3, 2, 4), "nchw"), ((2, 6, 3, 2, 4), "channels_last")],
    ids=["3d", "3d-channels_last", "5d", "5d-channels_last"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_ranks(dtype, shape, layout):
    x = make_x(shape, dtype, layout)
    y = assert_matches_reference(x, params_for(6))[0]
    assert y.stride() == x.stride()


@pytest.mark.parametrize(
    "present",
    [(), ("weight", "bias"), ("weight", "bias", "tau"), ("tau",), ("learned_eps",), ("bias", "learned_eps")],
    ids=["none", "affine", "affine-tlu", "tlu", "learned-eps", "bias-learned-eps"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameter_subsets(present, layout):
    assert_matches_reference(make_x((2, 6, 4, 3), layout=layout), params_for(6, present=present))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_parameters_with_half_input(layout):
    """Autocast-style: float32 parameters with a bfloat16 input; each gradient has its tensor's dtype."""
    grads = assert_matches_reference(make_x((2, 6, 4, 3), torch.bfloat16, layout), params_for(6))
    assert [t.dtype for t in grads] == [torch.bfloat16] * 2 + [torch.float32] * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_parameters(layout):
    assert_matches_reference(make_x((2, 6, 4, 3), torch.bfloat16, layout), params_for(6, torch.bfloat16))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64(layout):
    """float64 input accumulates in float64: the kernel agrees with the reference to 1e-10."""
    assert_matches_reference(make_x((2, 5, 3, 3), torch.float64, layout), params_for(5, torch.float64))


@pytest.mark.parametrize(
    "shape, scale",
    [((1, 7, 1, 1), 1), ((1, 1, 3, 4), 1), ((3, 13, 5, 1), 1), ((1, 3, 65, 65), 5), ((1, 70, 2, 3), 1)],
    ids=["one-position", "one-channel", "prime-C", "long-rows", "many-channel-blocks"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_sizes(shape, scale, layout):
    """Batch 1, H*W = 1, C = 1, primes, rows longer than one block (4225 positions: the NCHW block holds 4096) and
    more channels than a channels_last block. Sums over thousands of positions get a looser absolute tolerance."""
    assert_matches_reference(make_x(shape, layout=layout), params_for(shape[1]), scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_positions(layout, dtype):
    """Positions in blocks of 4 split over programs (the last block and split partial): partial sums of x^2 and of
    the gradient terms go through the second stage, then the apply kernels write y and dx."""
    x = make_x((2, 5, 3, 7), dtype, layout)
    with forced_blocks():
        launch = kernels._launch(kernels.flat(x), x.device)
        assert_matches_reference(x, params_for(5))
    assert not launch.single and launch.split > 1 and launch.blocks_per_split > 1


@settings(max_examples=12)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    channels_last=st.booleans(),
    tile=st.sampled_from([1, 4, 16, 4096]),
    block=st.sampled_from([1, 2, 4]),
    programs=st.sampled_from([1, 3, 64]),
)
def test_any_shape_and_blocks(n, c, spatial, channels_last, tile, block, programs):
    x = make_x((n, c, *spatial), layout="channels_last" if channels_last else "nchw")
    with forced_blocks(tile, block, block, programs):
        assert_matches_reference(x, params_for(c), scale=2)


@pytest.mark.parametrize("split", [False, True], ids=["single", "split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tlu_ties_split_the_gradient(layout, split):
    """Zero inputs with bias == tau (both 0 at initialization) give z == tau exactly; torch.maximum sends half the
    gradient to each side, and so must the kernel (else the tau and bias gradients differ)."""
    x = make_x((2, 5, 3, 4), layout=layout)
    x[:, :, 1] = 0.0
    params = params_for(5)
    params["bias"] = torch.zeros(5)
    params["tau"] = torch.zeros(5)
    with forced_blocks() if split else contextlib.nullcontext():
        assert_matches_reference(x, params)


def test_learned_eps_gradient_goes_through_its_absolute_value():
    """Negative, zero and positive learned_eps: the gradient is sign(eps_l) times that of |eps_l| (0 at 0)."""
    x = make_x((2, 3, 4, 4), scale=0.05)
    params = params_for(3, present=("weight", "learned_eps"))
    params["learned_eps"] = torch.tensor([-0.01, 0.0, 0.02])
    grads = assert_matches_reference(x, params)
    assert grads[-1][1] == 0 and grads[-1][0] * grads[-1][2] < 0


def test_strided_parameters():
    """Parameters that are strided views (every other element of a longer vector) are read correctly."""
    params = {k: torch.stack([p, torch.full_like(p, 9.0)], dim=1)[:, 0] for k, p in params_for(6).items()}
    assert params["tau"].stride() == (2,)
    assert_matches_reference(make_x((2, 6, 3, 4), layout="channels_last"), params)


def test_eps_is_used():
    x = make_x((2, 6, 3, 3), scale=0.1)
    assert_close(kernels.filter_response_norm(x, eps=0.05), reference.filter_response_norm(x, eps=0.05))
    assert not torch.allclose(kernels.filter_response_norm(x, eps=0.05), reference.filter_response_norm(x))


def test_output_gradient_in_another_layout():
    """A contiguous output gradient for a channels_last input."""
    x = make_x((2, 6, 3, 4), layout="channels_last")
    params = params_for(6)
    g = grad_like(x).contiguous()
    actual = run(kernels, x, params, g)
    expected = run(reference, x.double(), {k: v.double() for k, v in params.items()}, g.double())
    assert_all_close(actual, expected)
    assert actual[1].is_contiguous(memory_format=torch.channels_last)


def test_empty_batch():
    x = torch.randn(0, 6, 3, 3, requires_grad=True)
    w = torch.ones(6, requires_grad=True)
    y = kernels.filter_response_norm(x, w)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(6))


def test_backward_saves_statistics_not_a_normalized_copy():
    x = make_x((2, 6, 5, 4), layout="channels_last").requires_grad_()
    params = [p.requires_grad_() for p in params_for(6).values()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.filter_response_norm(x, params[0], params[1], params[2], EPS, params[3])
    assert sorted(t.numel() for t in saved) == [6, 6, 6, 6, 2 * 6, x.numel()]


def test_parameter_gradients_are_deterministic():
    x = make_x((2, 5, 3, 7), layout="channels_last")
    with forced_blocks():
        first = run(kernels, x, params_for(5), grad_like(x))
        second = run(kernels, x, params_for(5), grad_like(x))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_enough_programs_on_a_gpu(layout):
    """At (32, 256, 56, 56) at least 2 programs per SM of an H100 (132 SMs): whole rows per program for NCHW, a split
    of the positions for channels_last (only 128 blocks of 64 channels)."""
    x = in_layout(torch.empty(32, 256, 56, 56, device="meta"), layout)
    with mock.patch.object(torch.cuda, "get_device_properties", return_value=mock.Mock(multi_processor_count=132)):
        launch = kernels._launch(kernels.flat(x), torch.device("cuda"))
    assert 32 * launch.c_blocks * launch.split >= 2 * 132
    assert launch.single == (layout == "nchw")


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input():
    with pytest.raises(ValueError, match=r"filter_response_norm: expected 3D or 4D or 5D input.*\(2, 6\)"):
        kernels.filter_response_norm(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"filter_response_norm: expected 3D or 4D or 5D input.*\(1, 2, 1, 1, 1, 1\)"):
        kernels.filter_response_norm(torch.randn(1, 2, 1, 1, 1, 1))
    for name in NAMES:
        params = params_for(6)
        params[name] = torch.ones(5)
        with pytest.raises(ValueError, match=rf"filter_response_norm: {name} of shape \(5,\).*6 channels"):
            kernels.filter_response_norm(
                torch.randn(2, 6, 3, 3), *list(params.values())[:3], EPS, params["learned_eps"]
            )


# ---- torch.compile and the custom ops -----------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    """Forward and backward under torch.compile(fullgraph=True); the interpreter runs inside the compiled graph
    because the custom ops are opaque to Inductor."""

    def fn(x, w, b, tau, learned_eps):
        return kernels.filter_response_norm(x, w, b, tau, EPS, learned_eps).square()

    x = make_x((2, 6, 3, 4), layout="channels_last")
    params = list(params_for(6).values())
    assert_all_close(forward_backward(torch.compile(fn, fullgraph=True), x, *params), forward_backward(fn, x, *params))


def test_custom_ops_pass_opcheck():
    x = make_x((2, 5, 3, 2), layout="channels_last").requires_grad_()
    w, b, tau, learned_eps = (p.requires_grad_() for p in params_for(5).values())
    torch.library.opcheck(torch.ops.normlab.filter_response_norm_fwd.default, (x, w, b, tau, EPS, learned_eps))
    torch.library.opcheck(torch.ops.normlab.filter_response_norm_fwd.default, (x, None, None, None, EPS, None))
    _, rstd = torch.ops.normlab.filter_response_norm_fwd(x, w, b, tau, EPS, learned_eps)
    assert not rstd.requires_grad
    args = (torch.randn_like(x), x.detach(), w.detach(), b.detach(), tau.detach(), learned_eps.detach(), rstd)
    torch.library.opcheck(torch.ops.normlab.filter_response_norm_bwd.default, args)


# ---- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_reference(layout):
    """A ResNet-like shape on the GPU, bfloat16, single-tile (NCHW) and split (channels_last) paths, against the
    float64 reference on the same inputs."""
    x = make_x((8, 256, 56, 56), torch.bfloat16, layout).cuda()
    params = {name: p.cuda() for name, p in params_for(256).items()}
    assert_matches_reference(x, params, scale=2)
