"""normlab BatchNorm*d against torch.nn.BatchNorm*d, plus the NaN guard, checkpoints and bad input."""

import io
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normlab
from normlab import kernels
from tests.helpers import assert_same_training, randomize_weight_and_bias
from tests.tolerances import assert_close

CASES = [
    (normlab.BatchNorm1d, torch.nn.BatchNorm1d, (7, 5)),
    (normlab.BatchNorm1d, torch.nn.BatchNorm1d, (3, 5, 11)),
    (normlab.BatchNorm2d, torch.nn.BatchNorm2d, (3, 5, 7, 2)),
    (normlab.BatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 2, 3)),
]
BACKENDS = ["native", "reference"]


def _pair(ours_cls, torch_cls, c, **kw):
    ours, ref = ours_cls(c, **kw), randomize_weight_and_bias(torch_cls(c, **kw))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ours_cls,torch_cls,shape", CASES)
def test_matches_torch_train_and_eval(ours_cls, torch_cls, shape, momentum, backend):
    ours, ref = _pair(ours_cls, torch_cls, shape[1], momentum=momentum)
    with kernels.use_backend(backend):
        assert_same_training(ours, ref, [shape] * 3, scale=3.0, shift=0.0)
        ours.eval()
        ref.eval()
        x = torch.randn(shape)
        assert_close(ours(x), ref(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_running_stats_and_no_affine_match_torch(backend):
    x = torch.randn(4, 3, 5, 5)
    for kw in [dict(track_running_stats=False), dict(affine=False)]:
        ours, ref = normlab.BatchNorm2d(3, **kw), torch.nn.BatchNorm2d(3, **kw)
        with kernels.use_backend(backend):
            assert_close(ours(x), ref(x))
            ours.eval()
            ref.eval()
            assert_close(ours(x), ref(x))


@given(
    n=st.sampled_from([1, 2, 3, 5]),
    c=st.sampled_from([1, 3, 7, 16]),
    hw=st.sampled_from([(1, 2), (3, 5), (7, 7)]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    channels_last=st.booleans(),
    backend=st.sampled_from(BACKENDS),
)
def test_batch_statistics_property(n, c, hw, dtype, channels_last, backend):
    x = torch.randn(n, c, *hw, dtype=torch.float64).mul(2).add(1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bn = normlab.BatchNorm2d(c, affine=False, dtype=dtype)
    with kernels.use_backend(backend):
        y = bn(x)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or y.is_contiguous()
    yf = y.double()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert yf.mean((0, 2, 3)).abs().max() < tol
    # the biased variance of the normalized output is var / (var + eps) <= 1
    var = x.double().var((0, 2, 3), unbiased=False)
    assert_close(yf.var((0, 2, 3), unbiased=False), var / (var + bn.eps), dtype=torch.float32, scale=tol / 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_large_offset_is_stable(dtype, offset, backend):
    x = (torch.randn(16, 4, 8, 8, dtype=torch.float64) + offset).to(dtype)
    with kernels.use_backend(backend):
        y = normlab.BatchNorm2d(4, dtype=dtype)(x).double()
    assert y.mean().abs() < 1e-2
    assert (y.std() - 1).abs() < 1e-2


def test_nan_guard_skips_update_counts_and_warns_once():
    bn = normlab.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        bn(bad)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_nonfinite_batches) == 1 and int(bn.num_batches_tracked) == 1
    bad[1, 2, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(bad)
    assert int(bn.num_nonfinite_batches) == 2
    bn(torch.randn(4, 3, 2, 2))
    assert int(bn.num_batches_tracked) == 2 and not torch.equal(bn.running_mean, mean)


def test_nan_guard_off_lets_nan_through_like_torch():
    bn = normlab.BatchNorm2d(3, nan_guard=False)
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 1, 0, 0] = float("nan")
    bn(bad)
    assert torch.isnan(bn.running_mean[1])


def test_nan_guard_is_not_in_the_state_dict():
    assert set(normlab.BatchNorm2d(3).state_dict()) == set(torch.nn.BatchNorm2d(3).state_dict())


def test_one_value_per_channel_in_training_raises_naming_shape():
    bn = normlab.BatchNorm1d(4)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 4\)"):
        bn(torch.randn(1, 4))
    bn.eval()
    assert bn(torch.randn(1, 4)).shape == (1, 4)


def test_torch_state_dict_loads_and_round_trips_weights_only():
    ref = torch.nn.BatchNorm2d(6)
    ref.train()
    for _ in range(3):
        ref(torch.randn(8, 6, 4, 4) * 2 + 1)
    ref.eval()
    ours = normlab.BatchNorm2d(6).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 4, 4)
    assert torch.equal(ours(x), ref(x))
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    back = torch.nn.BatchNorm2d(6).eval()
    back.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back(x), ref(x))


def test_old_checkpoint_without_num_batches_tracked_loads():
    state = torch.nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    bn = normlab.BatchNorm2d(3)
    bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0


def test_sync_without_process_group_runs_locally():
    ours, ref = _pair(normlab.BatchNorm2d, torch.nn.BatchNorm2d, 3, momentum=0.1)
    ours.sync = True
    x = torch.randn(4, 3, 2, 2)
    assert_close(ours(x), ref(x))
    assert "sync=True" in repr(normlab.BatchNorm2d(3, sync=True))


@pytest.mark.parametrize(
    "cls,shape,match",
    [
        (normlab.BatchNorm2d, (4, 3, 5), r"expected 4D input .*\(4, 3, 5\)"),
        (normlab.BatchNorm1d, (4, 3, 5, 5), r"expected 2D or 3D input"),
        (normlab.BatchNorm3d, (4, 3, 5, 5), r"expected 5D input"),
        (normlab.BatchNorm2d, (4, 2, 5, 5), r"input has 2 channels .* expected num_features=3"),
    ],
)
def test_bad_input_raises(cls, shape, match):
    with pytest.raises(ValueError, match=match):
        cls(3)(torch.randn(shape))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_features=0), r"num_features=0 must be a positive integer"),
        (dict(num_features=3, eps=0.0), r"eps=0.0 must be a finite number > 0"),
        (dict(num_features=3, eps=-1e-5), r"eps=-1e-05"),
        (dict(num_features=3, momentum=1.5), r"momentum=1.5 must be None"),
    ],
)
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        normlab.BatchNorm2d(**kw)


def test_nan_guard_branch_free_path_under_compile():
    """The path used on accelerators and under torch.compile never reads the test on the host."""
    torch._dynamo.reset()
    bn = normlab.BatchNorm2d(3)
    compiled = torch.compile(bn, fullgraph=True, backend="aot_eager")
    compiled(torch.randn(4, 3, 2, 2))
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    bad = torch.randn(4, 3, 2, 2)
    bad[0, 0, 0, 0] = float("inf")
    compiled(bad)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_nonfinite_batches) == 1 and int(bn.num_batches_tracked) == 1
    compiled(torch.randn(4, 3, 2, 2))
    assert int(bn.num_batches_tracked) == 2 and not torch.equal(bn.running_var, var)
