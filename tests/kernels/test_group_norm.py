"""Triton kernels of the per-sample group-statistics family (normlab.kernels.group_norm) against the functional
references: outputs, input and parameter gradients, running statistics, dtypes, layouts, odd sizes, forced loops and
splits, fused activations, bad input, torch.compile and the custom-op registrations.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (the root conftest sets TRITON_INTERPRET),
so shapes stay small; the launch configuration is the GPU's unless a test forces small blocks.
"""

import contextlib
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from normlab import functional as reference  # noqa: E402
from normlab.kernels import channel_norm  # noqa: E402
from normlab.kernels import group_norm as kernels  # noqa: E402
from tests.helpers import CHANNELS_LAST, assert_all_close, forward_backward, grad_like, in_format  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

EPS = 1e-4

# op -> (call(impl, x, *params, **act), parameter names); C must be a multiple of 3 (group norm and EvoNorm use 3
# groups). ``act`` is passed only to the kernels.
OPS = {
    "group_norm": (lambda m, x, w, b, **k: m.group_norm(x, 3, w, b, EPS, **k), ("weight", "bias")),
    "instance_norm": (lambda m, x, w, b, **k: m.instance_norm(x, None, None, w, b, eps=EPS, **k), ("weight", "bias")),
    "layer_norm": (lambda m, x, w, b, **k: m.layer_norm(x, w, b, EPS, **k), ("weight", "bias")),
    "rms_norm": (lambda m, x, w, **k: m.rms_norm(x, w, EPS, **k), ("weight",)),
    "evonorm_s0": (lambda m, x, w, b, v: m.evonorm_s0(x, 3, w, b, v, EPS), ("weight", "bias", "v")),
}
# The ops that accept an (N, C) input (instance norm needs positions, EvoNorm 3-5 dims).
OPS_2D = ["group_norm", "layer_norm", "rms_norm"]
ACT_OPS = ["group_norm", "instance_norm", "layer_norm", "rms_norm"]


def params_for(op, c, dtype=torch.float32):
    """Per-channel parameters of ``op``: weight around 1, bias and v around 0 (v=0 would make the gate constant)."""
    gen = torch.Generator().manual_seed(2)
    values = {
        "weight": 1 + 0.5 * torch.randn(c, generator=gen, dtype=torch.float64),
        "bias": 0.5 * torch.randn(c, generator=gen, dtype=torch.float64),
        "v": torch.randn(c, generator=gen, dtype=torch.float64),
    }
    return [values[name].to(dtype) for name in OPS[op][1]]


