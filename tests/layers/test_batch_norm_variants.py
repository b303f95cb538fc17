"""FrozenBatchNorm1d/2d, GhostBatchNorm2d and BatchRenorm2d against torch.nn.BatchNorm and their references."""

import copy
import inspect
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

from normlab.functional import batch_renorm, ghost_batch_norm
from normlab.layers import (
    BatchNorm2d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    GhostBatchNorm2d,
)
from tests.helpers import assert_same_training, forward_backward, output_and_input_grad, randomize_weight_and_bias
from tests.tolerances import assert_close

FOUR_KEYS = {"weight", "bias", "running_mean", "running_var"}


def _trained_bn(bn_cls=nn.BatchNorm2d, c=3, shape=(6, 3, 4, 4), **kw):
    """A torch batch norm with non-trivial affine and running statistics."""
    bn = randomize_weight_and_bias(bn_cls(c, **kw))
    if bn.track_running_stats:
        for _ in range(2):
            bn(torch.randn(shape) * 2 + 1)
    return bn


def _assert_step_matches_functional(ours, reference, x, g, running_mean, running_var):
    """One training step of ``ours`` against ``reference(x, running_mean, running_var, weight, bias)`` with ours'
    weight and bias, which updates the given running statistics: output, input and parameter gradients and running
    statistics agree. Resets ours' parameter gradients."""
    y, gx = output_and_input_grad(ours, x, g)
    yr, gxr, gw, gb = forward_backward(
        lambda x, w, b: reference(x, running_mean, running_var, w, b), x, ours.weight, ours.bias, g=g
    )
    for a, e in [(y, yr), (gx, gxr), (ours.running_mean, running_mean), (ours.running_var, running_var)]:
        assert_close(a, e)
    assert_close(ours.weight.grad, gw)
    assert_close(ours.bias.grad, gb)
    ours.weight.grad = ours.bias.grad = None


# ---------------------------------------------------------------------------------------------- FrozenBatchNorm


def test_frozen2d_equals_torch_batch_norm_eval_from_its_state_dict():
    bn = _trained_bn().eval()
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is ignored
    assert set(frozen.state_dict()) == FOUR_KEYS
    x, g = torch.randn(5, 3, 7, 6), torch.randn(5, 3, 7, 6)
    for a, b in zip(output_and_input_grad(frozen, x, g), output_and_input_grad(bn, x, g), strict=True):
        assert_close(a, b)
    y_train = frozen.train()(x)
    y_eval = frozen.eval()(x)
    assert torch.equal(y_train, y_eval)


def test_frozen_has_no_parameters_and_never_changes():
    frozen = FrozenBatchNorm2d.from_batch_norm(_trained_bn())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    assert list(frozen.parameters()) == []
    frozen.train()
    output_and_input_grad(frozen, torch.randn(4, 3, 5, 5) * 5 + 3, torch.randn(4, 3, 5, 5))
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("shape", [(7, 3), (4, 3, 9)])
def test_frozen1d_equals_torch_batch_norm1d_eval(shape):
    bn = _trained_bn(nn.BatchNorm1d, shape=shape).eval()
    frozen = FrozenBatchNorm1d.from_batch_norm(bn)
    x, g = torch.randn(shape), torch.randn(shape)
    for a, b in zip(output_and_input_grad(frozen, x, g), output_and_input_grad(bn, x, g), strict=True):
        assert_close(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _trained_bn(),
        lambda: _trained_bn(affine=False),
        lambda: _trained_bn(BatchNorm2d),
        lambda: _trained_bn(GhostBatchNorm2d, virtual_batch_size=2),
        lambda: _trained_bn(BatchRenorm2d),
        lambda: FrozenBatchNorm2d.from_batch_norm(_trained_bn()),
    ],
)
def test_from_batch_norm_copies_statistics_and_affine(make):
    bn = make()
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    assert frozen.eps == bn.eps and frozen.training == bn.training
    expected_weight = bn.weight if bn.weight is not None else torch.ones(3)
    expected_bias = bn.bias if bn.bias is not None else torch.zeros(3)
    assert torch.equal(frozen.weight, expected_weight.detach())
    assert torch.equal(frozen.bias, expected_bias.detach())
    assert torch.equal(frozen.running_mean, bn.running_mean)
    assert frozen.running_mean is not bn.running_mean
    x = torch.randn(3, 3, 4, 4)
    assert_close(frozen(x), bn.eval()(x))


def test_from_batch_norm_keeps_dtype():
    bn = nn.BatchNorm2d(4, eps=1e-3, dtype=torch.float64)
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    assert frozen.running_var.dtype == frozen.weight.dtype == torch.float64 and frozen.eps == 1e-3


