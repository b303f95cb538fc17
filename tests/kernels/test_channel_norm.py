"""Triton kernels of the per-position channel norms (normlab.kernels.channel_norm: layer_norm2d, rms_norm2d) against
the float64 functional references: outputs, input and parameter gradients, dtypes, layouts and ranks, odd sizes,
forced channel loops, fused activations, large offsets, bad input, torch.compile and the custom-op registrations.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (the root conftest sets TRITON_INTERPRET),
so shapes stay small; the launch configuration is the GPU's unless a test forces small blocks.
"""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from normlab import functional as reference  # noqa: E402
from normlab.kernels import channel_norm as kernels  # noqa: E402
from tests.helpers import assert_all_close, forward_backward, grad_like, in_layout  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

EPS = 1e-5
OPS = {
    "layer_norm2d": (lambda m, x, w, b, **kw: m.layer_norm2d(x, w, b, EPS, **kw), 2),
    "rms_norm2d": (lambda m, x, w, **kw: m.rms_norm2d(x, w, EPS, **kw), 1),
}
ACTIVATIONS = {None: lambda y: y, "relu": F.relu, "silu": F.silu}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["nchw", "channels_last"]


def make_x(shape, dtype=torch.float32, layout="nchw", scale=2.0, shift=1.0):
    return in_layout((torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype), layout)


def params_for(op, c, dtype=torch.float32):
    """weight around 1 and bias around 0, as after some training."""
    gen = torch.Generator().manual_seed(2)
    values = [1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64), 0.5 * torch.randn(c, generator=gen)]
    return [v.to(dtype) for v in values[: OPS[op][1]]]


def run(op, impl, x, params, g, act=None):
    call = OPS[op][0]
    post = ACTIVATIONS[act] if impl is reference else ACTIVATIONS[None]
    kw = {"act": act} if impl is kernels else {}
    return forward_backward(lambda x, *p: post(call(impl, x, *p, **kw)), x, *params, g=g)


def assert_matches_reference(op, x, params, act=None, scale=1.0):
    """Kernel (with ``act`` fused) at x's dtype vs the float64 reference followed by F.relu / F.silu, from the same
    inputs and output gradient."""
    g = grad_like(x)
    actual = run(op, kernels, x, params, g, act)
    expected = run(op, reference, x.double(), [p.double() for p in params], g.double(), act)
    assert_all_close(actual, expected, dtype=x.dtype, scale=scale)
    return actual


@contextlib.contextmanager
def forced_blocks(block_c):
    """Channel blocks of ``block_c`` and tiles of at most 8 elements: small shapes loop over channel blocks (Chan's
    merge in the forward, the two-pass backward), and the backward's few programs walk several tiles each."""
    with mock.patch.multiple(
        kernels, _TILE=8, _MAX_BLOCK_C_ROWS=block_c, _MAX_BLOCK_C_STRIDED=block_c, _BLOCK_S_STRIDED=(1, 2)
    ):
        yield


# ---- against the reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, dtype, layout):
    x = make_x((2, 6, 5, 3), dtype, layout)
    y, dx = assert_matches_reference(op, x, params_for(op, 6))[:2]
    assert y.dtype == dx.dtype == dtype
    assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize(
    "shape, layout",
    [((5, 6), "nchw"), ((2, 6, 7), "nchw"), ((2, 6, 7), "channels_last"), ((2, 6, 3, 2, 4), "nchw")]
    + [((2, 6, 3, 2, 4), "channels_last")],
    ids=["2d", "3d", "3d-channels_last", "5d", "5d-channels_last"],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_other_ranks(op, dtype, shape, layout):
    x = make_x(shape, dtype, layout)
    y = assert_matches_reference(op, x, params_for(op, 6))[0]
    assert y.stride() == x.stride()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_float32_parameters_with_half_input(op, layout):
    """Autocast-style: float32 parameters with a bfloat16 input; each gradient has its tensor's dtype."""
    x = make_x((2, 6, 4, 3), torch.bfloat16, layout)
    grads = assert_matches_reference(op, x, params_for(op, 6, torch.float32))
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.bfloat16] + [torch.float32] * OPS[op][1]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_float64(op, layout):
    """float64 input accumulates in float64: the kernel agrees with the reference to 1e-10."""
    assert_matches_reference(op, make_x((2, 5, 3, 3), torch.float64, layout), params_for(op, 5, torch.float64))


