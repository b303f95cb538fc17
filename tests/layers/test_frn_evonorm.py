"""FilterResponseNorm2d, EvoNorm2dB0 and EvoNorm2dS0 modules: against their functional references, against
torch.nn.BatchNorm2d / GroupNorm for the nonlinearity=False variants, running statistics, batch independence,
checkpoints and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab import functional, kernels
from normlab.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNorm2d
from tests.helpers import assert_same_step, randomize_weight_and_bias
from tests.tolerances import assert_close


def _randomize(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "eps_param":
                p.uniform_(0.01, 0.1)
            else:
                p.uniform_(-1.0, 1.5)
    return module


def _reference_call(module, x):
    """The functional reference the module should agree with, on cloned buffers."""
    if isinstance(module, FilterResponseNorm2d):
        return functional.filter_response_norm(x, module.weight, module.bias, module.tau, module.eps, module.eps_param)
    if isinstance(module, EvoNorm2dS0):
        return functional.evonorm_s0(x, module.num_groups, module.weight, module.bias, module.v, module.eps)
    raise TypeError(type(module))


def _grads(module, x, y, g):
    (y * g).sum().backward()
    grads = {"x": x.grad} | {n: p.grad for n, p in module.named_parameters()}
    x.grad = None
    module.zero_grad()
    return grads


MODULES = [
    lambda: FilterResponseNorm2d(5),
    lambda: FilterResponseNorm2d(5, learnable_eps=True),
    lambda: FilterResponseNorm2d(5, tlu=False, affine=False),
    lambda: EvoNorm2dS0(6, num_groups=3),
    lambda: EvoNorm2dS0(6, group_size=1, nonlinearity=False),
    lambda: EvoNorm2dS0(6, num_groups=2, affine=False),
]


@pytest.mark.parametrize("make", MODULES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_independent_modules_match_reference(make, training):
    module = _randomize(make()).train(training)
    c = module.num_features
    x = torch.randn(3, c, 5, 4, requires_grad=True)
    g = torch.randn(3, c, 5, 4)
    y = module(x)
    ours = _grads(module, x, y, g)
    expected = _reference_call(module, x)
    theirs = _grads(module, x, expected, g)
    assert_close(y, expected)
    for name in ours:
        assert_close(ours[name], theirs[name], msg=name)


@given(n=st.sampled_from([1, 2, 5]), hw=st.sampled_from([(1, 2), (3, 5), (6, 6)]), channels_last=st.booleans())
def test_batch_independent_modules_do_not_mix_samples(n, hw, channels_last):
    x = torch.randn(n, 6, *hw)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for module in [_randomize(FilterResponseNorm2d(6, learnable_eps=True)), _randomize(EvoNorm2dS0(6, num_groups=2))]:
        batched = module(x)
        alone = torch.cat([module(x[i : i + 1]) for i in range(n)])
        assert_close(batched, alone)
        module.eval()
        assert_close(module(x), batched)


def test_frn_parameters_and_their_switches():
    frn = FilterResponseNorm2d(4)
    assert torch.equal(frn.weight, torch.ones(4)) and torch.equal(frn.bias, torch.zeros(4))
    assert torch.equal(frn.tau, torch.zeros(4)) and frn.eps_param is None
    bare = FilterResponseNorm2d(4, tlu=False, affine=False)
    assert bare.tau is None and bare.weight is None and bare.bias is None
    assert set(dict(bare.named_parameters())) == set()
    assert "learnable_eps=False, tlu=False" in repr(bare)


def test_frn_tlu_clamps_at_tau():
    frn = FilterResponseNorm2d(3)
    with torch.no_grad():
        frn.tau.copy_(torch.tensor([-0.5, 0.2, 1.0]))
    x = torch.randn(2, 3, 6, 6)
    y = frn(x)
    tau = frn.tau.detach().view(1, 3, 1, 1)
    assert (y >= tau).all()
    assert (y == tau).any(dim=(0, 2, 3)).all()
    linear = FilterResponseNorm2d(3, tlu=False)(x)
    assert_close(y, torch.maximum(linear, tau))


def test_frn_learnable_eps_gets_a_gradient_and_learns():
    frn = FilterResponseNorm2d(3, learnable_eps=True, tlu=False)  # the TLU could cut a channel's gradient
    assert (frn.eps_param > 0).all()
    x = torch.randn(2, 3, 1, 1)  # 1x1 spatial: the case where the paper advises a learned eps
    frn(x).square().sum().backward()
    assert frn.eps_param.grad is not None and (frn.eps_param.grad != 0).all()
    before = frn.eps_param.detach().clone()
    torch.optim.SGD(frn.parameters(), lr=1e-3).step()
    assert not torch.equal(frn.eps_param, before)


def test_frn_reset_parameters_restores_the_init():
    frn = _randomize(FilterResponseNorm2d(3, learnable_eps=True))
    frn.reset_parameters()
    fresh = FilterResponseNorm2d(3, learnable_eps=True)
    for (name, a), (_, b) in zip(frn.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- EvoNorm2dB0


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("nonlinearity", [True, False])
def test_b0_matches_reference_over_steps_train_and_eval(momentum, nonlinearity):
    module = _randomize(EvoNorm2dB0(4, momentum=momentum, nonlinearity=nonlinearity))
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    for step in range(3):
        x = (torch.randn(3, 4, 5, 2) * 2 + step).requires_grad_()
        g = torch.randn(3, 4, 5, 2)
        factor = 1.0 / (step + 1) if momentum is None else momentum
        y = module(x)
        ours = _grads(module, x, y, g)
        expected = functional.evonorm_b0(
            x, running_var, module.weight, module.bias, module.v, True, factor, module.eps, running_mean=running_mean
        )
        theirs = _grads(module, x, expected, g)
        assert_close(y, expected)
        for name in ours:
            assert_close(ours[name], theirs[name], msg=name)
        assert_close(module.running_var, running_var)
        assert_close(module.running_mean, running_mean)
        assert int(module.num_batches_tracked) == step + 1
    module.eval()
    x = torch.randn(1, 4, 3, 3)
    expected = functional.evonorm_b0(
        x, running_var, module.weight, module.bias, module.v, False, 0.0, module.eps, running_mean=running_mean
    )
    assert_close(module(x), expected)
    assert_close(module.running_var, running_var)
    assert int(module.num_batches_tracked) == 3


def test_b0_eval_uses_running_var_not_the_batch():
    module = EvoNorm2dB0(3).eval()
    with torch.no_grad():
        module.running_var.copy_(torch.tensor([0.25, 1.0, 9.0]))
    x = torch.randn(4, 3, 5, 5) * 3
    expected = functional.evonorm_b0(x, module.running_var.clone(), v=torch.ones(3))
    assert_close(module(x), expected)
    assert not torch.allclose(module(x), functional.evonorm_b0(x, None, v=torch.ones(3)))


def test_b0_momentum_none_is_the_cumulative_average():
    module = EvoNorm2dB0(3, momentum=None)
    batches = [torch.randn(4, 3, 3, 3) * (i + 1) + i for i in range(4)]
    for x in batches:
        module(x)
    unbiased = torch.stack([x.double().var((0, 2, 3), unbiased=True) for x in batches])
    # the cumulative average starts from the first batch: the init of 1 carries no weight
    assert_close(module.running_var, unbiased.mean(0))
    assert_close(module.running_mean, torch.stack([x.double().mean((0, 2, 3)) for x in batches]).mean(0))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_b0_without_nonlinearity_is_torch_batch_norm(momentum):
    ours = EvoNorm2dB0(5, momentum=momentum, nonlinearity=False)
    ref = randomize_weight_and_bias(torch.nn.BatchNorm2d(5, momentum=momentum))
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(3, 5, 4, 3) * 2 + step
        assert_same_step(ours, ref, x, torch.randn_like(x))
        assert_close(ours.running_mean, ref.running_mean)
        assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 5, 4, 3)
    assert_close(ours(x), ref(x))


def test_b0_batch_norm_checkpoint_loads():
    ref = torch.nn.BatchNorm2d(4)
    ref(torch.randn(8, 4, 3, 3) * 2 + 1)
    linear = EvoNorm2dB0(4, nonlinearity=False)
    linear.load_state_dict(ref.state_dict())
    assert torch.equal(linear.running_var, ref.running_var)
    nonlinear = EvoNorm2dB0(4)
    result = nonlinear.load_state_dict(ref.state_dict(), strict=False)
    assert result.missing_keys == ["v"] and result.unexpected_keys == []
    assert torch.equal(nonlinear.running_var, ref.running_var)


def test_b0_parameters():
    b0 = EvoNorm2dB0(3)
    assert torch.equal(b0.v, torch.ones(3)) and torch.equal(b0.weight, torch.ones(3))
    assert EvoNorm2dB0(3, nonlinearity=False).v is None
    assert EvoNorm2dB0(3, affine=False).weight is None
    assert "nonlinearity=True" in repr(b0)
    with torch.no_grad():
        b0.v.fill_(3.0)
    b0.reset_parameters()
    assert torch.equal(b0.v, torch.ones(3))


# ---------------------------------------------------------------- EvoNorm2dS0


@pytest.mark.parametrize("training", [True, False])
def test_s0_without_nonlinearity_is_torch_group_norm(training):
    ours = EvoNorm2dS0(6, num_groups=3, nonlinearity=False).train(training)
    ref = randomize_weight_and_bias(torch.nn.GroupNorm(3, 6).train(training))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 3) * 2 + 1
    assert_same_step(ours, ref, x, torch.randn_like(x))


def test_s0_group_rules():
    assert EvoNorm2dS0(32).num_groups == 32
    assert EvoNorm2dS0(32, group_size=8).num_groups == 4
    assert EvoNorm2dS0(32, num_groups=3, group_size=16).num_groups == 2  # group_size wins
    s0 = EvoNorm2dS0(8, num_groups=2)
    assert torch.equal(s0.v, torch.ones(8))
    assert EvoNorm2dS0(8, num_groups=2, nonlinearity=False).v is None
    assert "num_groups=2, nonlinearity=True" in repr(s0)


# ---------------------------------------------------------------- numerical robustness


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)])
def test_large_offset_is_stable(dtype, offset):
    x = (torch.randn(8, 4, 8, 8, dtype=torch.float64) + offset).to(dtype)
    for module in [EvoNorm2dB0(4, nonlinearity=False, dtype=dtype), EvoNorm2dS0(4, num_groups=2, nonlinearity=False)]:
        y = module(x).double()
        assert y.mean().abs() < 1e-2
        assert (y.std() - 1).abs() < 1e-2


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make",
    [lambda: FilterResponseNorm2d(3), lambda: EvoNorm2dB0(3), lambda: EvoNorm2dS0(3, num_groups=1)],
)
def test_bad_input_shapes_raise(make):
    module = make()
    name = type(module).__name__
    with pytest.raises(ValueError, match=rf"{name}: expected 4D input .*\(4, 3, 5\)"):
        module(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match=rf"{name}: input has 2 channels .* expected num_features=3"):
        module(torch.randn(4, 2, 5, 5))


def test_b0_one_value_per_channel_in_training_raises_naming_shape():
    b0 = EvoNorm2dB0(4)
    with pytest.raises(ValueError, match=r"EvoNorm2dB0: expected more than 1 value per channel.*\(1, 4, 1, 1\)"):
        b0(torch.randn(1, 4, 1, 1))
    b0.eval()
    assert b0(torch.randn(1, 4, 1, 1)).shape == (1, 4, 1, 1)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: EvoNorm2dS0(32, num_groups=3), r"EvoNorm2dS0: num_groups=3 must divide num_features=32"),
        (lambda: EvoNorm2dS0(32, group_size=5), r"EvoNorm2dS0: group_size=5 must divide num_features=32"),
        (lambda: EvoNorm2dS0(32, num_groups=0), r"EvoNorm2dS0: num_groups=0 must be a positive integer"),
        (lambda: EvoNorm2dS0(32, group_size=-4), r"EvoNorm2dS0: group_size=-4 must be a positive integer"),
        (lambda: EvoNorm2dS0(16), r"EvoNorm2dS0: num_groups=32 must divide num_features=16"),
        (lambda: EvoNorm2dS0(8, num_groups=2, eps=0.0), r"EvoNorm2dS0: eps=0.0 must be a finite number > 0"),
        (lambda: EvoNorm2dB0(8, eps=-1.0), r"EvoNorm2dB0: eps=-1.0 must be a finite number > 0"),
        (lambda: EvoNorm2dB0(8, momentum=2.0), r"EvoNorm2dB0: momentum=2.0 must be None"),
        (lambda: FilterResponseNorm2d(8, eps=0), r"FilterResponseNorm2d: eps=0 must be a finite number > 0"),
        (lambda: FilterResponseNorm2d(0), r"FilterResponseNorm2d: num_features=0 must be a positive integer"),
    ],
)
def test_bad_constructor_args_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_modules_dispatch_through_kernels(monkeypatch):
    calls = []
    original = kernels.call

    def spy(op, *args, **kwargs):
        calls.append(op)
        return original(op, *args, **kwargs)

    monkeypatch.setattr(kernels, "call", spy)
    x = torch.randn(2, 4, 3, 3)
    FilterResponseNorm2d(4)(x)
    EvoNorm2dB0(4)(x)
    EvoNorm2dS0(4, num_groups=2)(x)
    assert calls == ["filter_response_norm", "evonorm_b0", "evonorm_s0"]