def test_from_batch_norm_refuses_what_has_no_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchNorm2d.from_batch_norm(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="expected a batch norm module.*Linear"):
        FrozenBatchNorm2d.from_batch_norm(nn.Linear(3, 3))


def test_frozen_loads_torchvision_style_and_normlab_state_dicts():
    torchvision_style = {
        "weight": torch.rand(3) + 0.5,
        "bias": torch.randn(3),
        "running_mean": torch.randn(3),
        "running_var": torch.rand(3) + 0.5,
    }
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(torchvision_style)
    for k, v in torchvision_style.items():
        assert torch.equal(getattr(frozen, k), v)
    ours = _trained_bn(BatchNorm2d)
    frozen.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 4, 4)
    assert_close(frozen(x), ours.eval()(x))


def test_frozen_bad_input_and_arguments():
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: expected 4D input.*\(2, 3, 4\)"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm1d: expected 2D or 3D input"):
        FrozenBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="input has 4 channels.*num_features=3"):
        FrozenBatchNorm2d(3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"FrozenBatchNorm2d: num_features=0"):
        FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match=r"FrozenBatchNorm1d: eps=0"):
        FrozenBatchNorm1d(3, eps=0)


# --------------------------------------------------------------------------------------------- GhostBatchNorm2d


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("vbs", [6, 64])
def test_ghost_with_one_ghost_batch_equals_torch_batch_norm(vbs, momentum):
    ref = _trained_bn(momentum=momentum)
    ours = GhostBatchNorm2d(3, virtual_batch_size=vbs, momentum=momentum)
    ours.load_state_dict(ref.state_dict())
    assert_same_training(ours, ref, [(6, 3, 4, 5)] * 3)
    ours.eval()
    ref.eval()
    x = torch.randn(6, 3, 4, 5)
    assert_close(ours(x), ref(x))


@pytest.mark.parametrize("n", [12, 11])
def test_ghost_module_matches_functional_reference(n):
    ours = randomize_weight_and_bias(GhostBatchNorm2d(3, virtual_batch_size=4, momentum=0.2))
    running_mean, running_var = ours.running_mean.clone(), ours.running_var.clone()
    for step in range(2):
        x, g = torch.randn(n, 3, 3, 4) * 2 + step, torch.randn(n, 3, 3, 4)
        _assert_step_matches_functional(
            ours,
            lambda *a: ghost_batch_norm(*a, True, 0.2, 1e-5, virtual_batch_size=4),
            x,
            g,
            running_mean,
            running_var,
        )


def test_ghost_and_torch_batch_norm_state_dicts_load_both_ways():
    bn = _trained_bn().eval()
    ghost = GhostBatchNorm2d(3, virtual_batch_size=2)
    ghost.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(ghost.eval()(x), ghost.train(False)(x))
    assert_close(ghost(x), bn(x))
    nn.BatchNorm2d(3).load_state_dict(ghost.state_dict())


def test_ghost_nan_guard_and_no_running_stats():
    ghost = GhostBatchNorm2d(3, virtual_batch_size=2)
    x = torch.randn(4, 3, 2, 2)
    x[1, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        ghost(x)
    assert torch.equal(ghost.running_mean, torch.zeros(3)) and int(ghost.num_batches_tracked) == 0
    assert int(ghost.num_nonfinite_batches) == 1
    untracked = GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2)
    assert_close(untracked(x), ghost_batch_norm(x, None, None, virtual_batch_size=2))


def test_ghost_bad_arguments_and_input():
    for bad in [0, -1, 2.5]:
        with pytest.raises(ValueError, match=rf"GhostBatchNorm2d: virtual_batch_size={bad!r}"):
            GhostBatchNorm2d(3, virtual_batch_size=bad)
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d: eps=0"):
        GhostBatchNorm2d(3, eps=0)
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d: expected 4D input"):
        GhostBatchNorm2d(3)(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=r"virtual_batch_size=2.*\(5, 3, 1, 1\)"):
        GhostBatchNorm2d(3, virtual_batch_size=2)(torch.randn(5, 3, 1, 1))
    assert "virtual_batch_size=7" in repr(GhostBatchNorm2d(3, virtual_batch_size=7))


# ------------------------------------------------------------------------------------------------ BatchRenorm2d


def test_renorm_without_room_to_correct_equals_torch_batch_norm():
    ref = _trained_bn(momentum=0.3)
    ours = BatchRenorm2d(3, r_max=1.0, d_max=0.0, momentum=0.3)
    ours.load_state_dict(ref.state_dict())
    assert_same_training(ours, ref, [(4, 3, 5, 5), (3, 3, 5, 5), (4, 3, 5, 5), (2, 3, 5, 5)], scale=4.0, shift=2.0)
    ours.eval()
    ref.eval()
    x = torch.randn(4, 3, 5, 5)
    assert_close(ours(x), ref(x))