@pytest.mark.parametrize(
    "shape, scale",
    [((1, 7, 1, 1), 1), ((1, 1, 3, 4), 1), ((3, 13, 5, 1), 1), ((2, 3, 31, 33), 5), ((1, 3, 1, 130), 2)],
    ids=["one-position", "one-channel", "prime-C", "many-tiles", "long-row"],
)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_odd_sizes(op, shape, scale, layout):
    """Batch 1, H*W = 1, C = 1, primes, and positions spanning several tiles per sample (the last one partial). The
    weight/bias gradients of "many-tiles" sum 2046 terms in float32, hence the looser absolute tolerance."""
    assert_matches_reference(op, make_x(shape, layout=layout), params_for(op, shape[1]), scale=scale)


@pytest.mark.parametrize("present", [(False, False), (True, False), (False, True)], ids=["none", "weight", "bias"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_parameters(present, layout):
    x = make_x((2, 6, 3, 4), layout=layout)
    w, b = (p if keep else None for p, keep in zip(params_for("layer_norm2d", 6), present, strict=True))
    given_params = [p for p in (w, b) if p is not None]

    def call(impl):
        def fn(x, *p):
            it = iter(p)
            return impl.layer_norm2d(x, next(it) if w is not None else None, next(it) if b is not None else None)

        return fn

    g = grad_like(x)
    actual = forward_backward(call(kernels), x, *given_params, g=g)
    expected = forward_backward(call(reference), x.double(), *(p.double() for p in given_params), g=g.double())
    assert_all_close(actual, expected, dtype=torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rms_norm2d_without_weight(layout):
    x = make_x((2, 6, 3, 4), layout=layout)
    g = grad_like(x)
    actual = forward_backward(kernels.rms_norm2d, x, g=g)
    assert_all_close(actual, forward_backward(reference.rms_norm2d, x.double(), g=g.double()), dtype=torch.float32)


def test_strided_parameters():
    """Parameters that are strided views (every other element of a longer vector) are read correctly."""
    x = make_x((2, 6, 3, 4), layout="channels_last")
    w, b = (torch.stack([p, torch.full_like(p, 9.0)], dim=1)[:, 0] for p in params_for("layer_norm2d", 6))
    assert w.stride() == (2,)
    assert_matches_reference("layer_norm2d", x, [w, b])


def test_eps_is_used():
    x = make_x((2, 6, 3, 3), scale=0.1)
    assert_close(kernels.layer_norm2d(x, eps=0.05), reference.layer_norm2d(x, eps=0.05))
    assert_close(kernels.rms_norm2d(x, eps=0.05), reference.rms_norm2d(x, eps=0.05))
    assert not torch.allclose(kernels.layer_norm2d(x, eps=0.05), reference.layer_norm2d(x))


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_fused_activation_is_reference_then_activation(op, layout, act):
    assert_matches_reference(op, make_x((2, 6, 4, 3), layout=layout), params_for(op, 6), act=act)


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_channel_loops(op, layout, act):
    """C = 11 in blocks of 4 (the last one partial): statistics merged over blocks, the backward's two passes over
    the channels, and read-modify-written weight/bias partials over several tiles per program."""
    x = make_x((2, 11, 3, 5), layout=layout)
    with forced_blocks(block_c=4):
        assert_matches_reference(op, x, params_for(op, 11), act=act)


@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("shape", [(3, 11, 3, 5), (37, 6)], ids=["conv", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_parameter_gradients_accumulated_per_element(op, dtype, shape, act):
    """``_ACC_2D`` (a tuning candidate): the backward's channels-in-one-block path sums the parameter gradients
    elementwise over a program's tiles, then over rows once. Tiles of 8 elements leave partial tiles and several
    tiles per program; the result matches the float64 reference as the default path does."""
    x = make_x(shape, dtype=dtype, layout="channels_last" if len(shape) == 4 else "nchw")
    params = params_for(op, shape[1], dtype)
    with mock.patch.multiple(kernels, _ACC_2D=True, _TILE=8, _ROWS_TILE_SCALE=1):
        assert kernels._launch(kernels.flat(x)).kw["SINGLE"]
        assert_matches_reference(op, x, params, act=act)


@settings(max_examples=15)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    channels_last=st.booleans(),
    block_c=st.sampled_from([1, 2, 4, 4096]),
)
def test_layer_norm2d_any_shape_and_blocks(n, c, spatial, channels_last, block_c):
    x = make_x((n, c, *spatial), layout="channels_last" if channels_last and spatial else "nchw")
    with forced_blocks(block_c):
        assert_matches_reference("layer_norm2d", x, params_for("layer_norm2d", c), scale=2)


@pytest.mark.parametrize("block_c", [4096, 4], ids=["one-block", "channel-loop"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "dtype, shift", [(torch.float32, 1e4), (torch.bfloat16, 100.0)], ids=["float32-1e4", "bfloat16-100"]
)
def test_large_offset_normalizes(dtype, shift, layout, block_c):
    """The foundation's robustness check through the kernel: mean 1e4 std 1 (float32), mean 100 std 1 (bfloat16)."""
    x = make_x((2, 16, 3, 3), torch.float32, layout, scale=1.0, shift=shift).to(dtype)
    with forced_blocks(block_c) if block_c < 16 else contextlib.nullcontext():
        y = kernels.layer_norm2d(x).double()
    var, mean = torch.var_mean(y, dim=1, correction=0)
    assert mean.abs().max() < 1e-2
    assert (var.sqrt() - 1).abs().max() < 1e-2


def test_output_gradient_in_another_layout():
    """A contiguous output gradient for a channels_last input (as a following permute produces)."""
    x = make_x((2, 6, 3, 4), layout="channels_last")
    w, b = params_for("layer_norm2d", 6)
    g = grad_like(x).contiguous()
    actual = forward_backward(kernels.layer_norm2d, x, w, b, g=g)
    expected = forward_backward(reference.layer_norm2d, x.double(), w.double(), b.double(), g=g.double())
    assert_all_close(actual, expected)
    assert actual[1].is_contiguous(memory_format=torch.channels_last)


def test_other_layout_is_copied():
    """An input that is neither contiguous nor channels_last (a transposed view) is normalized correctly."""
    x = make_x((2, 6, 5, 4)).transpose(2, 3)
    w, b = params_for("layer_norm2d", 6)
    g = grad_like(x)
    actual = forward_backward(kernels.layer_norm2d, x, w, b, g=g)
    expected = forward_backward(reference.layer_norm2d, x.double(), w.double(), b.double(), g=g.double())
    assert_all_close(actual, expected)


def test_empty_batch():
    x = torch.randn(0, 6, 3, 3, requires_grad=True)
    w = torch.ones(6, requires_grad=True)
    y = kernels.layer_norm2d(x, w)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(6))


def test_backward_saves_statistics_not_a_normalized_copy():
    """The autograd graph keeps x, the parameters and two values per position (mean, rstd), nothing of x's size."""
    x = make_x((2, 6, 5, 4), layout="channels_last").requires_grad_()
    w, b = (p.requires_grad_() for p in params_for("layer_norm2d", 6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.layer_norm2d(x, w, b)
    positions = 2 * 5 * 4
    assert sorted(t.numel() for t in saved) == [6, 6, positions, positions, x.numel()]


def test_parameter_gradients_are_deterministic():
    x = make_x((3, 6, 7, 5), layout="channels_last")
    w, b = params_for("layer_norm2d", 6)
    first = forward_backward(kernels.layer_norm2d, x, w, b)
    second = forward_backward(kernels.layer_norm2d, x, w, b)
    assert all(torch.equal(a, c) for a, c in zip(first, second, strict=True))


def test_enough_backward_programs_on_a_gpu():
    """At ConvNeXt/ResNet sizes the backward runs about 4 programs per SM, each over several tiles."""
    x = torch.empty(32, 256, 56, 56, device="meta").to(memory_format=torch.channels_last)
    launch = kernels._launch(kernels.flat(x))
    assert launch.block_c >= 256 and launch.tiles >= 5 * 4 * 132
    with mock.patch.object(torch.cuda, "get_device_properties", return_value=mock.Mock(multi_processor_count=132)):
        assert kernels._backward_programs(launch.tiles, torch.device("cuda")) == 4 * 132


# ---- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_bad_input(op):
    call = OPS[op][0]
    with pytest.raises(ValueError, match=rf"{op}: .*at least 2 dims.*\(6,\)"):
        call(kernels, torch.randn(6), *params_for(op, 6))
    with pytest.raises(ValueError, match=rf"{op}: weight of shape \(5,\).*6 channels"):
        call(kernels, torch.randn(2, 6, 3, 3), torch.ones(5), *params_for(op, 6)[1:])
    with pytest.raises(ValueError, match=rf"{op}: expected a float16, .* float64 input, got dtype torch.int64"):
        call(kernels, torch.ones(2, 6, 3, 3, dtype=torch.long), *params_for(op, 6))
    with pytest.raises(ValueError, match=r"act.*'gelu'.*relu"):
        call(kernels, torch.randn(2, 6, 3, 3), *params_for(op, 6), act="gelu")


def test_bad_bias():
    with pytest.raises(ValueError, match=r"layer_norm2d: bias of shape \(6, 1\)"):
        kernels.layer_norm2d(torch.randn(2, 6, 3, 3), torch.ones(6), torch.ones(6, 1))


# ---- torch.compile and the custom ops -----------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    """Both ops under torch.compile(fullgraph=True), forward and backward; the interpreter runs inside the compiled
    graph because the custom ops are opaque to Inductor."""

    def fn(x, w, b):
        return kernels.layer_norm2d(x, w, b, act="silu") * kernels.rms_norm2d(x, w)

    x = make_x((2, 6, 3, 4), layout="channels_last")
    w, b = params_for("layer_norm2d", 6)
    expected = forward_backward(fn, x, w, b)
    actual = forward_backward(torch.compile(fn, fullgraph=True), x, w, b)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("center, act", [(True, 2), (False, 0)])
def test_custom_ops_pass_opcheck(center, act):
    x = make_x((2, 5, 3, 2), layout="channels_last").requires_grad_()
    w, b = (p.requires_grad_() for p in params_for("layer_norm2d", 5))
    torch.library.opcheck(torch.ops.normlab.channel_norm_fwd.default, (x, w, b if center else None, EPS, center, act))
    _, mean, rstd = torch.ops.normlab.channel_norm_fwd(x, w, b, EPS, center, act)
    assert not mean.requires_grad and not rstd.requires_grad
    dy = torch.randn_like(x)
    args = (dy, x.detach(), w.detach(), b.detach() if center else None, mean, rstd, center, act)
    torch.library.opcheck(torch.ops.normlab.channel_norm_bwd.default, args)


# ---- GPU ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_reference(op, layout):
    """A ConvNeXt-like shape on the GPU, bfloat16, against the float64 reference on the same inputs."""
    x = make_x((8, 96, 56, 56), torch.bfloat16, layout).cuda()
    params = [p.cuda() for p in params_for(op, 96)]
    assert_matches_reference(op, x, params, act="silu", scale=2)
    with forced_blocks(block_c=32):
        assert_matches_reference(op, x[:2], params, scale=2)
