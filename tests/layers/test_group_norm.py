"""normlab GroupNorm and InstanceNorm*d against torch.nn, the functional references and each other."""

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from normlab import kernels
from normlab.functional import group_norm, instance_norm
from normlab.layers.group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normlab.layers.layer_norm import LayerNorm
from tests.helpers import assert_all_close, randomize_affine, run
from tests.tolerances import assert_close

BACKENDS = ["reference", "native"]
INSTANCE_CASES = [
    (InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 5, 11)),
    (InstanceNorm2d, torch.nn.InstanceNorm2d, (2, 5, 7, 3)),
    (InstanceNorm3d, torch.nn.InstanceNorm3d, (2, 5, 3, 2, 3)),
]


# ---- GroupNorm ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 12), (1, 12, 7), (3, 12, 5, 4), (2, 12, 3, 2, 5)])
@pytest.mark.parametrize("num_groups", [1, 3, 4, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(backend, shape, num_groups, affine):
    # float64: with few values per group the input gradient is ill-conditioned, so float32 results differ by more
    # than rounding; the float32 paths are compared with the reference in tests/functional
    ours = randomize_affine(GroupNorm(12, num_groups=num_groups, eps=1e-4, affine=affine, dtype=torch.float64))
    ref = torch.nn.GroupNorm(num_groups, 12, eps=1e-4, affine=affine, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    with kernels.use_backend(backend):
        for training in (True, False):
            ours.train(training)
            ref.train(training)
            assert_all_close(run(ours, x), run(ref, x))


def test_group_norm_group_size_sets_the_number_of_groups():
    ours = randomize_affine(GroupNorm(12, group_size=4))
    assert ours.num_groups == 3
    assert GroupNorm(12, num_groups=3, group_size=4).num_groups == 3
    ref = torch.nn.GroupNorm(3, 12)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 12, 3, 3)
    assert_close(ours(x), ref(x))


def test_group_norm_defaults_to_32_groups():
    assert GroupNorm(64).num_groups == 32
    assert "num_groups=32" in repr(GroupNorm(64))


def test_group_norm_module_matches_functional_reference():
    module = randomize_affine(GroupNorm(6, num_groups=2, eps=1e-3))
    x = torch.randn(3, 6, 4, 5).contiguous(memory_format=torch.channels_last)
    expected = group_norm(x, 2, module.weight, module.bias, 1e-3)
    y = module(x)
    assert_close(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_rejects_num_groups_not_dividing_channels():
    with pytest.raises(ValueError, match=r"GroupNorm: num_groups=3 must divide num_features=32"):
        GroupNorm(32, num_groups=3)


def test_group_norm_rejects_group_size_not_dividing_channels():
    with pytest.raises(ValueError, match=r"GroupNorm: group_size=5 must divide num_features=32"):
        GroupNorm(32, group_size=5)


def test_group_norm_rejects_disagreeing_num_groups_and_group_size():
    with pytest.raises(ValueError, match=r"num_groups=4 and group_size=16 disagree.*num_groups=2"):
        GroupNorm(32, num_groups=4, group_size=16)


@pytest.mark.parametrize("kwargs,match", [({"num_groups": 0}, r"num_groups=0"), ({"group_size": -2}, r"group_size=-2")])
def test_group_norm_rejects_non_positive_group_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupNorm(32, **kwargs)


def test_group_norm_takes_num_groups_by_keyword_only():
    with pytest.raises(TypeError):
        GroupNorm(32, 4)


@pytest.mark.parametrize("shape", [(12,), (2, 12, 1, 1, 1, 1)])
def test_group_norm_rejects_wrong_rank(shape):
    expected = re.escape(f"GroupNorm: expected 2D or 3D or 4D or 5D input (N, C, ...), got input of shape {shape}")
    with pytest.raises(ValueError, match=expected):
        GroupNorm(12, num_groups=3)(torch.randn(shape))


def test_group_norm_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"input has 8 channels.*num_features=12"):
        GroupNorm(12, num_groups=3)(torch.randn(2, 8, 4))


# ---- InstanceNorm -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("ours_cls,torch_cls,shape", INSTANCE_CASES)
def test_instance_norm_matches_torch_train_and_eval(ours_cls, torch_cls, shape, affine, track_running_stats, backend):
    kw = {"affine": affine, "track_running_stats": track_running_stats, "momentum": 0.2, "eps": 1e-4}
    ours, ref = randomize_affine(ours_cls(5, **kw)), torch_cls(5, **kw)
    ref.load_state_dict(ours.state_dict())
    with kernels.use_backend(backend):
        for step in range(2):
            x = torch.randn(shape) * 2 + step
            assert_all_close(run(ours, x), run(ref, x))
            if track_running_stats:
                assert_close(ours.running_mean, ref.running_mean)
                assert_close(ours.running_var, ref.running_var)
                assert int(ours.num_batches_tracked) == step + 1
        ours.eval()
        ref.eval()
        x = torch.randn(shape) - 1
        assert_all_close(run(ours, x), run(ref, x))
    if track_running_stats:
        assert int(ours.num_batches_tracked) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_eval_with_running_stats_normalizes_by_them(backend):
    norm = InstanceNorm2d(3, affine=False, track_running_stats=True, eps=1e-5)
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
        norm.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    norm.eval()
    x = torch.randn(2, 3, 1, 1)  # one spatial value is fine when the input's statistics are not used
    with kernels.use_backend(backend):
        y = norm(x)
    expected = (x - norm.running_mean.view(1, 3, 1, 1)) / (norm.running_var.view(1, 3, 1, 1) + 1e-5).sqrt()
    assert_close(y, expected)


def test_instance_norm_momentum_none_is_the_cumulative_average():
    norm = InstanceNorm1d(2, momentum=None, track_running_stats=True)
    batches = [torch.randn(3, 2, 6, dtype=torch.float64) * (i + 1) + i for i in range(3)]
    norm.double()
    for x in batches:
        norm(x)
    assert_close(norm.running_mean, torch.stack([x.mean(2).mean(0) for x in batches]).mean(0))
    assert_close(norm.running_var, torch.stack([x.var(2).mean(0) for x in batches]).mean(0))


def test_instance_norm_is_affine_by_default_unlike_torch():
    norm = InstanceNorm2d(4)
    assert norm.weight is not None and norm.bias is not None
    assert norm.running_mean is None
    assert torch.nn.InstanceNorm2d(4).weight is None


def test_instance_norm_module_matches_functional_reference():
    norm = randomize_affine(InstanceNorm3d(3, eps=1e-3))
    x = torch.randn(2, 3, 2, 3, 4).contiguous(memory_format=torch.channels_last_3d)
    y = norm(x)
    assert_close(y, instance_norm(x, None, None, norm.weight, norm.bias, True, 0.1, 1e-3))
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("ours_cls,shape", [(InstanceNorm1d, (4, 3, 1)), (InstanceNorm2d, (4, 3, 1, 1))])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_instance_norm_rejects_one_spatial_value_when_training(ours_cls, shape, track_running_stats):
    norm = ours_cls(3, track_running_stats=track_running_stats)
    expected = rf"{ours_cls.__name__}: expected more than 1 spatial value.*{re.escape(str(shape))}"
    with pytest.raises(ValueError, match=expected):
        norm(torch.randn(shape))


@pytest.mark.parametrize(
    "ours_cls,shape",
    [
        (InstanceNorm1d, (3, 4)),
        (InstanceNorm1d, (2, 3, 4, 4)),
        (InstanceNorm2d, (3, 4, 4)),
        (InstanceNorm3d, (2, 3, 4, 4)),
    ],
)
def test_instance_norm_rejects_wrong_rank(ours_cls, shape):
    with pytest.raises(ValueError, match=rf"{ours_cls.__name__}: expected {ours_cls._input_dims[0]}D input"):
        ours_cls(3)(torch.randn(shape))


def test_instance_norm_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"InstanceNorm2d: input has 4 channels.*num_features=3"):
        InstanceNorm2d(3)(torch.randn(2, 4, 5, 5))


def test_instance_norm_rejects_bad_momentum():
    with pytest.raises(ValueError, match=r"InstanceNorm2d: momentum=1.5"):
        InstanceNorm2d(3, momentum=1.5)


# ---- equivalences -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_with_one_group_is_layer_norm_over_chw(backend):
    gn = randomize_affine(GroupNorm(6, num_groups=1))
    ln = LayerNorm(6)
    ln.load_state_dict(gn.state_dict())
    x = torch.randn(3, 6, 5, 4) * 2 + 1
    with kernels.use_backend(backend):
        assert_all_close(run(gn, x), run(ln, x))
    oracle = F.layer_norm(x, x.shape[1:], eps=1e-5) * gn.weight.view(1, 6, 1, 1) + gn.bias.view(1, 6, 1, 1)
    assert_close(gn(x), oracle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_with_one_channel_per_group_is_instance_norm(backend):
    gn = randomize_affine(GroupNorm(6, num_groups=6))
    inorm = InstanceNorm2d(6)
    inorm.load_state_dict(gn.state_dict())
    x = torch.randn(3, 6, 5, 4) * 2 + 1
    with kernels.use_backend(backend):
        assert_all_close(run(gn, x), run(inorm, x))


# ---- numerical robustness -----------------------------------------------------------------------------------------

ROBUSTNESS_CASES = [(torch.float32, 1e4), (torch.bfloat16, 100.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,offset", ROBUSTNESS_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "make,group_dims",
    [
        (lambda: GroupNorm(16, num_groups=4), lambda y: y.unflatten(1, (4, 4)).flatten(2)),
        (lambda: InstanceNorm2d(16), lambda y: y.flatten(2)),
        (lambda: InstanceNorm2d(16, track_running_stats=True), lambda y: y.flatten(2)),
    ],
    ids=["GroupNorm", "InstanceNorm2d", "InstanceNorm2d-tracked"],
)
def test_large_offset_normalizes_to_zero_mean_unit_std(make, group_dims, channels_last, dtype, offset, backend):
    x = (torch.randn(4, 16, 8, 8, dtype=torch.float64) + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    norm = make().to(dtype)
    with kernels.use_backend(backend):
        y = group_dims(norm(x).double())
    std, mean = torch.std_mean(y, dim=-1, correction=0)
    assert mean.abs().max() < 1e-2
    assert (std - 1).abs().max() < 1e-2


def test_channels_last_cpu_backward_without_input_grad_does_not_crash():
    """torch 2.13's CPU group_norm backward of a channels-last input that does not require grad, with an affine that
    does, kills the process (segmentation fault: a frozen stem feeding a trained GroupNorm). normlab's native path
    normalizes a contiguous copy, so its GroupNorm trains there. In a subprocess: a regression must fail the test, not
    end the test run."""
    code = (
        "import torch, normlab\n"
        "gn = normlab.GroupNorm(16, num_groups=4)\n"
        "x = torch.randn(4, 16, 6, 6).contiguous(memory_format=torch.channels_last)\n"
        "with normlab.kernels.use_backend('native'):\n"
        "    y = gn(x)\n"
        "    y.sum().backward()\n"
        "print(y.is_contiguous(memory_format=torch.channels_last), tuple(gn.weight.grad.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["True", "(16,)"]