def _far_state():
    """A BN state whose running statistics are far from those of randn batches (r and d would be clipped)."""
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([8.0, -8.0, 3.0]))
        bn.running_var.copy_(torch.tensor([0.01, 50.0, 0.1]))
    return randomize_weight_and_bias(bn)


def test_renorm_warmup_starts_as_batch_norm_then_ramps():
    ref = _far_state()
    ours = BatchRenorm2d(3, warmup_steps=10)
    ours.load_state_dict(ref.state_dict())
    assert_same_training(ours, ref, [(4, 3, 5, 5)], scale=1.0, shift=0.0)  # step 1: plain BatchNorm
    r_max, d_max = ours.current_limits()
    assert_close(torch.stack([r_max, d_max]), torch.tensor([1.2, 0.5]))
    running_mean, running_var = ours.running_mean.clone(), ours.running_var.clone()
    x = torch.randn(4, 3, 5, 5)
    y = ours(x)  # step 2: bounds 1.2 and 0.5, which bind with these running statistics
    expected = batch_renorm(x, running_mean, running_var, ours.weight, ours.bias, True, 0.1, 1e-5, r_max=1.2, d_max=0.5)
    assert_close(y, expected)
    assert not torch.allclose(y, ref(x), atol=1e-2)
    ours.num_batches_tracked.fill_(5)
    assert_close(torch.stack(ours.current_limits()), torch.tensor([2.0, 2.5]))
    ours.num_batches_tracked.fill_(30)
    assert_close(torch.stack(ours.current_limits()), torch.tensor([3.0, 5.0]))
    assert BatchRenorm2d(3, r_max=2.0, d_max=1.0).current_limits() == (2.0, 1.0)


def test_renorm_module_matches_functional_reference():
    ours = BatchRenorm2d(3, r_max=2.0, d_max=1.0, momentum=0.2)
    ours.load_state_dict(_far_state().state_dict())
    running_mean, running_var = ours.running_mean.clone(), ours.running_var.clone()
    for _ in range(3):
        x, g = torch.randn(5, 3, 4, 3), torch.randn(5, 3, 4, 3)
        _assert_step_matches_functional(
            ours,
            lambda *a: batch_renorm(*a, True, 0.2, 1e-5, r_max=2.0, d_max=1.0),
            x,
            g,
            running_mean,
            running_var,
        )


def test_renorm_loads_torch_batch_norm_state_dict_with_identical_eval():
    bn = _trained_bn().eval()
    brn = BatchRenorm2d(3)
    brn.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(brn.eval()(x), brn(x))
    assert_close(brn(x), bn(x))
    assert set(brn.state_dict()) == set(bn.state_dict())


def test_renorm_warmup_does_not_recompile():
    torch._dynamo.reset()
    brn = BatchRenorm2d(3, warmup_steps=4)
    ref = copy.deepcopy(brn)
    compiled = torch.compile(brn, fullgraph=True, backend="eager")
    try:
        for step in range(6):
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                x = torch.randn(4, 3, 3, 3) + step
                assert_close(compiled(x), ref(x))
    finally:
        torch._dynamo.reset()
    assert_close(brn.running_var, ref.running_var)


def test_renorm_nan_guard_is_inherited():
    brn = BatchRenorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        brn(x)
    assert torch.equal(brn.running_var, torch.ones(3)) and int(brn.num_nonfinite_batches) == 1


def test_renorm_bad_arguments_and_input():
    for kwargs, pattern in [
        (dict(r_max=0.5), r"BatchRenorm2d: r_max=0\.5"),
        (dict(d_max=-1), r"BatchRenorm2d: d_max=-1"),
        (dict(eps=0), r"BatchRenorm2d: eps=0"),
        (dict(warmup_steps=-1), r"BatchRenorm2d: warmup_steps=-1"),
        (dict(warmup_steps=2.5), r"BatchRenorm2d: warmup_steps=2\.5"),
        (dict(momentum=1.5), r"BatchRenorm2d: momentum=1\.5"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            BatchRenorm2d(3, **kwargs)
    assert "track_running_stats" not in inspect.signature(BatchRenorm2d).parameters
    with pytest.raises(TypeError):
        BatchRenorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=r"BatchRenorm2d: expected 4D input"):
        BatchRenorm2d(3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"input has 2 channels"):
        BatchRenorm2d(3)(torch.randn(4, 2, 3, 3))
    assert "r_max=3.0, d_max=5.0, warmup_steps=9" in repr(BatchRenorm2d(3, warmup_steps=9))
