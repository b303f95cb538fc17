"""RecurrentBatchNorm1d against one torch.nn.BatchNorm1d per time step sharing gamma and beta, and the paper's rules."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from normlab.functional import recurrent_batch_norm
from normlab.layers.recurrent_batch_norm import RecurrentBatchNorm1d
from tests.helpers import assert_all_close, grad_like
from tests.tolerances import assert_close

C, MAX_STEPS = 5, 3


class PerStepTorchBN(nn.Module):
    """The oracle: one torch.nn.BatchNorm1d per step (the last reused beyond max_steps), gamma and beta shared."""

    def __init__(self, c, max_steps, momentum=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c).uniform_(0.5, 1.5))
        self.bias = nn.Parameter(torch.empty(c).uniform_(-0.5, 0.5))
        self.bns = nn.ModuleList(nn.BatchNorm1d(c, affine=False, momentum=momentum) for _ in range(max_steps))

    def forward(self, x, step):
        return self.bns[min(step, len(self.bns) - 1)](x) * self.weight + self.bias


def paired(momentum=0.1):
    ref = PerStepTorchBN(C, MAX_STEPS, momentum)
    ours = RecurrentBatchNorm1d(C, max_steps=MAX_STEPS, momentum=momentum)
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ours.bias.copy_(ref.bias)
    return ours, ref


def unrolled(module, xs):
    """Outputs and input gradients of a sequence of steps, as in a recurrence, then the parameter gradients."""
    module.zero_grad(set_to_none=True)
    xs = [x.clone().requires_grad_() for x in xs]
    ys = torch.stack([module(x, step) for step, x in enumerate(xs)])
    ys.backward(grad_like(ys))
    return [ys.detach(), *(x.grad for x in xs), module.weight.grad, module.bias.grad]


def sequence(steps, n=6):
    """Step t has mean t and standard deviation 1 + t: the statistics differ by step."""
    return [torch.randn(n, C) * (1 + t) + t for t in range(steps)]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_one_torch_batch_norm_per_step(momentum):
    ours, ref = paired(momentum)
    for _ in range(3):  # several training sequences, longer than max_steps
        xs = sequence(MAX_STEPS + 2)
        assert_all_close(unrolled(ours, xs), unrolled(ref, xs))
    for step, bn in enumerate(ref.bns):
        assert_close(ours.running_mean[step], bn.running_mean)
        assert_close(ours.running_var[step], bn.running_var)
        assert int(ours.num_batches_tracked[step]) == int(bn.num_batches_tracked)
    assert ours.num_batches_tracked.tolist() == [3, 3, 9]  # the last row takes every step from max_steps - 1 on


def test_eval_matches_one_torch_batch_norm_per_step():
    ours, ref = paired()
    for _ in range(2):
        xs = sequence(MAX_STEPS + 1)
        unrolled(ours, xs), unrolled(ref, xs)
    ours.eval(), ref.eval()
    buffers = copy.deepcopy(dict(ours.named_buffers()))
    xs = sequence(MAX_STEPS + 3, n=1)  # batch size 1 is fine in eval; steps beyond max_steps read the last row
    assert_all_close(unrolled(ours, xs), unrolled(ref, xs))
    for name, b in ours.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_module_matches_functional_reference():
    module = RecurrentBatchNorm1d(C, max_steps=MAX_STEPS)
    mean, var = module.running_mean.clone(), module.running_var.clone()
    for step, x in enumerate(sequence(5)):
        y = module(x, step)
        assert_close(y, recurrent_batch_norm(x, step, mean, var, module.weight, module.bias, True, 0.1, 1e-5))
    assert_close(module.running_mean, mean)
    assert_close(module.running_var, var)


def test_running_statistics_differ_by_step():
    module = RecurrentBatchNorm1d(C, max_steps=4, momentum=None)  # cumulative average: the exact population mean
    for _ in range(20):
        for step, x in enumerate(sequence(4, n=32)):
            module(x, step)
    expected_mean = torch.arange(4.0).unsqueeze(1).expand(4, C)
    expected_var = ((1 + torch.arange(4.0)) ** 2).unsqueeze(1).expand(4, C)
    assert_close(module.running_mean, expected_mean, scale=3e4)  # within 0.3: 640 samples per step
    assert ((module.running_var / expected_var) - 1).abs().max() < 0.25
    assert (module.running_mean[1:] - module.running_mean[:-1]).min() > 0.5


def test_paper_initialisation_and_shared_affine():
    module = RecurrentBatchNorm1d(C, max_steps=7)
    assert torch.equal(module.weight, torch.full((C,), 0.1)) and torch.equal(module.bias, torch.zeros(C))
    assert module.running_mean.shape == module.running_var.shape == (7, C)
    assert module.num_batches_tracked.shape == (7,) and module.num_batches_tracked.dtype == torch.long
    assert [name for name, _ in module.named_parameters()] == ["weight", "bias"]  # one gamma, beta for all steps
    assert torch.equal(RecurrentBatchNorm1d(C, max_steps=2, weight_init=1.0).weight, torch.ones(C))
    assert RecurrentBatchNorm1d(C, max_steps=2, affine=False).weight is None


def test_reset_running_stats_and_state_dict_round_trip():
    module = RecurrentBatchNorm1d(C, max_steps=MAX_STEPS)
    for step, x in enumerate(sequence(4)):
        module(x, step)
    clone = RecurrentBatchNorm1d(C, max_steps=MAX_STEPS)
    clone.load_state_dict(module.state_dict())
    for (name, a), b in zip(module.named_buffers(), clone.buffers()):
        assert torch.equal(a, b), name
    module.reset_running_stats()
    assert module.running_mean.eq(0).all() and module.running_var.eq(1).all()
    assert module.num_batches_tracked.eq(0).all()


@pytest.mark.parametrize("training", [True, False])
def test_float64_gradcheck(training):
    module = RecurrentBatchNorm1d(3, max_steps=2, dtype=torch.float64).train(training)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5), module.bias.uniform_(-0.5, 0.5)
        module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 1.5)
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(x, weight, bias):
        state = {**{n: b.clone() for n, b in buffers.items()}, "weight": weight, "bias": bias}
        return functional_call(module, state, (x, 5))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compile_fullgraph_with_changing_steps():
    torch._dynamo.reset()
    eager = RecurrentBatchNorm1d(C, max_steps=MAX_STEPS)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for training in (True, False):
        eager.train(training), compiled_module.train(training)
        for step, x in enumerate(sequence(MAX_STEPS + 2)):
            torch.testing.assert_close(compiled(x, step), eager(x, step))
    for (name, a), b in zip(eager.named_buffers(), compiled_module.buffers()):
        torch.testing.assert_close(b, a, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_dtype_preserved(dtype):
    module = RecurrentBatchNorm1d(C, max_steps=2, dtype=dtype)
    y = module(torch.randn(4, C, dtype=dtype), 1)
    assert y.dtype == dtype and torch.isfinite(y.float()).all()


# ---- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -2, 1.5, None])
def test_max_steps_must_be_positive_int(bad):
    with pytest.raises(ValueError, match=rf"RecurrentBatchNorm1d: max_steps={bad!r} must be a positive integer"):
        RecurrentBatchNorm1d(C, max_steps=bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_features": 0}, r"num_features=0"),
        ({"eps": 0.0}, r"eps=0.0"),
        ({"momentum": 1.5}, r"momentum=1.5"),
        ({"weight_init": -0.1}, r"weight_init=-0.1"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"num_features": C, "max_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=rf"RecurrentBatchNorm1d: {match}"):
        RecurrentBatchNorm1d(args.pop("num_features"), **args)


@pytest.mark.parametrize("bad", [-1, 2.0, True, torch.tensor(0)])
def test_step_must_be_a_non_negative_int(bad):
    module = RecurrentBatchNorm1d(C, max_steps=2)
    with pytest.raises(ValueError, match=r"RecurrentBatchNorm1d: step=.* must be a non-negative Python int"):
        module(torch.randn(4, C), bad)


def test_wrong_rank_channels_and_single_sample_raise():
    module = RecurrentBatchNorm1d(C, max_steps=2)
    with pytest.raises(ValueError, match=r"expected 2D input.*\(4, 5, 3\)"):
        module(torch.randn(4, C, 3), 0)
    with pytest.raises(ValueError, match=rf"{C + 1} channels.*num_features={C}"):
        module(torch.randn(4, C + 1), 0)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 5\)"):
        module(torch.randn(1, C), 0)