def make_x(shape, dtype=torch.float32, channels_last=False, scale=2.0, shift=1.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + shift
    return in_format(x.to(dtype), channels_last)


def run(op, impl, x, params, g):
    call = OPS[op][0]
    return forward_backward(lambda x, *p: call(impl, x, *p), x, *params, g=g)


def assert_matches_reference(op, x, params, scale=1.0):
    """Kernel output and gradients at x's dtype vs the float64 reference from the same inputs."""
    g = grad_like(x)
    actual = run(op, kernels, x, params, g)
    expected = run(op, reference, x.double(), [p.double() for p in params], g.double())
    assert_all_close(actual, expected, dtype=x.dtype, scale=scale)
    return actual


@contextlib.contextmanager
def forced_blocks(block_s, block_g, block_cg, span, fuse=False):
    """Replace the launch configuration with tiny blocks so that small shapes loop over several position tiles and
    channel chunks, and split positions over programs: the split partials are merged by the second-stage kernels,
    or with ``fuse`` inside the normalizing and dx kernels (whatever the number of splits)."""

    def small(n, groups, group_size, positions, channels_last, sm_count):
        rows = channels_last and block_cg == group_size and 1 < group_size < 8  # as blocks() decides
        return kernels.Blocks(block_s, block_g, block_cg, math.ceil(positions / span), span, 1, rows)

    fusing = {"_FUSE_SPLITS": 1 << 20, "_FUSE_READS": 0} if fuse else {"_FUSE_SPLITS": 0}
    with mock.patch.object(kernels, "blocks", small), mock.patch.multiple(kernels, **fusing):
        yield


# ---- against the reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, dtype, channels_last):
    x = make_x((2, 6, 5, 3), dtype, channels_last)
    y = assert_matches_reference(op, x, params_for(op, 6))[0]
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("op", OPS)
def test_half_parameters(op):
    """bfloat16 parameters with a bfloat16 input, as a module converted with .to(bfloat16) has."""
    x = make_x((2, 6, 4, 3), torch.bfloat16, channels_last=True)
    assert_matches_reference(op, x, params_for(op, 6, torch.bfloat16))


@pytest.mark.parametrize("shape", [(3, 6), (2, 6, 7), (2, 6, 3, 2, 4)], ids=["2d", "3d", "5d"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_other_ranks(op, shape, channels_last):
    if len(shape) == 2 and op not in OPS_2D:
        pytest.skip(f"{op} needs spatial dims")
    if channels_last and len(shape) == 2:
        pytest.skip("no channels_last for (N, C)")
    x = make_x(shape)
    if channels_last:
        x = (
            x.contiguous(memory_format=CHANNELS_LAST[5])
            if x.dim() == 5
            else x.transpose(1, 2).contiguous().transpose(1, 2)
        )
    assert_matches_reference(op, x, params_for(op, 6))


@pytest.mark.parametrize("fuse", [False, True], ids=["stage2-launches", "fused"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_loops_and_splits(op, channels_last, fuse):
    """Tiles of 2 positions x 2 groups x 2 channels and 3 positions per split: every kernel loops over position tiles
    (the last one partial), channel chunks (groups of 3 channels) and group blocks (3 groups), and positions are
    split over programs (so the statistics and gradient partials are merged: by the second-stage kernels, or fused
    into the normalizing and dx kernels)."""
    x = make_x((2, 9, 2, 3), channels_last=channels_last)
    with forced_blocks(block_s=2, block_g=2, block_cg=2, span=3, fuse=fuse):
        assert_matches_reference(op, x, params_for(op, 9))


@pytest.mark.parametrize(
    "shape, channels_last, fused_merge, fused_sums",
    [
        ((32, 256, 56, 56), True, True, True),  # the shape: 10 splits per sample
        ((64, 512, 28, 28), True, True, True),
        ((32, 256, 56, 56), False, False, True),  # one split: the statistics are final, the sums fused
        ((64, 2048, 7, 7), True, True, False),  # 49 positions: the partials would be a third of the tensor
        ((2, 256, 56, 56), True, False, False),  # batch 2: ~200 splits per sample, second-stage launches
    ],
)
def test_plan_merges_few_split_partials_in_the_main_kernels(shape, channels_last, fused_merge, fused_sums):
    """With few position splits per sample (larger batches), the normalizing and dx kernels merge the partials
    themselves and the second-stage launches are skipped; with many, the second stage runs."""
    x = torch.empty(shape, device="meta")
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    plan = kernels._plan(kernels.flat(x), 32, torch.device("cpu"), True, True, False, True, 0, False)
    assert plan.normalize["FUSED_MERGE"] is fused_merge
    assert (plan.merge is None) is (fused_merge or plan.cfg.splits == 1)
    assert plan.dx["FUSED_SUMS"] is fused_sums and (plan.group_sums is None) is fused_sums
    given = kernels._plan(kernels.flat(x), 32, torch.device("cpu"), True, True, False, True, 0, True)
    assert not given.normalize["FUSED_MERGE"] and not given.dx["FUSED_SUMS"] and given.group_sums is None


@pytest.mark.parametrize("group_size", [2, 4])
@pytest.mark.parametrize("op", ["group_norm", "evonorm_s0"])
def test_narrow_groups_channels_last_as_rows_of_channels(op, group_size):
    """Channels-last groups of 2 or 4 channels load and store rows of contiguous channels (the ROWS layout): right
    with the GPU's blocks and with several position tiles (the last partial), position splits and group blocks (the
    last one partial)."""
    x = make_x((2, 3 * group_size, 3, 3), channels_last=True)
    assert kernels.blocks(2, 3, group_size, 9, True, 132).rows
    assert_matches_reference(op, x, params_for(op, 3 * group_size))
    for fuse in (False, True):
        with forced_blocks(block_s=2, block_g=2, block_cg=group_size, span=4, fuse=fuse):
            assert_matches_reference(op, x, params_for(op, 3 * group_size))


@settings(max_examples=12)
@given(
    n=st.integers(1, 2),
    groups=st.integers(1, 3),
    group_size=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    channels_last=st.booleans(),
    block_s=st.sampled_from([2, 4, 16]),
    block_g=st.sampled_from([1, 2, 4]),
    block_cg=st.sampled_from([1, 2, 8]),
    span=st.integers(2, 16),
    fuse=st.booleans(),
)
def test_group_norm_any_shape_and_blocks(
    n, groups, group_size, spatial, channels_last, block_s, block_g, block_cg, span, fuse
):
    """Group norm is right for any shape (batch 1, primes, one position) under any launch configuration."""
    shape = (n, groups * group_size, *spatial)
    x = make_x(shape, channels_last=channels_last and len(shape) == 4)
    w, b = params_for("group_norm", shape[1])
    with forced_blocks(block_s, block_g, block_cg, span, fuse=fuse):
        actual = forward_backward(lambda x, w, b: kernels.group_norm(x, groups, w, b), x, w, b)
    expected = forward_backward(lambda x, w, b: reference.group_norm(x, groups, w, b), x, w, b)
    assert_all_close(actual, expected, scale=3)


@pytest.mark.parametrize(
    "shape, num_groups",
    [((1, 7, 3, 5), 7), ((1, 7, 3, 5), 1), ((3, 6, 1, 1), 2), ((2, 12, 1, 11), 4), ((1, 10, 13), 5)],
    ids=["prime-C-instance-groups", "prime-C-one-group", "one-position", "one-row", "3d-prime-length"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_odd_sizes(shape, num_groups, channels_last):
    x = make_x(shape, channels_last=channels_last and len(shape) == 4)
    w, b = params_for("group_norm", shape[1])
    actual = forward_backward(lambda x, w, b: kernels.group_norm(x, num_groups, w, b), x, w, b)
    expected = forward_backward(lambda x, w, b: reference.group_norm(x, num_groups, w, b), x, w, b)
    assert_all_close(actual, expected, scale=3)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_rows_run_the_channel_norm_kernels(op, monkeypatch):
    """(N, C) rows (transformer activations) go to the per-position kernels, which tile whole rows."""
    centered = []
    unchecked = channel_norm.unchecked_channel_norm
    monkeypatch.setattr(channel_norm, "unchecked_channel_norm", lambda *a: centered.append(a[4]) or unchecked(*a))
    assert_matches_reference(op, make_x((37, 300), torch.bfloat16), params_for(op, 300, torch.bfloat16))
    assert centered == [op == "layer_norm"]


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_one_position(op):
    assert_matches_reference(op, make_x((2, 6, 1, 1), channels_last=True), params_for(op, 6))


@pytest.mark.parametrize("with_weight, with_bias", [(False, False), (True, False), (False, True)])
def test_without_parameters(with_weight, with_bias):
    x = make_x((2, 6, 3, 4), channels_last=True)
    w, b = params_for("group_norm", 6)
    w, b = w if with_weight else None, b if with_bias else None
    g = grad_like(x)
    actual = forward_backward(lambda x, w, b: kernels.group_norm(x, 2, w, b), x, w, b, g=g)
    expected = forward_backward(lambda x, w, b: reference.group_norm(x, 2, w, b), x, w, b, g=g)
    assert_all_close(actual, expected)


def test_eps_is_used():
    x = make_x((2, 6, 3, 3), scale=0.1)
    assert_close(kernels.group_norm(x, 3, eps=0.05), reference.group_norm(x, 3, eps=0.05))
    assert not torch.allclose(kernels.group_norm(x, 3, eps=0.05), reference.group_norm(x, 3))


def test_evonorm_without_v_is_group_norm():
    x = make_x((2, 6, 4, 4), channels_last=True)
    w, b = params_for("group_norm", 6)
    assert_close(kernels.evonorm_s0(x, 3, w, b), kernels.group_norm(x, 3, w, b))


# ---- fused activations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act, fn", [("relu", F.relu), ("silu", F.silu)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("op", ACT_OPS)
def test_fused_activation_equals_reference_then_activation(op, channels_last, act, fn):
    x = make_x((2, 6, 3, 5), channels_last=channels_last)
    params = params_for(op, 6)
    call = OPS[op][0]
    g = grad_like(x)
    actual = forward_backward(lambda x, *p: call(kernels, x, *p, act=act), x, *params, g=g)
    expected = forward_backward(lambda x, *p: fn(call(reference, x, *p)), x, *params, g=g)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("fuse", [False, True], ids=["stage2-launches", "fused"])
def test_fused_activation_in_bfloat16_with_loops(fuse):
    x = make_x((2, 9, 2, 3), torch.bfloat16, channels_last=True)
    w, b = params_for("group_norm", 9)
    g = grad_like(x)
    with forced_blocks(block_s=2, block_g=2, block_cg=2, span=3, fuse=fuse):
        actual = forward_backward(lambda x, w, b: kernels.group_norm(x, 3, w, b, act="silu"), x, w, b, g=g)
    expected = forward_backward(
        lambda x, w, b: F.silu(reference.group_norm(x, 3, w, b)), x.double(), w.double(), b.double(), g=g.double()
    )
    assert_all_close(actual, expected, dtype=torch.bfloat16)


# ---- instance norm: running statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_instance_norm_updates_running_stats_like_reference(dtype, channels_last):
    x = make_x((3, 6, 4, 5), dtype, channels_last, scale=3.0, shift=2.0)
    w, b = params_for("instance_norm", 6)
    buffers = {name: (torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)) for name in ("kernel", "reference")}
    g = grad_like(x)
    for step in range(2):
        xs = x + step
        actual = forward_backward(
            lambda x, w, b: kernels.instance_norm(x, *buffers["kernel"], w, b, True, 0.3, EPS), xs, w, b, g=g
        )
        expected = forward_backward(
            lambda x, w, b: reference.instance_norm(x, *buffers["reference"], w, b, True, 0.3, EPS), xs, w, b, g=g
        )
        assert_all_close(actual, expected)
        for a, e in zip(buffers["kernel"], buffers["reference"], strict=True):
            assert_close(a, e, scale=3)
    assert not torch.equal(buffers["kernel"][0], torch.linspace(-1, 1, 6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_instance_norm_eval_is_running_stats_affine(dtype, channels_last):
    x = make_x((2, 6, 3, 5), dtype, channels_last)
    running_mean, running_var = torch.linspace(-1, 1, 6), torch.linspace(0.5, 2, 6)
    w, b = params_for("instance_norm", 6)
    g = grad_like(x)

    def call(impl, mean, var):
        return lambda x, w, b: impl.instance_norm(x, mean, var, w, b, use_input_stats=False, eps=EPS)

    mean_before = running_mean.clone()
    actual = forward_backward(call(kernels, running_mean, running_var), x, w, b, g=g)
    expected = forward_backward(
        call(reference, running_mean.double(), running_var.double()), x.double(), w.double(), b.double(), g=g.double()
    )
    assert_all_close(actual, expected, dtype=dtype)
    assert torch.equal(running_mean, mean_before)
    # A per-channel affine: the input gradient is g * weight / sqrt(running_var + eps).
    scale = (w / torch.sqrt(running_var + EPS)).reshape(1, -1, 1, 1)
    assert_close(actual[1], (g.double() * scale).to(dtype), dtype=dtype)


# ---- numerical robustness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("forced", [None, False, True], ids=["gpu-blocks", "small-blocks", "small-blocks-fused"])
@pytest.mark.parametrize("op", ["group_norm", "instance_norm", "layer_norm", "evonorm_s0"])
def test_large_offset_normalizes(op, dtype, offset, forced):
    x = make_x((2, 6, 6, 7), dtype, channels_last=True, scale=1.0, shift=offset)
    dims = {"instance_norm": (2, 3), "layer_norm": (1, 2, 3)}.get(op)
    with forced_blocks(4, 2, 4, 16, fuse=forced) if forced is not None else contextlib.nullcontext():
        y = OPS[op][0](kernels, x, *[None] * len(OPS[op][1])).double()
    if dims is None:
        y, dims = y.reshape(2, 3, 2, 6, 7), (2, 3, 4)
    var, mean = torch.var_mean(y, dims, correction=0)
    assert mean.abs().max().item() < 1e-2
    assert (var.sqrt() - 1).abs().max().item() < 1e-2


def test_rms_norm_large_values():
    x = make_x((2, 6, 5, 5), scale=1.0, shift=1e4)
    y = kernels.rms_norm(x).double()
    assert (y.square().mean((1, 2, 3)) - 1).abs().max().item() < 1e-4
    assert_close(y.float(), reference.rms_norm(x))


# ---- layout and memory ---------------------------------------------------------------------------------------------


def test_non_standard_layout_input():
    x = make_x((2, 6, 4, 5)).permute(0, 1, 3, 2)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference("group_norm", x, params_for("group_norm", 6))


def test_output_gradient_in_another_layout():
    x = make_x((2, 6, 4, 5), channels_last=True).requires_grad_()
    kernels.group_norm(x, 3).sum().backward()  # an expanded, stride-0 output gradient
    expected = torch.autograd.grad(reference.group_norm(x, 3).sum(), x)[0]
    assert_close(x.grad, expected)


def test_backward_saves_statistics_not_normalized_input():
    x = make_x((2, 6, 4, 5)).requires_grad_()
    w, b = (p.requires_grad_() for p in params_for("group_norm", 6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.group_norm(x, 3, w, b)
    assert max(t.numel() for t in saved) == x.numel()
    assert sum(t.numel() == x.numel() for t in saved) == 1
    assert {tuple(t.shape) for t in saved if t.numel() != x.numel() and t.dim() == 2} == {(2, 3)}


# ---- launch configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [32, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "groups, group_size", [(32, 8), (256, 1), (1, 256), (32, 64)], ids=["gn", "in", "ln", "gn2048"]
)
def test_launch_configuration_fills_the_gpu(n, channels_last, groups, group_size):
    """ResNet-50 shapes: tiles cover whole groups along the contiguous axis and the grid has >= 2 programs per SM
    whenever there are enough position tiles to split."""
    positions = 56 * 56 if group_size < 64 else 7 * 7
    cfg = kernels.blocks(n, groups, group_size, positions, channels_last, 132)
    programs = n * cfg.splits * math.ceil(groups / cfg.block_g)
    tiles = math.ceil(positions / cfg.block_s)
    assert programs >= 264 or cfg.splits == tiles
    assert cfg.splits == math.ceil(positions / cfg.span) and cfg.span % cfg.block_s == 0
    assert cfg.block_s * cfg.block_g * cfg.block_cg <= 8192
    if channels_last:
        assert cfg.block_g * cfg.block_cg >= min(groups * group_size, 256)
    else:
        assert cfg.block_s >= min(positions, 1024) // 2
    if (groups, group_size, channels_last) == (32, 8, True):
        assert (cfg.block_g, cfg.block_cg) == (32, 8)
    assert cfg.rows is False  # groups of 8 channels (and 1, and wide ones) vectorize along their own axis


@pytest.mark.parametrize("group_size, rows", [(2, True), (4, True), (3, False), (8, False)])
def test_rows_layout_only_for_channels_last_whole_groups_of_2_or_4(group_size, rows):
    assert kernels.blocks(32, 32, group_size, 112 * 112, True, 132).rows is rows
    assert kernels.blocks(32, 32, group_size, 112 * 112, False, 132).rows is False


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kernels.group_norm(torch.randn(6), 3), "group_norm: expected input .* at least 2 dims, got shape"),
        (lambda: kernels.group_norm(torch.randn(2, 6, 3), 4), "num_groups=4 must divide num_channels=6"),
        (lambda: kernels.group_norm(torch.randn(2, 6, 3), 0), "num_groups=0 must be a positive integer"),
        (
            lambda: kernels.group_norm(torch.randn(2, 6, 3), 3, torch.ones(5)),
            r"group_norm: weight of shape \(5,\) on cpu does not match the input's 6",
        ),
        (lambda: kernels.group_norm(torch.randn(2, 6, 3), 3, act="gelu"), "act 'gelu'"),
        (lambda: kernels.group_norm(torch.ones(2, 6, 3, dtype=torch.int64), 3), "dtype torch.int64"),
        (lambda: kernels.layer_norm(torch.randn(2, 6, 3), None, torch.ones(7)), r"layer_norm: bias of shape \(7,\)"),
        (lambda: kernels.rms_norm(torch.randn(2, 6, 3), act="tanh"), "rms_norm: act 'tanh'"),
        (lambda: kernels.evonorm_s0(torch.randn(2, 6), 3), r"evonorm_s0: expected 3D or 4D or 5D input"),
        (lambda: kernels.evonorm_s0(torch.randn(2, 6, 3), 4), "num_groups=4 must divide channels=6"),
        (lambda: kernels.evonorm_s0(torch.randn(2, 6, 3), 3, v=torch.ones(3)), r"evonorm_s0: v of shape \(3,\)"),
        (lambda: kernels.instance_norm(torch.randn(2, 6, 1, 1)), "more than 1 spatial value"),
        (lambda: kernels.instance_norm(torch.randn(2, 6, 3), torch.zeros(6)), "running_var=NoneType"),
        (lambda: kernels.instance_norm(torch.randn(2, 6, 3), use_input_stats=False), "use_input_stats=False"),
        (
            lambda: kernels.instance_norm(torch.randn(2, 6, 3), torch.zeros(4), torch.ones(4)),
            r"instance_norm: running_mean of shape \(4,\)",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- torch.compile and the custom-op registrations -----------------------------------------------------------------


def test_compiled_fullgraph_matches_reference():
    """Group norm with a fused SiLU and instance norm with running statistics under torch.compile(fullgraph=True):
    the custom ops trace without a graph break and the kernels run through the interpreter inside the graph."""

    def model(x, w, b, running_mean, running_var):
        y = kernels.group_norm(x, 3, w, b, act="silu")
        return y + kernels.instance_norm(x, running_mean, running_var, w, b, momentum=0.2)

    def oracle(x, w, b, running_mean, running_var):
        y = F.silu(reference.group_norm(x, 3, w, b))
        return y + reference.instance_norm(x, running_mean, running_var, w, b, momentum=0.2)

    x = make_x((2, 6, 4, 3), channels_last=True)
    w, b = params_for("group_norm", 6)
    stats = {name: (torch.zeros(6), torch.ones(6)) for name in ("kernel", "reference")}
    compiled = torch.compile(model, fullgraph=True)
    actual = forward_backward(lambda x, w, b: compiled(x, w, b, *stats["kernel"]), x, w, b)
    expected = forward_backward(lambda x, w, b: oracle(x, w, b, *stats["reference"]), x, w, b)
    assert_all_close(actual, expected)
    for a, e in zip(stats["kernel"], stats["reference"], strict=True):
        assert_close(a, e)


@pytest.mark.parametrize(
    "case",
    ["group_norm", "gate_relu", "given_stats"],
)
def test_custom_ops_pass_opcheck(case):
    x = make_x((2, 6, 3, 4), channels_last=True)
    w, b, v = params_for("evonorm_s0", 6)
    args = {
        "group_norm": (x, w, b, None, None, None, 3, EPS, True, 0),
        "gate_relu": (x, w, None, v, None, None, 2, EPS, True, 1),
        "given_stats": (x, None, b, None, torch.zeros(6), torch.ones(6), 6, EPS, True, 2),
    }[case]
    torch.library.opcheck(torch.ops.normlab.group_stats_norm.default, args)
    _, mean, var = torch.ops.normlab.group_stats_norm(*args)
    backward_args = (grad_like(x), x, *args[1:4], mean, var, *args[6:], case != "given_stats")
    torch.library.opcheck(torch.ops.normlab.group_stats_norm_backward.default, backward_args)


# ---- GPU -----------------------------------------------------------------------------------------------------------


# The ResNet-50 stage of the targets: group norm and EvoNorm with 32 groups of 8 channels.
GPU_CALLS = {
    "group_norm": lambda m, x, w, b: m.group_norm(x, 32, w, b, EPS),
    "evonorm_s0": lambda m, x, w, b, v: m.evonorm_s0(x, 32, w, b, v, EPS),
}


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_realistic_shape(op, channels_last):
    """(32, 256, 56, 56) bfloat16 with the GPU launch configuration (several splits) vs the reference on CUDA."""
    x = make_x((32, 256, 56, 56), channels_last=channels_last).to("cuda", torch.bfloat16)
    params = [p.cuda() for p in params_for(op, 256)]
    call = GPU_CALLS.get(op, OPS[op][0])
    g = grad_like(x)
    actual = forward_backward(lambda x, *p: call(kernels, x, *p), x, *params, g=g)
    expected = forward_backward(lambda x, *p: call(reference, x, *p), x.float(), *params, g=g.float())
    assert_all_close(actual, expected, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [64, 128], ids=["groups-of-2", "groups-of-4"])
@pytest.mark.parametrize("op", ["group_norm", "evonorm_s0"])
def test_cuda_narrow_groups_channels_last(op, channels):
    """ResNet-50's stem-side shapes in channels_last bfloat16: GroupNorm(32) over 64 and 128 channels, the ROWS
    layout, vs the reference on CUDA."""
    x = make_x((32, channels, 56, 56), channels_last=True).to("cuda", torch.bfloat16)
    params = [p.cuda() for p in params_for(op, channels)]
    assert kernels.blocks(32, 32, channels // 32, 56 * 56, True, 132).rows
    g = grad_like(x)
    actual = forward_backward(lambda x, *p: GPU_CALLS[op](kernels, x, *p), x, *params, g=g)
    expected = forward_backward(lambda x, *p: GPU_CALLS[op](reference, x, *p), x.float(), *params, g=g.float())
    assert_all_close(actual, expected, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_cuda_transformer_rows(op):
    """(16384, 1024) bfloat16 rows through the channel-norm kernels vs the reference on CUDA."""
    x = make_x((16384, 1024)).to("cuda", torch.bfloat16)
    params = [p.cuda() for p in params_for(op, 1024)]
    g = grad_like(x)
    actual = forward_backward(lambda x, *p: OPS[op][0](kernels, x, *p), x, *params, g=g)
    expected = forward_backward(lambda x, *p: OPS[op][0](reference, x, *p), x.float(), *params, g=g.float())
    assert_all_close(actual, expected, dtype=torch.bfloat16)
